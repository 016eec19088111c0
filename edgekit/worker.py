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
from edgekit.progress import say, step


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
    pruned = None
    if recipe.prune is not None:  # prune a copy first: the fp32 baseline below stays the unpruned model
        pruned = _prune(model, recipe, profile, calib, job.get("prune_eval"), result)
    with step(profile.name, "export fp32") as s:
        fp32 = backend.export_fp32(model, args, recipe.model.inputs, out, export_opts)
    result["timings"]["export_s"] = s["seconds"]
    result["fp32"] = _artifact_json(fp32)
    try:
        with step(profile.name, f"quantize with {len(calib)} calibration samples") as s:
            opt = backend.quantize(fp32, calib, out, quant_opts)
        result["timings"]["quantize_s"] = s["seconds"]
        q_fp32, q_out = fp32, out
        if pruned is not None:  # optimized = pruned + quantized; the unpruned int8 artifact shows what pruning adds
            add_extra(result, "int8_unpruned", opt)
            with step(profile.name, "export + quantize the pruned model") as s:
                q_out = out / "pruned"
                q_out.mkdir(exist_ok=True)
                q_fp32 = backend.export_fp32(pruned, args, recipe.model.inputs, q_out, export_opts)
                opt = backend.quantize(q_fp32, calib, q_out, quant_opts)
            result["timings"]["prune_export_quantize_s"] = s["seconds"]
        if job.get("search"):  # accuracy-aware search on what ships (the pruned model, if pruned)
            try:
                opt, result["quantize_search"], chosen = _search(job["search"], recipe, profile, backend, q_fp32,
                                                                 opt, quant_opts, calib, q_out,
                                                                 model if pruned is None else pruned)
                result["timings"]["quantize_search_s"] = result["quantize_search"]["search_s"]
                if pruned is not None and chosen != quant_opts:
                    _unpruned_like_shipped(result, backend, fp32, calib, out, chosen, profile.name)
            except Exception as e:  # noqa: BLE001 - the first artifact still gets verified and timed
                say(f"[{profile.name}] WARNING: quantize search failed ({type(e).__name__}: {e}); "
                    f"keeping the profile's quantization")
                result["quantize_search_error"] = f"{type(e).__name__}: {e}"
        result["optimized"] = _artifact_json(opt)
    except TargetError as e:  # keep the fp32 artifact: it is still worth verifying and timing
        result["optimized_error"] = str(e)
    for name, art in backend.variants(fp32, out, quant_opts).items():
        add_extra(result, name, art)
    return result


def _search(spec: dict, recipe, profile, backend, fp32, opt, quant_opts, calib, out: Path, model):
    """Accuracy-aware quantization (edgekit.quantize_search): score ``opt``, search if it misses."""
    from edgekit.data import load_evaluation
    from edgekit.quantize_search import SearchContext, search

    evals = load_evaluation(recipe)
    n = min(spec["eval_samples"], len(evals))
    reference = np.load(spec["reference"])[:n]
    labels = None if evals.labels is None else evals.labels[:n]
    _, _, runtime = backend.options(profile)
    ctx = SearchContext(target=profile.name, backend=backend, runtime=runtime, calibration=calib,
                        samples=[evals.sample(i) for i in range(n)], reference=reference, labels=labels,
                        metric=recipe.data.metric, max_drop=spec["max_drop"],
                        time_budget_s=spec["time_budget_s"], max_steps=spec["max_steps"], model=model)
    art, outcome = search(ctx, fp32, opt, quant_opts, out, lambda c: backend.search_candidates(fp32, quant_opts, c))
    return art, outcome, ctx.best.candidate.opts


def _unpruned_like_shipped(result: dict, backend, fp32, calib, out: Path, chosen, target: str) -> None:
    """Rebuild the ``int8_unpruned`` reference with the options the search chose for the pruned model
    (same layers kept in float, by name), so the latency comparison isolates what pruning adds."""
    for f in result["extras"]["int8_unpruned"]["files"]:
        Path(f).unlink(missing_ok=True)
    if "calibration_cache" in type(chosen).model_fields:  # ranges calibrated on the pruned model
        chosen = chosen.model_copy(update={"calibration_cache": None})
    with step(target, "quantize the unpruned model with the shipped artifact's options (latency reference)"):
        folder = out / "unpruned_like_shipped"
        folder.mkdir(exist_ok=True)
        add_extra(result, "int8_unpruned", backend.quantize(fp32, calib, folder, chosen))


def _prune(model, recipe, profile, calib, prune_eval: dict | None, result: dict):
    """Prune (and recover) a copy of ``model`` for this target; record the facts in ``result["prune"]``."""
    import copy

    from edgekit.prune import prune_model, torch_evaluator

    # Targets with the same round_to get the same pruned model (same recipe, data and seedless steps):
    # the first one's is reused from the run's cache instead of pruning and distilling again.
    cache = Path(prune_eval["cache"]) / f"round_to_{profile.prune.round_to}" if prune_eval and \
        prune_eval.get("cache") else None
    if cache is not None and (cache / "facts.json").is_file():
        import torch

        with step(profile.name, f"prune: reuse the model pruned for round_to {profile.prune.round_to}") as s:
            # the user's model file is imported under a per-process name (edgekit.model.load_model)
            sys.modules.setdefault((cache / "module.txt").read_text(), sys.modules[type(model).__module__])
            pruned = torch.load(cache / "model.pt", weights_only=False)
        result["timings"]["prune_s"] = s["seconds"]
        result["prune"] = {**json.loads((cache / "facts.json").read_text()), "reused": True}
        return pruned
    evaluate = None
    if prune_eval:
        evaluate = torch_evaluator(recipe.model.inputs, prune_eval["eval"], np.load(prune_eval["reference"]),
                                   recipe.data.metric, prune_eval.get("limit"))
    with step(profile.name, "prune + recover") as s:
        pruned, facts = prune_model(copy.deepcopy(model), recipe.model.inputs, calib, recipe.prune,
                                    profile.prune.round_to, profile.name, evaluate)
    result["timings"]["prune_s"] = s["seconds"]
    result["prune"] = facts
    if cache is not None:
        import torch

        cache.mkdir(parents=True, exist_ok=True)
        torch.save(pruned, cache / "model.pt")
        (cache / "module.txt").write_text(type(model).__module__)
        (cache / "facts.json").write_text(json.dumps(facts))
    return pruned


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
