"""The run: validate everything, then per target build -> verify + benchmark -> judge, then the report.

Nothing is written before the inputs are validated, and the output directory appears only when the
report is complete: work happens in a private ``.<out>.partial-*`` folder, renamed at the end (removed on
error or signal). One run per output directory at a time (``<out>.lock``); edgekit replaces only folders
it wrote (``MARKER``), and keeps the one it replaces as ``<out>.prev``.
Each target's toolchain work runs in worker processes (``edgekit.orchestrate.worker``); a failed target becomes a
``failed`` row and the other targets still run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgekit import __version__
from edgekit.backends import get_backend
from edgekit.config.profiles import Profile, load_profile, with_device
from edgekit.config.recipe import Recipe, load_recipe
from edgekit.errors import InputError, TargetError
from edgekit.measure import devices
from edgekit.measure.machine import host_device, machine
from edgekit.measure.verify import fidelity, non_finite, score
from edgekit.progress import bar, say, step
from edgekit.release import gates
from edgekit.report import manifest, write as write_report
from edgekit.report.markdown import summary_line
from edgekit.report.schema import ArmCheck, ArtifactResult, EvalInfo, Machine, ModelInfo, Report, TargetRow, Timing
from edgekit.orchestrate.cache import Cache, Keys
from edgekit.orchestrate.jobs import (BuildJob, BuildResult, BuiltArtifact, MeasureJob, MeasureResult, PruneEval, SearchSpec,
                              TimeJob, TimeResult)
from edgekit.orchestrate.worker import run_in_worker


@dataclass
class Prepared:
    """Everything validated before any output is written."""

    recipe: Recipe
    profiles: list[Profile]
    out: Path


def prepare(recipe_path: str | Path, targets: Optional[Sequence[str]], out: Optional[str | Path],
            device: Optional[str] = None) -> Prepared:
    recipe = load_recipe(recipe_path)
    names = list(targets) if targets else recipe.targets
    profiles = [load_profile(n, recipe.root) for n in names]
    if device:
        profiles = [with_device(p, device) for p in profiles]
    out_dir = Path(out) if out else Path("runs") / recipe.name
    check_output_dir(out_dir)
    return Prepared(recipe, profiles, out_dir.resolve())


MARKER = ".edgekit-output"
"""Written into every output directory edgekit publishes: the only folders it will ever replace."""


def check_output_dir(out: Path) -> None:
    """``out`` may be new, empty, or an earlier edgekit output (it has ``MARKER``); so may ``out.prev``,
    where the earlier output goes when a new one is published. Anything else is refused, never deleted."""
    for d in (out, _prev(out)):
        if d.is_symlink():
            raise InputError(f"output directory {d}: is a symbolic link; refusing to write through it "
                             f"(give the real path)")
        if d.exists() and not d.is_dir():
            raise InputError(f"output directory {d}: exists and is not a directory")
        if d.is_dir() and any(d.iterdir()) and not (d / MARKER).is_file():
            raise InputError(f"output directory {d}: not empty and not an earlier edgekit output (no {MARKER} "
                             f"in it); refusing to overwrite it (choose another --out, or move it away)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise InputError(f"output directory {out}: not writable ({e.strerror or e})") from None


TORCH = threading.RLock()
"""Held while a recipe's model is built and run here: user model code (global RNG seeds, imports) is
not thread-safe, and a matrix on a cluster runs its recipes in threads."""


@dataclass
class _Run:
    """What every target of one run shares."""

    recipe: Recipe
    staging: Path
    reference: np.ndarray
    labels: Optional[np.ndarray]
    fp32_metric: float
    cache: Cache
    keys: Optional[Keys]
    executor: object = None
    """``edgekit.orchestrate.executor``: worker processes here, or Ray tasks on a cluster."""

    @property
    def here(self) -> bool:
        """Jobs run on this machine (measurement caches keyed by this machine apply)."""
        return _local(self.executor)

    def group(self, prof: Profile) -> str:
        from edgekit.orchestrate.executor import measure_group

        return measure_group(self.recipe.path, prof.name)


def run(recipe_path: str | Path, targets: Optional[Sequence[str]] = None,
        out: Optional[str | Path] = None, device: Optional[str] = None,
        cache: Optional[Cache] = None, executor=None) -> Report:
    """Run the whole pipeline; return the report (also written to ``<out>/report.json``).
    ``cache``: see ``edgekit.orchestrate.cache`` (default: the user's cache, re-measuring cached builds).
    ``executor``: ``edgekit.orchestrate.executor`` (default: worker processes here, one job at a time)."""
    from edgekit.inputs.data import check_disjoint, load_calibration, load_evaluation
    from edgekit.inputs.model import check_forward, configure_torch, load_model

    prep = prepare(recipe_path, targets, out, device)
    configure_torch()
    recipe = prep.recipe
    calib = load_calibration(recipe)
    evals = load_evaluation(recipe)
    check_disjoint(calib, evals)
    with TORCH:
        model = load_model(recipe)
        check_forward(model, recipe.model.inputs, evals.sample(0))
        cache = cache if cache is not None else Cache.open()
        keys = Keys.for_run(recipe, model, calib.path, evals.path) if cache.enabled else None

    with _lock(prep.out):
        return _run_locked(prep, recipe, calib, evals, model, cache, keys, executor)


def run_matrix(recipe_paths: Sequence[str | Path], targets: Optional[Sequence[str]] = None,
               out: Optional[str | Path] = None, device: Optional[str] = None, cache: Optional[Cache] = None,
               executor=None) -> tuple[list[dict], Path]:
    """Several recipes in one call: each gets its own output folder and report (``<out>/<model name>``,
    default ``runs/<model name>``); ``matrix.json`` + ``matrix.md`` in ``out`` (default ``runs``) hold one
    line per model x target. Recipes run one after the other here, all at once on a cluster. A recipe
    that fails (bad input, a crash) is an ``error`` line; the others still run. Returns the entries
    (``edgekit.report.matrix.rows``) and the summary's folder."""
    import time

    from edgekit.report import matrix

    parent = Path(out) if out else Path("runs")
    preps = [prepare(r, targets, None, device) for r in recipe_paths]  # every recipe checked before any runs
    seen: dict[str, str] = {}
    for r, p in zip(recipe_paths, preps):
        name = p.recipe.name
        if name in seen:
            raise InputError(f"{r}: model name {name!r} is also {seen[name]}'s; each recipe of a matrix writes "
                             f"<out>/<model name>: give one of them [model] name = \"...\"")
        seen[name] = str(r)
    outs = [parent / p.recipe.name for p in preps]
    for o in outs:
        check_output_dir(o)
    t0 = time.monotonic()

    def one(r, o) -> dict:
        start = time.monotonic()
        entry: dict = {"recipe": str(r), "out": str(o)}
        try:
            entry["report"] = run(r, targets, o, device, cache=cache, executor=executor)
        except (InputError, TargetError) as e:
            entry["error"] = str(e)
            say(f"[matrix] {r}: {e}")
        entry["seconds"] = time.monotonic() - start
        return entry

    calls = [lambda r=r, o=o: one(r, o) for r, o in zip(recipe_paths, outs)]
    entries = [c() for c in calls] if _local(executor) else concurrently(calls, executor)
    matrix.write(parent, entries, None if _local(executor) else executor.address, time.monotonic() - t0)
    return entries, parent


def _run_locked(prep: Prepared, recipe: Recipe, calib, evals, model, cache: Cache, keys, executor=None) -> Report:
    # A fresh, private (0700) staging folder per run, created (never followed) next to the output.
    staging = Path(tempfile.mkdtemp(prefix=f".{prep.out.name}.partial-", dir=prep.out.parent))
    (staging / "logs").mkdir()
    try:
        with TORCH:
            doc, reference, fp32_metric = _reference(recipe, calib, evals, model, cache, keys)
        del model
        shared = _Run(recipe, staging, reference, evals.labels, fp32_metric, cache, keys, executor)
        doc.targets = run_targets(prep.profiles, shared)
        if not shared.here:
            doc.cluster = executor.address
        doc.gates = gates.evaluate(recipe.gates, doc.targets)
        shutil.rmtree(staging / "prune_cache", ignore_errors=True)
        doc.cache = {"enabled": cache.enabled, "root": str(cache.root) if cache.enabled else None,
                     "reuse_measurements": cache.reuse_measurements}
        if prep.out.exists():
            doc.previous = str(_prev(prep.out))
        manifest.write(doc, staging)
        write_report(doc, staging)
        (staging / MARKER).write_text(json.dumps({"tool": "edgekit", "version": __version__,
                                                  "created": doc.created}) + "\n")
        _publish(staging, prep.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return doc


def _reference(recipe: Recipe, calib, evals, model, cache: Cache, keys) -> tuple[Report, np.ndarray, float]:
    """The fp32 torch outputs every artifact is judged against, and the report's head."""
    from edgekit import report
    from edgekit.inputs.model import count_macs, count_params, example_inputs, reference_outputs

    with step("model", f"fp32 torch reference on {len(evals)} evaluation samples") as s:
        reference, hit = cache.array(keys.reference() if keys else "", lambda: reference_outputs(
            model, recipe.model.inputs, bar(evals, len(evals), "fp32 torch")))
        _check_reference(recipe, reference, evals)
        fp32_metric = score(recipe.data.metric, reference, reference, evals.labels)
        s["note"] = ("cached; " if hit else "") + f"{recipe.data.metric} = {fp32_metric:.4f}"
    doc = Report(
        edgekit_version=__version__, created=report.now(), machine=Machine(**machine()),
        recipe={"path": str(recipe.path), "sha256": recipe.digest()},
        model=ModelInfo(name=recipe.name, source=recipe.model.source, params=count_params(model),
                        macs=cache.value(keys.macs() if keys else "", lambda: count_macs(
                            model, example_inputs(recipe.model.inputs, evals.sample(0)))),
                        inputs=[i.model_dump() for i in recipe.model.inputs]),
        calibration={"path": str(calib.path), "n": len(calib)},
        eval=EvalInfo(path=str(evals.path), metric=recipe.data.metric, n=len(evals),
                      fp32_torch=round(fp32_metric, 6)))
    return doc, reference, fp32_metric


def _check_reference(recipe: Recipe, reference: np.ndarray, evals) -> None:
    """The fp32 torch outputs every artifact is judged against: finite, and wide enough for the labels."""
    from edgekit.measure.verify import non_finite

    bad = non_finite(reference)
    if bad:
        raise InputError(f"{recipe.path}: model.source {recipe.model.source!r}: the fp32 PyTorch model gives {bad} "
                         f"of {evals.path}; nothing can be verified against that")
    if evals.labels is not None and recipe.data.metric == "top1":
        width = reference.shape[1] if reference.ndim == 2 else 1
        if int(evals.labels.max()) >= width:
            raise InputError(f"evaluation data {evals.path}: 'labels' holds class {int(evals.labels.max())} "
                             f"(sample {int(evals.labels.argmax())}), but the model's first output has {width} "
                             f"classes (0..{width - 1})")


def _local(executor) -> bool:
    return executor is None or executor.name == "local"


def run_targets(profiles: Sequence[Profile], shared: _Run) -> list[TargetRow]:
    """Every target's row: one after the other here; all at once on a cluster (its jobs queue on Ray)."""
    if shared.here or len(profiles) < 2:
        return [run_target(prof, shared) for prof in profiles]
    return concurrently([lambda p=p: run_target(p, shared) for p in profiles], shared.executor)


def concurrently(calls, executor) -> list:
    """Run ``calls`` in threads (each waits on its Ray tasks); Ctrl-C cancels the tasks in flight."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=len(calls))
    futures = [pool.submit(c) for c in calls]
    try:
        return [f.result() for f in futures]
    except BaseException:
        executor.cancel_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=False)


def run_target(prof: Profile, shared: _Run) -> TargetRow:
    """Build, verify every artifact, time them interleaved, judge. A TargetError makes the row ``failed``."""
    backend = get_backend(prof.backend)
    _, _, runtime = backend.options(prof)
    row = TargetRow(name=prof.name, backend=prof.backend, description=prof.description,
                    device=devices.label(prof.device), threads=getattr(runtime, "threads", None),
                    versions=backend.versions())
    work = shared.staging / "work" / prof.name
    work.mkdir(parents=True, exist_ok=True)
    log = shared.staging / "logs" / f"{prof.name}.log"
    try:
        built, build_key = _build(prof, shared, row, work, log)
        for kind, art in built.artifacts():
            row.add_artifact(kind, _measure(kind, art, prof, backend, runtime, shared, row, build_key, work, log))
        _arm_check(prof, backend, runtime, built, shared, row, work)
        _time(prof, backend, runtime, built, shared, row, build_key, work, log)
        if built.optimized_error:
            raise TargetError(built.optimized_error)
        _judge(row, shared.fp32_metric)
        say(f"[{prof.name}] ok: {summary_line(row)}")
    except TargetError as e:
        row.status, row.reason = "failed", str(e)
        say(f"[{prof.name}] FAILED: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def _build(prof: Profile, shared: _Run, row: TargetRow, work: Path, log: Path) -> tuple[BuildResult, str]:
    """The build worker's result for this target (from the cache when its inputs are unchanged)."""
    recipe = shared.recipe
    ref_path = work / "reference.npy"  # the fp32 torch outputs the search and pruning score against
    np.save(ref_path, shared.reference)
    job = BuildJob(recipe=str(recipe.path), target=str(prof.path), out=str(shared.staging / "artifacts" / prof.name),
                   search=_search_spec(prof, recipe, ref_path))
    if recipe.prune is not None:  # the worker scores the pruned torch model against this reference
        job.prune_eval = PruneEval(eval=str(recipe.resolve(recipe.data.evaluation)), reference=str(ref_path),
                                   limit=len(shared.reference), cache=str(shared.staging / "prune_cache"))
    key = shared.keys.build(job.identity(), prof.path, row.versions) if shared.keys else ""
    result, hit = shared.cache.build(key, Path(job.out), lambda: _run_job(
        shared, row, "build", job, work / "build", log).model_dump(mode="json"))
    built = BuildResult.model_validate(result)
    row.cache = {"key": key[:16] or None, "build": "hit" if hit else "miss", "measure": {}}
    if hit:
        say(f"[{prof.name}] build: cached ({shared.cache.root}/builds/{key[:16]}...)")
    row.timings = {**built.timings, **(row.timings or {})}
    row.quantize_search, row.prune = built.quantize_search, built.prune
    return built, key


def _measure(kind: str, art: BuiltArtifact, prof: Profile, backend, runtime, shared: _Run, row: TargetRow,
             build_key: str, work: Path, log: Path) -> ArtifactResult:
    """Verify one artifact on every evaluation sample, with its load time and memory, in a fresh worker
    process (load time and memory on the board for an ``ssh:`` device). Timing is ``_time``'s."""
    recipe = shared.recipe
    remote = prof.device.startswith("ssh:")  # verified here, timed there
    unplaced = None if prof.device != "host" else shared.executor and shared.executor.unplaceable(prof.resources)
    say(f"[{prof.name}] verify {kind} ({art.precision})")
    job = MeasureJob(backend=prof.backend, artifact=art.path, runtime=runtime.model_dump(),
                     eval=str(recipe.resolve(recipe.data.evaluation)), inputs=[i.name for i in recipe.model.inputs],
                     limit=len(shared.reference), warmup=prof.bench.warmup, runs=prof.bench.runs,
                     bench=False, outputs=str(work / f"{kind}_outputs.npy"),
                     arch=prof.arch if prof.device == "host" else None)
    # keyed by this machine: on a cluster the node that runs it may differ from run to run, so not kept
    key = shared.keys.measure(build_key, kind, job.identity(), machine()) if shared.keys and shared.here else ""
    okey = shared.keys.outputs(art.files, job.identity_of_outputs(), machine(), row.versions) \
        if shared.keys and shared.here else ""

    def measure() -> dict:
        known = bool(okey) and shared.cache.outputs(okey, Path(job.outputs))  # verified before: time only
        res = _run_job(shared, row, "measure", job.model_copy(update={"verify": not known}), work / f"measure_{kind}",
                       log, progress=f"[{prof.name}] verify {kind}",
                       measure_for=(shared.group(prof), {} if unplaced else prof.resources))
        if not known and okey:
            shared.cache.keep_outputs(okey, Path(job.outputs))
        row.cache["measure"][kind] = "timed (outputs cached)" if known else "measured"
        return res.model_dump(mode="json")

    res, hit = shared.cache.measure(key, Path(job.outputs), measure)
    measured = MeasureResult.model_validate(res)
    if hit:
        row.cache["measure"][kind] = "reused"
    outputs = np.load(job.outputs)
    bad = non_finite(outputs)
    if bad:
        raise TargetError(f"the {kind} artifact {art.path} gives {bad}: it cannot be trusted (nothing was timed)")
    unmeasurable = unplaced or (measured.unmeasurable if prof.device == "host" else
                                devices.unmeasurable_reason(prof.device, prof.arch))
    node = shared.executor.where(shared.group(prof)) if shared.executor else None
    if node and prof.device == "host":  # verified and timed on a cluster node: the report names it
        row.device = node_label(node)
        row.device_info = node["machine"]
    verified_on = _on(node_label(node) if node else host_device(), measured.runtime_device)
    if remote and unmeasurable is None:
        say(f"[{prof.name}] load {kind} on {prof.device}")
        timed = _remote(prof, backend, runtime, recipe, "benchmark", art.files, runs=1)
        row.device_info = timed.pop("machine")
        measured = MeasureResult.model_validate({**timed, "latency_ms": None})
    return ArtifactResult(
        artifact=_rel(art.path, shared.staging), files=[_rel(f, shared.staging) for f in art.files],
        size_bytes=sum(Path(f).stat().st_size for f in art.files), precision=art.precision, details=art.details,
        metric=round(score(recipe.data.metric, outputs, shared.reference, shared.labels), 6),
        fidelity=fidelity(outputs, shared.reference), latency_ms=measured.latency_ms, latency_reason=unmeasurable,
        load_ms=measured.load_ms, peak_rss_mb=measured.peak_rss_mb, io=measured.io, verified_on=verified_on,
        measured_on=None if unmeasurable else _on(row.device, measured.runtime_device))


def node_label(node: dict) -> str:
    return f"ray node {node['id'][:8]} at {node['ip']} ({node['hostname']}, {node['arch']})"


def _run_job(shared: _Run, row: TargetRow, kind: str, job, stem: Path, log: Path, progress: Optional[str] = None,
             measure_for: Optional[tuple[str, dict]] = None):
    """One job, through the run's executor (worker processes here by default). Its wall time (on a
    cluster: queueing and transfers included) adds up in ``row.timings["<kind>_job_s"]``."""
    import time

    start = time.monotonic()
    try:
        if shared.executor is None:
            return run_in_worker(kind, job, stem, log, progress)
        return shared.executor.run(kind, job, stem, log, progress, measure_for=measure_for)
    finally:
        row.timings = row.timings or {}
        row.timings[f"{kind}_job_s"] = round(row.timings.get(f"{kind}_job_s", 0) + time.monotonic() - start, 2)


def _arm_check(prof: Profile, backend, runtime, built: BuildResult, shared: _Run, row: TargetRow, work: Path) -> None:
    """For ``[verify] device = "qemu:<cpu>"``: the fp32 and optimized artifacts also run on that emulated
    aarch64 core (``edgekit.measure.arm``), compared with their host outputs on the same samples. Skipped,
    with the reason, where qemu is missing; the target fails when ARM and x86 disagree past the rule."""
    from edgekit.measure import aarch64, arm

    v = prof.verify
    if not v.device.startswith("qemu:"):
        return
    cpu, why = arm.cpu_of(v.device), arm.unavailable()
    if why:
        say(f"[{prof.name}] aarch64 check skipped: {why}")
    files = dict(built.artifacts())
    evals = None
    for kind in ("fp32", "optimized"):
        res = getattr(row, kind)
        if res is None or kind not in files:
            continue
        if why:
            res.arm = ArmCheck(status="skipped", device=v.device, reason=why, tolerance=v.tolerance)
            continue
        if evals is None:
            from edgekit.inputs.data import load_evaluation

            evals = list(load_evaluation(shared.recipe))
        host = np.load(work / f"{kind}_outputs.npy")
        budget = v.budget_s * (2 / 3 if kind == "optimized" else 1 / 3)  # what ships gets the larger share

        def check() -> dict:
            say(f"[{prof.name}] verify {kind} on aarch64 (qemu {cpu}), up to {budget:g} s of emulation")
            got = arm.run(backend, runtime, files[kind].files, evals, cpu, budget, f"[{prof.name}]")
            outs, n = got["outputs"], len(got["outputs"])
            labels = None if shared.labels is None else shared.labels[:n]
            return {**arm.compare(outs, host, shared.reference, v.tolerance, v.floor), "samples": n,
                    "metric": round(score(shared.recipe.data.metric, outs, shared.reference[:n], labels), 6),
                    "host_metric": round(score(shared.recipe.data.metric, host[:n], shared.reference[:n], labels), 6),
                    "runtime": got["runtime"], "seconds": got["seconds"]}

        key = shared.keys.arm(files[kind].files, v.model_dump(), aarch64.sysroot_key(), arm_runner_digest(backend),
                              row.versions) if shared.keys else ""
        import time

        start = time.monotonic()
        got = shared.cache.value(key, check) if key else check()
        row.timings = {**(row.timings or {}), "arm_check_s": round((row.timings or {}).get("arm_check_s", 0)
                                                                   + time.monotonic() - start, 2)}
        ok = got.pop("within_tolerance")
        res.arm = ArmCheck(status="ok" if ok else "failed", device=v.device, of=len(host), tolerance=v.tolerance,
                           floor=v.floor, **got)
        say(f"[{prof.name}] {kind} on aarch64 (qemu {cpu}): {got['samples']} of {len(host)} samples, "
            f"{shared.recipe.data.metric} {got['metric']:.4f} (host {got['host_metric']:.4f} on the same), "
            f"max |ARM - x86| {got['max_abs_diff']:.3g} ({got['relative_diff']:.2%} of the output range), "
            f"rms(ARM - x86) {got['noise_ratio']:.2f}x the artifact's own rms error")
        if not ok:
            res.arm.reason = (f"ARM and x86 disagree beyond what ARM's kernels' rounding explains: rms(ARM - x86) is "
                              f"{got['noise_ratio']:.2f}x the artifact's own rms error against fp32 (tolerance "
                              f"{v.tolerance:g}) and max |ARM - x86| {got['max_abs_diff']:.3g} is "
                              f"{got['relative_diff']:.2%} of the largest host output (floor {v.floor:.0%})")
            raise TargetError(f"the {kind} artifact on aarch64 (qemu {cpu}): {res.arm.reason}")
        res.verified_on = f"aarch64 (qemu {cpu}) on {got['samples']} of {len(host)} samples; {res.verified_on} on all"


def arm_runner_digest(backend) -> str:
    from edgekit.report.manifest import sha256

    return sha256(backend.remote_runner())


def _time(prof: Profile, backend, runtime, built: BuildResult, shared: _Run, row: TargetRow, build_key: str,
          work: Path, log: Path) -> None:
    """Time every measurable artifact of the target interleaved (``edgekit.measure.timing``): in one
    fresh worker process here, or in one process on the board for an ``ssh:`` device. Fills each
    artifact's ``latency_ms`` and the row's ``timing`` (rounds, speed-ups with their intervals, noise)."""
    from edgekit.measure.timing import from_blocks, merge_sessions, noise_reasons, ratio_summary, widen

    arts = dict(row.artifacts())
    kinds = [k for k, _ in built.artifacts() if k in arts and arts[k].latency_reason is None]
    if not kinds:
        return
    b, files = prof.bench, dict(built.artifacts())
    base = "fp32" if "fp32" in kinds else None
    if prof.device.startswith("ssh:"):
        say(f"[{prof.name}] benchmark {', '.join(kinds)} on {prof.device}, interleaved ({b.min_rounds} rounds)")
        timed = _remote(prof, backend, runtime, shared.recipe, "benchmark_interleaved",
                        {k: files[k].files for k in kinds}, rounds=b.min_rounds, per_round=b.per_round)
        res = {**from_blocks(timed["blocks"], base, b.interval), "conditions": {"threads": runtime.threads}}
        method = f"interleaved rounds in one process on {prof.device}"
    else:
        say(f"[{prof.name}] benchmark {', '.join(kinds)}: interleaved rounds in {b.sessions} fresh process(es) "
            f"until each speed-up's 95 % interval is within ±{b.interval:.0%} (at most {b.max_seconds:g} s)")
        recipe = shared.recipe
        job = TimeJob(backend=prof.backend, runtime=runtime.model_dump(), artifacts={k: files[k].path for k in kinds},
                      eval=str(recipe.resolve(recipe.data.evaluation)), inputs=[i.name for i in recipe.model.inputs],
                      warmup=b.warmup, per_round=b.per_round, min_rounds=b.min_rounds, max_seconds=b.max_seconds,
                      interval=b.interval, pin=b.pin)
        key = shared.keys.measure(build_key, "timing", {**job.identity(), "sessions": b.sessions},
                                  machine()) if shared.keys and shared.here else ""
        share = job.model_copy(update={"max_seconds": b.max_seconds / b.sessions})
        place = (shared.group(prof), {} if shared.executor and shared.executor.unplaceable(prof.resources)
                 else prof.resources)

        def sessions() -> dict:
            done = [_run_job(shared, row, "time", share, work / f"time{i}", log,
                             progress=f"[{prof.name}] benchmark, process {i + 1}/{b.sessions}",
                             measure_for=place).model_dump(mode="json")
                    for i in range(b.sessions)]
            return merge_sessions(done, base, b.interval)

        res, hit = shared.cache.measure(key, None, sessions)
        if hit:
            row.cache["measure"]["timing"] = "reused"
        method = ("interleaved rounds in one process" if b.sessions == 1 else
                  f"interleaved rounds in each of {b.sessions} fresh processes, pooled")
        node = shared.executor.where(shared.group(prof)) if shared.executor else None
        if node:
            method += f", on {node_label(node)}"
    timed = TimeResult.model_validate(res)
    noise = noise_reasons(timed.conditions, timed.stable, timed.stopped)
    floor = b.noisy_floor if noise else b.floor  # intervals at least ±floor wide (BenchSettings)
    for kind, lat in timed.latency.items():
        arts[kind].latency_ms = lat.model_copy(update={"ci": widen(lat.ci, lat.p50, floor)} if lat.ci else {})
    speedups = {k: ratio_summary(timed.latency[base].rounds_p50, timed.latency[k].rounds_p50)
                for k in kinds if base and k != base}
    for s in speedups.values():
        s["ci_rounds"], s["ci"] = s["ci"], widen(s["ci"], s["median"], floor)
    row.timing = Timing(method=method, rounds=timed.rounds, stopped=timed.stopped, stable=timed.stable,
                        seconds=timed.seconds, noisy=bool(noise), noise=noise, speedups=speedups,
                        conditions=timed.conditions)
    if noise:
        say(f"[{prof.name}] WARNING: noisy timing ({'; '.join(noise)}): speed-ups carry wider intervals")


def _judge(row: TargetRow, fp32_metric: float) -> None:
    """The row's comparisons (drop, size ratio, speed-up, pruning's effect) and the search's verdict."""
    fp, op = row.fp32, row.optimized
    row.metric_drop = round(fp32_metric - op.metric, 6)
    row.size_ratio = round(op.size_bytes / fp.size_bytes, 4)
    s = row.timing.speedups.get("optimized") if row.timing else None
    if s:  # median of the per-round ratios, with its interval
        row.speedup_p50, row.speedup_ci = round(s["median"], 3), s["ci"]
    elif fp.p50 and op.p50:
        row.speedup_p50 = round(fp.p50 / op.p50, 3)
    if row.prune is not None:
        _prune_effect(row)
    qs = row.quantize_search
    if qs is not None and qs.status != "ok":
        # Built, verified and timed: judged as a failed max_metric_drop gate, not a crash.
        row.budget_missed = True
        lat = op.p50 if op.p50 is not None else qs.after["latency_ms"]
        raise TargetError(f"accuracy budget not met (best drop {row.metric_drop:.4f} at {lat:.2f} ms; "
                          f"max_metric_drop {qs.max_metric_drop:g}; {len(qs.steps) - 1} search steps in "
                          f"{qs.search_s:.0f} s, stopped: {qs.stopped})")


def _prune_effect(row: TargetRow) -> None:
    """What pruning did on this target's runtime: the metric after quantization, and the latency of the
    pruned int8 artifact vs the unpruned int8 one (extra ``int8_unpruned``, same quantization options)."""
    pr, op = row.prune, row.optimized
    pr.metric_after_quantize = op.metric
    base = (row.extras or {}).get("int8_unpruned")
    if base:
        pr.int8_unpruned_metric = base.metric
        if base.p50 and op.p50:
            pr.latency_p50_ms = {"int8_unpruned": base.p50, "pruned_int8": op.p50}
            pr.speedup_vs_int8_unpruned = round(base.p50 / op.p50, 3)
            if base.latency_ms.rounds_p50 and op.latency_ms.rounds_p50:  # timed in the same rounds
                from edgekit.measure.timing import ratio_summary

                s = ratio_summary(base.latency_ms.rounds_p50, op.latency_ms.rounds_p50)
                pr.speedup_vs_int8_unpruned, pr.speedup_vs_int8_unpruned_ci = round(s["median"], 3), s["ci"]
    if pr.low_rank:  # what factorization alone adds: vs the pruned unfactorized int8 (or the unpruned one)
        ref_name = "int8_unfactorized" if "int8_unfactorized" in (row.extras or {}) else "int8_unpruned"
        ref = (row.extras or {}).get(ref_name)
        if ref is not None:
            pr.low_rank["reference"], pr.low_rank["reference_metric"] = ref_name, ref.metric
            if ref.p50 and op.p50:
                pr.low_rank["latency_p50_ms"] = {"unfactorized_int8": ref.p50, "factorized_int8": op.p50}
                pr.low_rank["speedup_vs_unfactorized_int8"] = round(ref.p50 / op.p50, 3)
                if ref.latency_ms.rounds_p50 and op.latency_ms.rounds_p50:
                    from edgekit.measure.timing import ratio_summary

                    s = ratio_summary(ref.latency_ms.rounds_p50, op.latency_ms.rounds_p50)
                    pr.low_rank["speedup_vs_unfactorized_int8"] = round(s["median"], 3)
                    pr.low_rank["speedup_vs_unfactorized_int8_ci"] = s["ci"]


def _on(device: str, runtime_device: Optional[str]) -> str:
    return f"{device} ({runtime_device})" if runtime_device else device


def _remote(prof: Profile, backend, runtime, recipe: Recipe, how: str, files, **kw) -> dict:
    """``edgekit.measure.remote.<how>`` on the profile's board, with the first evaluation sample."""
    from edgekit.measure import remote

    with np.load(recipe.resolve(recipe.data.evaluation), allow_pickle=False) as z:
        feed = {i.name: z[i.name][:1] for i in recipe.model.inputs}
    return getattr(remote, how)(prof.device, files, feed, runner=backend.remote_runner(),
                                settings=backend.remote_settings(runtime), warmup=prof.bench.warmup,
                                python=prof.remote_python, **kw)


def _search_spec(prof: Profile, recipe: Recipe, ref_path: Path) -> Optional[SearchSpec]:
    """The build job's accuracy-aware quantization settings (edgekit.quantize.search), or None: on by
    default where the target has a max_metric_drop gate, off with ``[quantize] search = false``."""
    max_drop = recipe.gates.for_target(prof.name).max_metric_drop
    q = recipe.quantize
    if q.search is False or max_drop is None:
        return None
    return SearchSpec(reference=str(ref_path), max_drop=max_drop, time_budget_s=q.time_budget_s,
                      eval_samples=q.eval_samples, max_steps=q.max_steps, distill_steps=q.distill_steps,
                      distill_lr=q.distill_lr)


def _rel(path: str, root: Path) -> str:
    """Artifact paths in the report are relative to the output directory."""
    return Path(path).relative_to(root).as_posix()


def _prev(out: Path) -> Path:
    return out.with_name(out.name + ".prev")


def _publish(staging: Path, out: Path) -> None:
    """Put the finished staging dir at ``out``. An earlier output there (checked in prepare) is kept as
    ``out.prev`` (replacing the one before it), so a failed target never loses the last good output."""
    if out.exists():
        prev = _prev(out)
        check_output_dir(out)  # again: the folders may have changed while the run ran
        if prev.exists():
            shutil.rmtree(prev)
        out.rename(prev)
    staging.rename(out)


@contextmanager
def _lock(out: Path):
    """One run per output directory: ``out.lock`` holds the pid; a lock whose process is gone is stale
    and taken over."""
    lock = out.with_name(out.name + ".lock")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise InputError(f"output directory {out}: another edgekit run (pid {pid}) is writing it "
                                 f"(lock {lock}); wait for it or choose another --out") from None
            lock.unlink(missing_ok=True)  # stale: its run is gone
    else:
        raise InputError(f"output directory {out}: cannot take the lock {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
