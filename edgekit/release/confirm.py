"""Release CI's second look at a suspected latency regression (``edgekit ci --baseline``): measure again
before failing the gate (see ``edgekit.release.baseline``)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from edgekit.backends import get_backend
from edgekit.config.profiles import load_profile
from edgekit.config.recipe import Recipe
from edgekit.errors import InputError, TargetError
from edgekit.progress import say
from edgekit.release.baseline import REMEASURE
from edgekit.report.schema import TargetRow
from edgekit.orchestrate.jobs import ABJob, MeasureJob
from edgekit.orchestrate.worker import run_in_worker


def confirm_latency(recipe: Recipe, row: TargetRow, out: Path, baseline_report: Path, prev: TargetRow,
                    repeats: int = REMEASURE, executor=None) -> Optional[dict]:
    """The baseline's and the current optimized artifact timed interleaved when the baseline's artifact
    files are still next to its report, else the current one ``repeats`` times. None when it cannot
    (e.g. the target's profile is gone). ``executor``: on a cluster, on the node that timed the target."""
    prof = _profile(recipe, row.name)
    if prof is None:
        return None
    backend = get_backend(prof.backend)
    _, _, runtime = backend.options(prof)
    base_dir = Path(baseline_report)
    base_dir = base_dir if base_dir.is_dir() else base_dir.parent
    prev_files = [base_dir / f for f in (prev.optimized.files if prev.optimized else [])]
    common = {"backend": prof.backend, "runtime": runtime.model_dump(),
              "eval": str(recipe.resolve(recipe.data.evaluation)), "inputs": [i.name for i in recipe.model.inputs],
              "warmup": prof.bench.warmup}
    current = str(Path(out) / row.optimized.artifact)
    with tempfile.TemporaryDirectory(prefix="edgekit-confirm-") as tmp:
        log = Path(tmp) / "log"

        def run_job(kind: str, job, stem: Path):
            if executor is None or executor.name == "local":
                return run_in_worker(kind, job, stem, log)
            from edgekit.orchestrate.executor import measure_group

            return executor.run(kind, job, stem, log,
                                measure_for=(measure_group(recipe.path, prof.name), prof.resources))

        try:
            if prev_files and all(f.is_file() for f in prev_files):
                say(f"[{prof.name}] latency regression suspected: timing baseline and current artifact interleaved")
                res = run_job("ab", ABJob(**common, baseline=str(base_dir / prev.optimized.artifact),
                                          current=current, rounds=10, per_round=max(prof.bench.runs // 10, 5)),
                              Path(tmp) / "ab")
                return {"method": "ab", "a": res.a, "b": res.b}
            say(f"[{prof.name}] latency regression suspected: measuring the optimized artifact again")
            lats = []
            for i in range(repeats):
                res = run_job("measure", MeasureJob(**common, artifact=current, limit=1, runs=prof.bench.runs,
                                                    outputs=str(Path(tmp) / "outputs.npy")),
                              Path(tmp) / f"measure{i}")
                lats.append(res.latency_ms)
            return {"method": "repeat", "latencies": lats}
        except TargetError as e:
            say(f"[{prof.name}] could not measure again: {e}")
            return None


def _profile(recipe: Recipe, name: str):
    """The recipe's target named ``name`` (a recipe may list a profile by path), else the built-in one."""
    for entry in [*recipe.targets, name]:
        try:
            prof = load_profile(entry, recipe.root)
        except InputError:
            continue
        if prof.name == name:
            return prof
    return None
