"""Worker processes: the heavy, crash-prone toolchain work runs here, one process per job, so a
native crash in one toolchain fails one target instead of the run.

``python -m edgekit.orchestrate.worker build JOB.json``   prune, export fp32, quantize (+ search) one target
``python -m edgekit.orchestrate.worker measure JOB.json`` load one artifact, run the evaluation set, benchmark it
``python -m edgekit.orchestrate.worker time JOB.json``    time every artifact of a target interleaved
``python -m edgekit.orchestrate.worker ab JOB.json``      time a baseline and a current artifact interleaved

The job file is ``{"job": <edgekit.orchestrate.jobs model>, "result": PATH}``; the worker writes
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ..., "traceback": ...}`` to PATH.
``run_in_worker`` is the parent's side: it starts one, streams edgekit's own lines of its stderr to ours
(all of it to the target's log) and returns the typed result.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

from edgekit.errors import InputError, TargetError
from edgekit.progress import say, step
from edgekit.orchestrate.jobs import (ABJob, ABResult, BuildJob, BuildResult, BuiltArtifact, MeasureJob, MeasureResult,
                              PruneEval, SearchSpec, TimeJob, TimeResult)

KINDS = {"build": (BuildJob, BuildResult), "measure": (MeasureJob, MeasureResult), "time": (TimeJob, TimeResult),
         "ab": (ABJob, ABResult)}


# -- the parent's side ----------------------------------------------------------------------------------

def run_in_worker(kind: str, job, stem: Path, log: Path, progress: Optional[str] = None):
    """Run one worker process; stream its stderr to ours and to the target's log; return its result
    (``KINDS[kind][1]``). A failure or crash raises TargetError with the worker's reason. ``progress``:
    the step its progress lines belong to (``edgekit.progress.PREFIX_ENV``)."""
    from edgekit.progress import PREFIX_ENV

    result_path = Path(str(stem) + ".result.json")
    job_file = Path(str(stem) + ".job.json")
    job_file.write_text(json.dumps({"job": job.model_dump(mode="json"), "result": str(result_path)}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({PREFIX_ENV: progress} if progress else {})}
    tail, pending = b"", b""
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "edgekit.orchestrate.worker", kind, str(job_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            for chunk in iter(lambda: proc.stderr.read1(4096), b""):
                logf.write(chunk)  # everything goes to the target's log
                tail = (tail + chunk)[-4000:]
                *lines, pending = (pending + chunk).split(b"\n")
                mine = [ln for ln in lines if _is_edgekit_line(ln)]  # the terminal gets edgekit's own lines
                if mine:
                    sys.stderr.buffer.write(b"\n".join(mine) + b"\n")
                    sys.stderr.flush()
            if _is_edgekit_line(pending):
                sys.stderr.buffer.write(pending + b"\n")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
    if not result_path.is_file():
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        last = "\n".join(tail.decode(errors="replace").strip().splitlines()[-8:])
        raise TargetError(f"the {kind} worker crashed ({how}); last output:\n{last}")
    answer = json.loads(result_path.read_text())
    if not answer["ok"]:
        if answer.get("traceback"):
            with open(log, "a") as logf:
                logf.write(answer["traceback"])
        raise TargetError(answer["error"])
    return KINDS[kind][1].model_validate(answer["result"])


def _is_edgekit_line(line: bytes) -> bool:
    """edgekit's step lines (``[target] ...``, ``[model] ...``) and warnings; third-party output
    (toolchain warnings, absl/oneDNN banners, converter chatter) stays in the target's log."""
    return line.startswith(b"[") or line.startswith(b"WARNING: cache") or line.startswith(b"edgekit")


# -- build ---------------------------------------------------------------------------------------------

def build(job: BuildJob) -> BuildResult:
    from edgekit.backends import get_backend
    from edgekit.config.profiles import load_profile
    from edgekit.config.recipe import load_recipe
    from edgekit.inputs import exportable
    from edgekit.inputs.data import load_calibration
    from edgekit.inputs.model import configure_torch, example_inputs, load_model
    from edgekit.quantize import rescue

    recipe = _relocate(load_recipe(job.recipe), job.relocated)
    profile = load_profile(job.target, recipe.root)
    backend = get_backend(profile.backend)
    export_opts, quant_opts, _ = backend.options(profile)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    configure_torch()
    model = load_model(recipe)
    calib = load_calibration(recipe)
    args = example_inputs(recipe.model.inputs, calib.sample(0))

    rewrite_ops: list[str] = []  # ops this toolchain failed on that an exact module rewrite avoids

    def export(m, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        m, names = exportable.rewrite_ops(m, rewrite_ops) if rewrite_ops else (m, [])
        try:
            art = backend.export_fp32(m, args, recipe.model.inputs, folder, export_opts)
        except TargetError as e:
            new, names = exportable.rewrite(m, str(e))
            if not names:
                raise
            rewrite_ops.extend(op for op in exportable.REWRITES if op in str(e))
            say(f"[{profile.name}] export: {str(e).splitlines()[0][:200]}: rewriting {', '.join(names)} "
                f"exactly (edgekit.inputs.exportable) and exporting again")
            art = backend.export_fp32(new, args, recipe.model.inputs, folder, export_opts)
        if names:
            art.details["exact_rewrites"] = {"modules": names, "ops": list(rewrite_ops)}
        return art

    result = BuildResult()
    pruned = unfactorized = None
    if recipe.prune is not None:  # prune a copy first: the fp32 baseline below stays the unpruned model
        pruned, unfactorized = _prune(model, recipe, profile, calib, job.prune_eval, result)
    with step(profile.name, "export fp32") as s:
        fp32 = export(model, out)
    result.timings["export_s"] = s["seconds"]
    result.fp32 = BuiltArtifact.of(fp32)
    try:
        if pruned is not None:  # optimized = pruned + quantized; the unpruned int8 artifact shows what pruning adds
            with step(profile.name, "quantize the unpruned model (latency reference)") as s:
                _, unpruned = _quantize(backend, fp32, model, quant_opts, calib, out, export, profile.name)
            result.extras["int8_unpruned"] = BuiltArtifact.of(unpruned)
            with step(profile.name, "export the pruned model") as s:
                q_fp32, q_out, q_model = export(pruned, out / "pruned"), out / "pruned", pruned
            result.timings["prune_export_s"] = s["seconds"]
        else:
            q_fp32, q_out, q_model = fp32, out, model
        rescues: list[dict] = []
        with step(profile.name, f"quantize with {len(calib)} calibration samples") as s:
            start, opt = _quantize(backend, q_fp32, q_model, quant_opts, calib, q_out, export, profile.name, rescues)
        result.timings["quantize_s"] = s["seconds"]
        opt.details["quality_methods"] = start.methods
        shipped = start.opts
        if job.search is not None:  # accuracy-aware search on what ships (the pruned model, if pruned)
            try:
                opt, result.quantize_search, chosen = _search(job.search, recipe, profile, backend, q_fp32, opt,
                                                              start, calib, q_out, q_model, export, rescues)
                shipped = chosen
                result.timings["quantize_search_s"] = result.quantize_search.search_s
                if pruned is not None and chosen != start.opts:
                    _unpruned_like_shipped(result, backend, fp32, model, calib, out, chosen, export, profile.name)
            except Exception as e:  # noqa: BLE001 - the first artifact still gets verified and timed
                say(f"[{profile.name}] WARNING: quantize search failed ({type(e).__name__}: {e}); "
                    f"keeping the first quantization")
                result.quantize_search_error = f"{type(e).__name__}: {e}"
        rescue.attach(opt, rescues, backend.float_units(shipped))
        result.optimized = BuiltArtifact.of(opt)
        if unfactorized is not None:  # pruned but not factorized: isolates what factorization adds
            with step(profile.name, "quantize the pruned, unfactorized model (latency reference)"):
                folder = out / "unfactorized"
                u_fp32 = export(unfactorized, folder)
                art = _int8_like(backend, u_fp32, unfactorized, shipped, calib, folder, export, profile.name)
                for f in u_fp32.files:
                    Path(f).unlink(missing_ok=True)
                result.extras["int8_unfactorized"] = BuiltArtifact.of(art)
    except TargetError as e:  # keep the fp32 artifact: it is still worth verifying and timing
        result.optimized_error = str(e)
    finally:  # rewritten models' fp32 exports are what int8 was built from, not artifacts
        for folder in (out / "rewritten", out / "pruned" / "rewritten"):
            shutil.rmtree(folder, ignore_errors=True)
    for name, art in backend.variants(fp32, out, quant_opts).items():
        result.extras[name] = BuiltArtifact.of(art)
    return result


def _quantize(backend, fp32, model, opts, calib, out: Path, export, target: str, rescues: Optional[list] = None):
    """The first quantization: the profile's options with the quality methods
    (``edgekit.quantize.quality``). Returns (what it was built with, the artifact)."""
    from edgekit.quantize import rescue
    from edgekit.quantize.quality import prepare

    start = prepare(backend, fp32, opts, model, calib, lambda m, name: export(m, out / "rewritten" / name),
                    tag=f"[{target}] quantize")
    art, start.opts = rescue.quantize(backend, start.source or fp32, calib, out, start.opts, tag=f"[{target}] quantize",
                                      log=rescues)
    return start, art


def _search(spec: SearchSpec, recipe, profile, backend, fp32, opt, start, calib, out: Path, model, export, rescues):
    """Accuracy-aware quantization (edgekit.quantize.search): score ``opt``, search if it misses.
    Returns (artifact to ship, outcome, the options it was built with)."""
    from edgekit.inputs.data import load_evaluation
    from edgekit.quantize.search import SearchContext, search

    evals = load_evaluation(recipe)
    _, _, runtime = backend.options(profile)
    ctx = SearchContext(target=profile.name, backend=backend, runtime=runtime, calibration=calib,
                        samples=list(evals), reference=np.load(spec.reference), labels=evals.labels,
                        metric=recipe.data.metric, max_drop=spec.max_drop, time_budget_s=spec.time_budget_s,
                        max_steps=spec.max_steps, model=model, subset=spec.eval_samples,
                        export=lambda m, name: export(m, out / "search" / name),
                        distill_steps=spec.distill_steps, distill_lr=spec.distill_lr,
                        profile_opts=backend.options(profile)[1], rescues=rescues)
    art, outcome = search(ctx, fp32, opt, start, out)
    return art, outcome, ctx.best.candidate.opts


def _unpruned_like_shipped(result: BuildResult, backend, fp32, model, calib, out: Path, chosen, export,
                           target: str) -> None:
    """Rebuild the ``int8_unpruned`` reference with the options the search chose for the pruned model
    (same layers kept in float, by name; the same quality methods), so the latency comparison isolates
    what pruning adds."""
    for f in result.extras["int8_unpruned"].files:
        Path(f).unlink(missing_ok=True)
    with step(target, "quantize the unpruned model with the shipped artifact's options (latency reference)"):
        folder = out / "unpruned_like_shipped"
        folder.mkdir(exist_ok=True)
        result.extras["int8_unpruned"] = BuiltArtifact.of(_int8_like(backend, fp32, model, chosen, calib, folder,
                                                                     export, target))


def _int8_like(backend, fp32, model, opts, calib, folder: Path, export, target: str):
    """A latency reference: ``model`` (exported as ``fp32``) quantized like the shipped artifact (the same
    options, hence the same layers in float by name, and the same quality methods)."""
    from edgekit.quantize import rescue
    from edgekit.quantize.quality import prepare

    start = prepare(backend, fp32, opts, model, calib, lambda m, name: export(m, folder / "rewritten" / name))
    art, _ = rescue.quantize(backend, start.source or fp32, calib, folder, start.opts, tag=f"[{target}] quantize")
    shutil.rmtree(folder / "rewritten", ignore_errors=True)
    return art


def _relocate(recipe, relocated: dict[str, str]):
    """A cluster node's copies of the recipe's absolute paths (``BuildJob.relocated``)."""
    if not relocated:
        return recipe
    data = {k: relocated[k] for k in ("calibration", "evaluation") if k in relocated}
    model = {"source": relocated["model"]} if "model" in relocated else {}
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=data),
                                     "model": recipe.model.model_copy(update=model)})


def _prune(model, recipe, profile, calib, prune_eval: PruneEval | None, result: BuildResult):
    """Prune (and recover) a copy of ``model`` for this target; record the facts in ``result.prune``."""
    import copy

    from edgekit.prune import prune_model, torch_evaluator
    from edgekit.report.schema import PruneFacts

    # Targets with the same round_to get the same pruned model (same recipe, data and seedless steps):
    # the first one's is reused from the run's cache instead of pruning and distilling again.
    cache = Path(prune_eval.cache) / f"round_to_{profile.prune.round_to}" if prune_eval and prune_eval.cache else None
    if cache is not None and (cache / "facts.json").is_file():
        import torch

        with step(profile.name, f"prune: reuse the model pruned for round_to {profile.prune.round_to}") as s:
            # the user's model file is imported under a per-process name (edgekit.inputs.model.load_model)
            sys.modules.setdefault((cache / "module.txt").read_text(), sys.modules[type(model).__module__])
            pruned = torch.load(cache / "model.pt", weights_only=False)
            unfactorized = torch.load(cache / "unfactorized.pt", weights_only=False) \
                if (cache / "unfactorized.pt").is_file() else None
        result.timings["prune_s"] = s["seconds"]
        result.prune = PruneFacts.model_validate({**json.loads((cache / "facts.json").read_text()), "reused": True})
        return pruned, unfactorized
    evaluate = None
    if prune_eval:
        evaluate = torch_evaluator(recipe.model.inputs, prune_eval.eval, np.load(prune_eval.reference),
                                   recipe.data.metric, prune_eval.limit)
    keep: dict = {}
    with step(profile.name, "prune + recover") as s:
        pruned, facts = prune_model(copy.deepcopy(model), recipe.model.inputs, calib, recipe.prune,
                                    profile.prune.round_to, profile.name, evaluate, keep)
    result.timings["prune_s"] = s["seconds"]
    result.prune = PruneFacts.model_validate(facts)
    if cache is not None:
        import torch

        cache.mkdir(parents=True, exist_ok=True)
        torch.save(pruned, cache / "model.pt")
        if "unfactorized" in keep:
            torch.save(keep["unfactorized"], cache / "unfactorized.pt")
        (cache / "module.txt").write_text(type(model).__module__)
        (cache / "facts.json").write_text(json.dumps(facts))
    return pruned, keep.get("unfactorized")


# -- measure, time, ab ---------------------------------------------------------------------------------

def measure(job: MeasureJob) -> MeasureResult:
    from edgekit.backends import get_backend
    from edgekit.measure.bench import measure as run_measure

    backend = get_backend(job.backend)
    runtime = backend.RuntimeOptions(**job.runtime)
    with np.load(job.eval, allow_pickle=False) as z:
        n = min(len(z[job.inputs[0]]), job.limit)
        arrays = {k: z[k][:n] for k in job.inputs}
    samples = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n if job.verify else 1)]
    stats, outputs = run_measure(lambda: backend.load(Path(job.artifact), runtime), samples,
                                 warmup=job.warmup, runs=job.runs, bench=job.bench)
    if job.verify:
        np.save(job.outputs, outputs)
    from edgekit.measure.devices import unmeasurable_reason

    why = unmeasurable_reason("host", job.arch) or backend.unmeasurable_reason(runtime)
    return MeasureResult.model_validate({**stats, "unmeasurable": why})


def time_target(job: TimeJob) -> TimeResult:
    """Load every artifact of a target here, pin, warm up, then time them interleaved until stable."""
    from edgekit.backends import get_backend
    from edgekit.measure.timing import pin_to_free_cores, timed_interleaved

    backend = get_backend(job.backend)
    runtime = backend.RuntimeOptions(**job.runtime)
    threads = getattr(runtime, "threads", None)
    with np.load(job.eval, allow_pickle=False) as z:
        feed = {k: z[k][:1] for k in job.inputs}
    backend.import_runtime()  # import, then pin, then load: see pin_to_free_cores
    pinned = pin_to_free_cores(threads) if job.pin else None
    runners = {kind: backend.load(Path(path), runtime) for kind, path in job.artifacts.items()}
    res = timed_interleaved(runners, feed, threads=threads, warmup=job.warmup, per_round=job.per_round,
                            min_rounds=job.min_rounds, max_seconds=job.max_seconds, interval=job.interval,
                            pinned=pinned, baseline="fp32" if "fp32" in runners else None)
    return TimeResult.model_validate(res)


def ab(job: ABJob) -> ABResult:
    """Time the baseline's and the current artifact interleaved (``edgekit ci --baseline``)."""
    from edgekit.backends import get_backend
    from edgekit.measure.bench import ab_compare

    backend = get_backend(job.backend)
    runtime = backend.RuntimeOptions(**job.runtime)
    with np.load(job.eval, allow_pickle=False) as z:
        feed = {k: z[k][:1] for k in job.inputs}
    a = backend.load(Path(job.baseline), runtime)
    b = backend.load(Path(job.current), runtime)
    return ABResult.model_validate(ab_compare(a, b, feed, warmup=job.warmup, rounds=job.rounds,
                                              per_round=job.per_round))


def main(argv: list[str]) -> int:
    kind, job_path = argv
    spec = json.loads(Path(job_path).read_text())
    job_cls, _ = KINDS[kind]
    try:
        result = {"ok": True, "result": {"build": build, "measure": measure, "time": time_target, "ab": ab}[kind](
            job_cls.model_validate(spec["job"])).model_dump(mode="json")}
    except (InputError, TargetError) as e:
        result = {"ok": False, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - report anything else as the target's failure
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
