"""Worker processes: the heavy, crash-prone toolchain work runs here, one process per job, so a
native crash in one toolchain fails one target instead of the run.

``python -m edgekit.worker build JOB.json``   export fp32 + quantize for one target
``python -m edgekit.worker measure JOB.json`` load one artifact, run the evaluation set, benchmark it
``python -m edgekit.worker ab JOB.json``      time a baseline and a current artifact interleaved

A job file is JSON; the worker writes its result (JSON) to ``job["result"]``.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np

from edgekit.errors import InputError, TargetError
from edgekit.progress import step


def _artifact_json(a) -> dict:
    return {"path": str(a.path), "files": [str(f) for f in a.files], "precision": a.precision,
            "details": a.details}


def add_extra(result: dict, name: str, artifact) -> None:
    """Record one more artifact of this target (besides fp32 and optimized) to verify and time."""
    result.setdefault("extras", {})[name] = _artifact_json(artifact)


def build(job: dict) -> dict:
    from edgekit.backends import get_backend
    from edgekit.data import load_calibration
    from edgekit.model import configure_torch, example_inputs, load_model
    from edgekit.profiles import load_profile
    from edgekit.recipe import load_recipe

    recipe = load_recipe(job["recipe"])
    profile = load_profile(job["target"], recipe.root)
    backend = get_backend(profile.backend)
    export_opts, quant_opts, _ = backend.options(profile)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    configure_torch()
    model = load_model(recipe)
    calib = load_calibration(recipe)
    args = example_inputs(recipe.model.inputs, calib.sample(0))

    result: dict = {"timings": {}}
    with step(profile.name, "export fp32") as s:
        fp32 = backend.export_fp32(model, args, recipe.model.inputs, out, export_opts)
    result["timings"]["export_s"] = s["seconds"]
    result["fp32"] = _artifact_json(fp32)
    try:
        with step(profile.name, f"quantize with {len(calib)} calibration samples") as s:
            opt = backend.quantize(fp32, calib, out, quant_opts)
        result["timings"]["quantize_s"] = s["seconds"]
        result["optimized"] = _artifact_json(opt)
    except TargetError as e:  # keep the fp32 artifact: it is still worth verifying and timing
        result["optimized_error"] = str(e)
    return result


def measure(job: dict) -> dict:
    from edgekit.backends import get_backend
    from edgekit.bench import measure as run_measure

    backend = get_backend(job["backend"])
    runtime = backend.RuntimeOptions(**job["runtime"])
    with np.load(job["eval"], allow_pickle=False) as z:
        n = min(len(z[job["inputs"][0]]), job.get("limit") or 1 << 62)
        arrays = {k: z[k][:n] for k in job["inputs"]}
    samples = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]
    stats, outputs = run_measure(lambda: backend.load(Path(job["artifact"]), runtime), samples,
                                 warmup=job["warmup"], runs=job["runs"], bench=job["bench"])
    np.save(job["outputs"], outputs)
    return stats


def ab(job: dict) -> dict:
    """Time the baseline's and the current artifact interleaved (``edgekit ci --baseline``)."""
    from edgekit.backends import get_backend
    from edgekit.bench import ab_compare

    backend = get_backend(job["backend"])
    runtime = backend.RuntimeOptions(**job["runtime"])
    with np.load(job["eval"], allow_pickle=False) as z:
        feed = {k: z[k][:1] for k in job["inputs"]}
    a = backend.load(Path(job["baseline"]), runtime)
    b = backend.load(Path(job["current"]), runtime)
    return ab_compare(a, b, feed, warmup=job["warmup"], rounds=job["rounds"], per_round=job["per_round"])


def main(argv: list[str]) -> int:
    kind, job_path = argv
    job = json.loads(Path(job_path).read_text())
    try:
        result = {"ok": True, **{"build": build, "measure": measure, "ab": ab}[kind](job)}
    except (InputError, TargetError) as e:
        result = {"ok": False, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - report anything else as the target's failure
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(job["result"]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
