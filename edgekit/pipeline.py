"""The run: validate everything, then per target build -> verify -> benchmark, then write the report.

Nothing is written before the inputs are validated, and the output directory appears only when the
report is complete: work happens in ``<out>.partial`` and is renamed at the end (removed on error).
Each target's toolchain work runs in worker processes (``edgekit.worker``); a failed target becomes a
``failed`` row and the other targets still run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgekit import __version__, devices, gates, manifest, report
from edgekit.cache import Cache, Keys
from edgekit.bench import host_device, machine
from edgekit.errors import InputError, TargetError
from edgekit.progress import bar, say, step
from edgekit.profiles import Profile, load_profile, with_device
from edgekit.recipe import Recipe, load_recipe
from edgekit.verify import fidelity, score


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


def check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output directory {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise InputError(f"output directory {out}: not empty and not an earlier edgekit output; "
                         f"refusing to overwrite it (choose another --out)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise InputError(f"output directory {out}: not writable ({e.strerror or e})") from None


def run(recipe_path: str | Path, targets: Optional[Sequence[str]] = None,
        out: Optional[str | Path] = None, device: Optional[str] = None,
        cache: Optional[Cache] = None) -> dict:
    """Run the whole pipeline; return the report (also written to ``<out>/report.json``).
    ``cache``: see ``edgekit.cache`` (default: the user's cache, re-measuring cached builds)."""
    from edgekit.data import check_disjoint, load_calibration, load_evaluation
    from edgekit.model import check_forward, configure_torch, count_macs, count_params, example_inputs, \
        load_model, reference_outputs

    prep = prepare(recipe_path, targets, out, device)
    configure_torch()
    recipe = prep.recipe
    calib = load_calibration(recipe)
    evals = load_evaluation(recipe)
    check_disjoint(calib, evals)
    model = load_model(recipe)
    check_forward(model, recipe.model.inputs, evals.sample(0))
    cache = cache if cache is not None else Cache.open()
    keys = Keys.for_run(recipe, model, calib.path, evals.path) if cache.enabled else None

    staging = prep.out.with_name(prep.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "logs").mkdir(parents=True)
    try:
        with step("model", f"fp32 torch reference on {len(evals)} evaluation samples") as s:
            reference, hit = cache.array(keys.reference() if keys else "", lambda: reference_outputs(
                model, recipe.model.inputs, bar(evals, len(evals), "fp32 torch")))
            if hit:
                s["note"] = "cached; "
            fp32_metric = score(recipe.data.metric, reference, reference, evals.labels)
            s["note"] = s.get("note", "") + f"{recipe.data.metric} = {fp32_metric:.4f}"
        doc = {
            "schema": report.SCHEMA,
            "edgekit_version": __version__,
            "created": report.now(),
            "machine": machine(),
            "recipe": {"path": str(recipe.path), "sha256": recipe.digest()},
            "model": {"name": recipe.name, "source": recipe.model.source,
                      "params": count_params(model),
                      "macs": cache.value(keys.macs() if keys else "", lambda: count_macs(
                          model, example_inputs(recipe.model.inputs, evals.sample(0)))),
                      "inputs": [i.model_dump() for i in recipe.model.inputs]},
            "calibration": {"path": str(calib.path), "n": len(calib)},
            "eval": {"path": str(evals.path), "metric": recipe.data.metric, "n": len(evals),
                     "fp32_torch": round(fp32_metric, 6)},
            "targets": [],
        }
        del model
        for prof in prep.profiles:
            doc["targets"].append(run_target(prof, recipe, staging, reference, evals.labels, fp32_metric,
                                            cache=cache, keys=keys))
        doc["gates"] = gates.evaluate(recipe.gates, doc["targets"])
        shutil.rmtree(staging / "prune_cache", ignore_errors=True)
        doc["cache"] = {"enabled": cache.enabled, "root": str(cache.root) if cache.enabled else None,
                        "reuse_measurements": cache.reuse_measurements}
        manifest.write(doc, staging)
        report.write(doc, staging)
        _publish(staging, prep.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return doc


def run_target(prof: Profile, recipe: Recipe, staging: Path, reference: np.ndarray,
               labels: Optional[np.ndarray], fp32_metric: float, cache: Optional[Cache] = None,
               keys: Optional[Keys] = None) -> dict:
    from edgekit.backends import get_backend

    backend = get_backend(prof.backend)
    _, _, runtime = backend.options(prof)
    remote = prof.device.startswith("ssh:")  # verified here, timed there
    unmeasurable = devices.unmeasurable_reason(prof.device, prof.arch) or (
        None if remote else backend.unmeasurable_reason(runtime))
    row: dict = {"name": prof.name, "backend": prof.backend, "description": prof.description,
                 "device": devices.label(prof.device),
                 "status": "ok", "reason": None, "threads": getattr(runtime, "threads", None),
                 "versions": backend.versions(), "fp32": None, "optimized": None,
                 "speedup_p50": None, "size_ratio": None, "metric_drop": None}
    art_dir = staging / "artifacts" / prof.name
    work = staging / "work" / prof.name
    work.mkdir(parents=True, exist_ok=True)
    log = staging / "logs" / f"{prof.name}.log"
    try:
        cache = cache or Cache(None)
        ref_path = work / "reference.npy"  # the fp32 torch outputs the search and pruning score against
        np.save(ref_path, reference)
        job = {"recipe": str(recipe.path), "target": str(prof.path), "out": str(art_dir),
               "search": _search_job(prof, recipe, ref_path)}
        if recipe.prune is not None:  # the worker scores the pruned torch model against this reference
            job["prune_eval"] = {"eval": str(recipe.resolve(recipe.data.evaluation)),
                                 "reference": str(ref_path), "limit": len(reference),
                                 "cache": str(staging / "prune_cache")}
        build_key = keys.build(job, prof.path, row["versions"]) if keys else ""
        built, hit = cache.build(build_key, art_dir, lambda: _worker("build", job, work / "build", log))
        row["cache"] = {"key": build_key[:16] or None, "build": "hit" if hit else "miss", "measure": {}}
        if hit:
            say(f"[{prof.name}] build: cached ({cache.root}/builds/{build_key[:16]}...)")
        row["timings"] = built["timings"]
        for key in ("quantize_search", "prune"):
            if built.get(key):
                row[key] = built[key]
        # fp32 and optimized are the row's two sides; "extras" (e.g. an fp16 variant, or the unpruned
        # int8 artifact a pruned one is compared with) are verified and timed the same way.
        kinds = [(k, built[k]) for k in ("fp32", "optimized") if built.get(k)]
        kinds += sorted(built.get("extras", {}).items())
        for kind, art in kinds:
            say(f"[{prof.name}] verify + benchmark {kind} ({art['precision']})")
            mjob = {
                "backend": prof.backend, "artifact": art["path"], "runtime": runtime.model_dump(),
                "eval": str(recipe.resolve(recipe.data.evaluation)),
                "inputs": [i.name for i in recipe.model.inputs], "limit": len(reference),
                "warmup": prof.bench.warmup, "runs": prof.bench.runs, "bench": unmeasurable is None and not remote,
                "outputs": str(work / f"{kind}_outputs.npy")}
            mkey = keys.measure(build_key, kind, mjob, machine()) if keys else ""
            res, mhit = cache.measure(mkey, work / f"{kind}_outputs.npy",
                                      lambda: _worker("measure", mjob, work / f"measure_{kind}", log))
            row["cache"]["measure"][kind] = "reused" if mhit else "measured"
            outputs = np.load(work / f"{kind}_outputs.npy")
            verified_on = _on(host_device(), res.get("runtime_device"))
            if remote and unmeasurable is None:
                say(f"[{prof.name}] benchmark {kind} on {prof.device}")
                res = _time_remotely(prof, runtime, art["files"], recipe)
                row["device_info"] = res.pop("machine")
            side = row if kind in ("fp32", "optimized") else row.setdefault("extras", {})
            side[kind] = {
                "artifact": _rel(art["path"], staging), "files": [_rel(f, staging) for f in art["files"]],
                "size_bytes": sum(Path(f).stat().st_size for f in art["files"]),
                "precision": art["precision"], "details": art["details"],
                "metric": round(score(recipe.data.metric, outputs, reference, labels), 6),
                "fidelity": fidelity(outputs, reference),
                "latency_ms": res.get("latency_ms"), "latency_reason": unmeasurable,
                "load_ms": res["load_ms"], "peak_rss_mb": res["peak_rss_mb"], "io": res.get("io"),
                "verified_on": verified_on,
                "measured_on": None if unmeasurable else _on(row["device"], res.get("runtime_device")),
            }
        if built.get("optimized_error"):
            raise TargetError(built["optimized_error"])
        fp, op = row["fp32"], row["optimized"]
        row["metric_drop"] = round(fp32_metric - op["metric"], 6)
        row["size_ratio"] = round(op["size_bytes"] / fp["size_bytes"], 4)
        if fp["latency_ms"] and op["latency_ms"]:
            row["speedup_p50"] = round(fp["latency_ms"]["p50"] / op["latency_ms"]["p50"], 3)
        if row.get("prune"):
            report.prune_effect(row)
        _search_verdict(row)
        say(f"[{prof.name}] ok: {report.summary_line(row)}")
    except TargetError as e:
        row["status"], row["reason"] = "failed", str(e)
        say(f"[{prof.name}] FAILED: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def _on(device: str, runtime_device: Optional[str]) -> str:
    return f"{device} ({runtime_device})" if runtime_device else device


def _time_remotely(prof: Profile, runtime, files: list[str], recipe: Recipe) -> dict:
    from edgekit import remote

    with np.load(recipe.resolve(recipe.data.evaluation), allow_pickle=False) as z:
        feed = {i.name: z[i.name][:1] for i in recipe.model.inputs}
    return remote.benchmark(prof.device, files, feed, providers=list(runtime.providers), threads=runtime.threads,
                            warmup=prof.bench.warmup, runs=prof.bench.runs, python=prof.remote_python)


def _search_verdict(row: dict) -> None:
    """A search that found no artifact within the accuracy budget fails the target, with the best
    artifact's figures as measured by the measure worker (full evaluation set)."""
    qs = row.get("quantize_search")
    if not qs or qs["status"] == "ok":
        return
    lat = (row["optimized"]["latency_ms"] or {}).get("p50", qs["after"]["latency_ms"])
    row["budget_missed"] = True  # built, verified and timed: judged as a failed max_metric_drop gate, not a crash
    raise TargetError(f"accuracy budget not met (best drop {row['metric_drop']:.4f} at {lat:.2f} ms; "
                      f"max_metric_drop {qs['max_metric_drop']:g}; {len(qs['steps']) - 1} search steps in "
                      f"{qs['search_s']:.0f} s, stopped: {qs['stopped']})")


def _search_job(prof: Profile, recipe: Recipe, ref_path: Path) -> Optional[dict]:
    """The build job's accuracy-aware quantization settings (edgekit.quantize_search), or None: on by
    default where the target has a max_metric_drop gate, off with ``[quantize] search = false``."""
    max_drop = recipe.gates.for_target(prof.name).max_metric_drop
    q = recipe.quantize
    if q.search is False or max_drop is None:
        return None
    return {"reference": str(ref_path), "max_drop": max_drop, "time_budget_s": q.time_budget_s,
            "eval_samples": q.eval_samples, "max_steps": q.max_steps}


def _worker(kind: str, job: dict, stem: Path, log: Path) -> dict:
    """Run one worker process; stream its stderr to ours and to the target's log; return its result."""
    job = {**job, "result": str(stem) + ".result.json"}
    job_file = Path(str(stem) + ".job.json")
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail = b""
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "edgekit.worker", kind, str(job_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            for chunk in iter(lambda: proc.stderr.read1(4096), b""):
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                logf.write(chunk)
                tail = (tail + chunk)[-4000:]
            rc = proc.wait()
        except BaseException:
            proc.kill()
            raise
    result_path = Path(job["result"])
    if not result_path.is_file():
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        last = "\n".join(tail.decode(errors="replace").strip().splitlines()[-8:])
        raise TargetError(f"the {kind} worker crashed ({how}); last output:\n{last}")
    result = json.loads(result_path.read_text())
    if not result.pop("ok"):
        if "traceback" in result:
            with open(log, "a") as logf:
                logf.write(result["traceback"])
        raise TargetError(result["error"])
    return result


def _rel(path: str, root: Path) -> str:
    """Artifact paths in the report are relative to the output directory."""
    return Path(path).relative_to(root).as_posix()


def _publish(staging: Path, out: Path) -> None:
    """Replace ``out`` (an earlier edgekit output, checked in prepare) with the finished staging dir."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def confirm_latency(recipe: Recipe, row: dict, out: Path, baseline_report: Path, prev: dict,
                    repeats: int = 2) -> Optional[dict]:
    """Measure a suspected latency regression again (see ``edgekit.baseline``): the baseline's and the
    current optimized artifact interleaved when the baseline's artifact files are still next to its
    report, else the current one ``repeats`` times. None when it cannot (e.g. profile not found)."""
    from edgekit.backends import get_backend

    try:
        prof = load_profile(row["name"], recipe.root)
    except InputError:
        return None
    backend = get_backend(prof.backend)
    _, _, runtime = backend.options(prof)
    base_dir = Path(baseline_report)
    base_dir = base_dir if base_dir.is_dir() else base_dir.parent
    prev_files = [base_dir / f for f in (prev.get("optimized") or {}).get("files", [])]
    common = {"backend": prof.backend, "runtime": runtime.model_dump(),
              "eval": str(recipe.resolve(recipe.data.evaluation)), "inputs": [i.name for i in recipe.model.inputs],
              "warmup": prof.bench.warmup}
    current = str(Path(out) / row["optimized"]["artifact"])
    with tempfile.TemporaryDirectory(prefix="edgekit-confirm-") as tmp:
        log = Path(tmp) / "log"
        try:
            if prev_files and all(f.is_file() for f in prev_files):
                say(f"[{prof.name}] latency regression suspected: timing baseline and current artifact interleaved")
                res = _worker("ab", {**common, "baseline": str(base_dir / prev["optimized"]["artifact"]),
                                     "current": current, "rounds": 10, "per_round": max(prof.bench.runs // 10, 5)},
                              Path(tmp) / "ab", log)
                return {"method": "ab", "a": res["a"], "b": res["b"]}
            say(f"[{prof.name}] latency regression suspected: measuring the optimized artifact again")
            lats = []
            for i in range(repeats):
                res = _worker("measure", {**common, "artifact": current, "limit": 1, "runs": prof.bench.runs,
                                          "bench": True, "outputs": str(Path(tmp) / "outputs.npy")},
                              Path(tmp) / f"measure{i}", log)
                lats.append(res["latency_ms"])
            return {"method": "repeat", "latencies": lats}
        except TargetError as e:
            say(f"[{prof.name}] could not measure again: {e}")
            return None
