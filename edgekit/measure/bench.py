"""The latency harness every backend shares: timed calls, their statistics, interleaved A/B timing.

``measure`` runs in its own process per artifact (see ``edgekit.orchestrate.worker``), so peak RSS is that
artifact's runtime footprint (interpreter + runtime + model), comparable between fp32 and optimized.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.progress import bar


def latency_stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p90": round(float(np.percentile(ms, 90)), 4),
        "p99": round(float(np.percentile(ms, 99)), 4),
        "mean": round(float(ms.mean()), 4),
        "min": round(float(ms.min()), 4),
        "std": round(float(ms.std()), 4),
        # spread for noise-aware baseline comparison (edgekit.release.baseline): MAD and quartiles
        "mad": round(float(np.median(np.abs(ms - np.median(ms)))), 4),
        "q1": round(float(np.percentile(ms, 25)), 4),
        "q3": round(float(np.percentile(ms, 75)), 4),
        "n": int(ms.size),
    }


def time_calls(fn: Callable[[], object], warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in bar(range(runs), runs, "benchmark"):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process image. VmHWM, not ru_maxrss: ru_maxrss survives execve and
    so includes the high-water mark of the (torch-loaded) parent this worker was forked from."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # other OSes


def measure(load: Callable[[], object], samples, *, warmup: int, runs: int,
            bench: bool = True) -> tuple[dict, np.ndarray]:
    """Load an artifact, run every sample (outputs for verification), then time sample 0.

    ``samples`` is a list of feeds, or a function of the loaded runner that returns one.
    Returns (stats, outputs) where outputs is (N, D): the first output flattened per sample."""
    t0 = time.perf_counter()
    runner = load()
    load_ms = (time.perf_counter() - t0) * 1e3
    if callable(samples):
        samples = samples(runner)
    outs = [np.asarray(runner.run(s)[0]).reshape(-1) for s in bar(samples, len(samples), "verify")]
    stats: dict = {"load_ms": round(load_ms, 2), "runtime_device": getattr(runner, "device", None)}
    try:
        stats["io"] = runner.signature()
    except Exception:  # noqa: BLE001 - a signature is documentation; never fail a target over it
        stats["io"] = None
    if bench:
        stats["latency_ms"] = latency_stats(time_calls(lambda: runner.run(samples[0]), warmup, runs))
    stats["peak_rss_mb"] = peak_rss_mb()
    return stats, np.stack(outs).astype(np.float32)


def interleaved(runners: dict, feed, *, warmup: int, rounds: int = 10, per_round: int = 20) -> dict:
    """Time loaded artifacts interleaved: ``rounds`` rounds, each running every artifact for ``per_round``
    calls in a rotating order, so whatever else the machine does hits all of them alike (the fixed-round
    form of ``edgekit.measure.timing.rounds``). Returns, per name, its latency stats over all calls, the
    p50 of each round (``rounds_p50``) and their interval (``ci``), so a ratio can be taken round by round."""
    from edgekit.measure import timing

    for runner in runners.values():
        for _ in range(warmup):
            runner.run(feed)

    def block(name: str, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            runners[name].run(feed)
            out.append(time.perf_counter() - t0)
        return out

    res = timing.rounds(block, list(runners), per_round=per_round, min_rounds=rounds, max_rounds=rounds)
    return {n: timing.latency_of(res["times"][n], res["rounds_p50"][n]) for n in runners}


def ab_compare(runner_a, runner_b, feed, *, warmup: int, rounds: int = 10, per_round: int = 20) -> dict:
    """Time two loaded artifacts interleaved (``interleaved``: alternating blocks, order flipped every
    round). Returns each side's latency stats and ``ratio_p50`` = p50(B) / p50(A)."""
    res = interleaved({"a": runner_a, "b": runner_b}, feed, warmup=warmup, rounds=rounds, per_round=per_round)
    return {"a": res["a"], "b": res["b"], "ratio_p50": round(res["b"]["p50"] / res["a"]["p50"], 4)}
