"""Timing you can trust on a shared machine: interleaved rounds, a confidence interval on every ratio,
the conditions recorded and noise flagged.

The artifacts of a target (fp32, optimized, extras) are loaded in one process and timed in rounds; in
each round every artifact runs ``per_round`` calls, in an order that rotates and flips from round to
round, so load that comes and goes hits every side alike. A round gives each artifact one p50, and each
speed-up one ratio (fp32 p50 / artifact p50 of the same round). The reported speed-up is the median of
those ratios, with a distribution-free confidence interval from order statistics (``median_ci``).
Rounds are added until every interval is within ``±rel_halfwidth`` of its median (``stable``) or the
time cap is hit (``time cap``); the report says which. A target is timed in ``sessions`` fresh
processes whose rounds are pooled (``merge_sessions``): how a process lays the models out in memory
moves a speed-up by a few percent, and the interval has to show that too.

The noise check (``noise_reasons``) reads what the OS says about the timed stretch: CPU used by other
processes (``/proc/stat`` busy time minus this process's own), hypervisor steal, load average, CPU
frequency. Those numbers and the verdict go into report.json (``TargetRow.timing``).
"""
from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
OTHERS_CPU_NOISY = 0.25
"""Cores' worth of CPU used by other processes during timing above which a run is flagged noisy."""
STEAL_NOISY = 0.05
CPU_SHARE_NOISY = 0.90
"""With one compute thread: the timed calls' CPU time / wall time below which the run is flagged noisy."""
FREQ_CHANGE_NOISY = 0.10


# -- interval arithmetic --------------------------------------------------------------------------------

def median_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """(median, low, high, achieved confidence) of ``values``.

    The interval is ``[x_(k), x_(n+1-k)]`` (sorted, 1-based) with the largest ``k`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) <= k - 1)`` is still at least ``confidence``: exact for the median of any
    continuous distribution, no assumption of normality. With too few values for that confidence
    (n < 6 at 95 %) it is ``[min, max]`` and the achieved coverage is returned as it is."""
    x = np.sort(np.asarray(values, dtype=float))
    n = x.size
    if n == 0:
        raise ValueError("median_ci of no values")
    med = float(np.median(x))
    if n == 1:
        return med, med, med, 0.0
    k, cover = 1, _coverage(n, 1)
    while k + 1 <= n // 2 and _coverage(n, k + 1) >= confidence:
        k += 1
        cover = _coverage(n, k)
    return med, float(x[k - 1]), float(x[n - k]), cover


def _coverage(n: int, k: int) -> float:
    tail = sum(math.comb(n, i) for i in range(k)) / 2.0 ** n
    return 1.0 - 2.0 * tail


def widen(ci: list[float], med: float, floor: float) -> list[float]:
    """The interval, at least ``±floor`` of ``med`` wide (``[bench] floor``)."""
    return [round(min(ci[0], med * (1 - floor)), 4), round(max(ci[1], med * (1 + floor)), 4)]


def ratio_summary(base_rounds: Sequence[float], other_rounds: Sequence[float]) -> dict:
    """Speed-up of ``other`` over ``base`` from per-round p50s: median of the per-round ratios and its
    interval."""
    ratios = [b / o for b, o in zip(base_rounds, other_rounds) if o > 0]
    med, lo, hi, cover = median_ci(ratios)
    return {"median": round(med, 4), "ci": [round(lo, 4), round(hi, 4)], "confidence": round(cover, 4),
            "rounds": len(ratios)}


# -- the rounds ---------------------------------------------------------------------------------------------

def warm_up(run_once: Callable[[], float], min_calls: int, max_calls: int = 200, group: int = 5,
            tolerance: float = 0.05) -> int:
    """Run at least ``min_calls`` calls, then groups of ``group`` until a group's median is within
    ``tolerance`` of the previous group's (the first-call outliers are gone) or ``max_calls``.
    ``run_once`` returns one call's seconds. Returns the number of calls made."""
    calls = 0
    for _ in range(min_calls):
        run_once()
        calls += 1
    prev = None
    while calls < max_calls:
        cur = float(np.median([run_once() for _ in range(group)]))
        calls += group
        if prev is not None and abs(cur - prev) <= tolerance * prev:
            break
        prev = cur
    return calls


def rounds(run_block: Callable[[str, int], list[float]], names: Sequence[str], *, per_round: int,
           min_rounds: int, max_rounds: int = 400, max_seconds: float = float("inf"),
           baseline: Optional[str] = None, rel_halfwidth: float = 0.05,
           clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time ``names`` in interleaved rounds until stable or capped.

    ``run_block(name, n)`` runs ``n`` calls of one artifact and returns their seconds. The stopping
    rule looks at the speed-up of each other artifact over ``baseline`` (the fp32 one), or at each
    artifact's own per-round p50 when there is no baseline. Returns ``{"times": {name: [s, ...]},
    "rounds_p50": {name: [ms per round]}, "rounds": n, "stopped": why, "seconds": wall}``."""
    names = list(names)
    times: dict[str, list[float]] = {n: [] for n in names}
    blocks: dict[str, list[list[float]]] = {n: [] for n in names}
    per: dict[str, list[float]] = {n: [] for n in names}
    t0 = clock()
    stopped, stable = f"max rounds ({max_rounds})", False
    for r in range(max_rounds):
        shift = (r // 2) % len(names)  # rotate every other round, flip in between: ABBA for two
        order = names[shift:] + names[:shift]
        for name in (order if r % 2 == 0 else order[::-1]):
            block = run_block(name, per_round)
            times[name] += block
            blocks[name].append(block)
            per[name].append(float(np.median(block)) * 1e3)
        done = r + 1
        if done >= min_rounds:
            widest = _widest(per, baseline)
            if widest <= rel_halfwidth:
                stable = True
                stopped = f"stable: every interval within ±{widest:.1%} of its median after {done} rounds"
                break
            if clock() - t0 >= max_seconds:
                stopped = (f"time cap ({max_seconds:g} s) after {done} rounds; widest interval ±{widest:.1%} "
                           f"of its median (wanted ±{rel_halfwidth:.0%})")
                break
    return {"times": times, "blocks": blocks, "rounds_p50": per, "rounds": len(next(iter(per.values()))),
            "stopped": stopped, "stable": stable, "seconds": round(clock() - t0, 3)}


def _widest(per: dict[str, list[float]], baseline: Optional[str]) -> float:
    """The largest relative half-width among the intervals the stopping rule watches."""
    if baseline is not None and len(per) > 1:
        series = [[b / o for b, o in zip(per[baseline], per[n])] for n in per if n != baseline]
    else:
        series = list(per.values())
    worst = 0.0
    for s in series:
        med, lo, hi, _ = median_ci(s)
        worst = max(worst, (med - lo) / med, (hi - med) / med)
    return worst


def timed_interleaved(runners: dict, feed, *, threads: Optional[int], warmup: int, per_round: int,
                      min_rounds: int, max_seconds: float, interval: float, pinned: Optional[list[int]] = None,
                      baseline: Optional[str] = None, max_rounds: int = 400) -> dict:
    """Warm every loaded runner up, time them in interleaved rounds (``rounds``) with the conditions
    recorded. Returns the ``edgekit.orchestrate.jobs.TimeResult`` fields. ``pinned``: the cores
    ``pin_to_free_cores`` chose, called BEFORE the runners were loaded, so that the threads a runtime
    starts (OpenVINO's streams, thread pools) inherit the affinity."""

    cpu = {name: 0.0 for name in runners}  # process CPU seconds spent in the timed calls, per artifact

    def once(runner) -> float:
        t = time.perf_counter()
        runner.run(feed)
        return time.perf_counter() - t

    def block(name: str, n: int) -> list[float]:
        c = time.process_time()
        out = [once(runners[name]) for _ in range(n)]
        cpu[name] += time.process_time() - c
        return out

    warm = {name: warm_up(lambda r=r: once(r), warmup) for name, r in runners.items()}
    before = snapshot()
    res = rounds(block, list(runners), per_round=per_round, min_rounds=min_rounds, max_rounds=max_rounds,
                 max_seconds=max_seconds, baseline=baseline, rel_halfwidth=interval)
    cond = conditions(before, snapshot())
    from edgekit.progress import note

    note(f"{res['rounds']} rounds in {res['seconds']:.1f} s, {res['stopped'].split(' after')[0]}")
    latency = {name: latency_of(res["times"][name], res["rounds_p50"][name]) for name in runners}
    # CPU time / wall time of the timed calls: below 1 the process waited for its core (preempted); with
    # one compute thread that is time another process took, and it lengthens long calls more than short ones
    cond["cpu_share"] = {name: round(cpu[name] / max(sum(res["times"][name]), 1e-12), 3) for name in runners}
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cond.update(threads=threads, affinity=affinity, pinned=pinned is not None, per_round=per_round)
    return {"latency": latency, "blocks": res["blocks"], "rounds": res["rounds"], "stopped": res["stopped"],
            "stable": res["stable"],
            "seconds": res["seconds"], "warmup_calls": warm, "conditions": cond}


def latency_of(times: list[float], rounds_p50: list[float]) -> dict:
    """One artifact's ``Latency``: stats over all timed calls, each round's p50 and their interval."""
    from edgekit.measure.bench import latency_stats

    _, lo, hi, _ = median_ci(rounds_p50)
    return {**latency_stats(times), "ci": [round(lo, 4), round(hi, 4)],
            "rounds_p50": [round(x, 4) for x in rounds_p50]}


def from_blocks(blocks: dict[str, list[list[float]]], baseline: Optional[str], interval: float) -> dict:
    """The ``timed_interleaved`` answer for rounds timed elsewhere (a board): ``blocks`` holds, per
    artifact, one list of call seconds per round."""
    per = {n: [float(np.median(b)) * 1e3 for b in bl] for n, bl in blocks.items()}
    widest = _widest(per, baseline)
    n = len(next(iter(per.values())))
    return {"latency": {k: latency_of([t for b in bl for t in b], per[k]) for k, bl in blocks.items()},
            "rounds": n, "stable": widest <= interval,
            "stopped": f"{n} rounds on the device; widest interval ±{widest:.1%} of its median", "seconds": 0.0}


def merge_sessions(sessions: list[dict], baseline: Optional[str], interval: float) -> dict:
    """Pool the rounds of several fresh timing processes (``TimeResult`` dicts with ``blocks``) into one
    answer. Each process lays its models out in memory anew, which moves a speed-up by a few percent
    from process to process, more than the interval of one process shows; pooling puts that spread
    into the interval."""
    if len(sessions) == 1:
        return sessions[0]
    kinds = list(sessions[0]["blocks"])
    pooled = from_blocks({k: [b for s in sessions for b in s["blocks"][k]] for k in kinds}, baseline, interval)
    widest = pooled["stopped"].split("widest interval ")[1].split(" of")[0]
    conds = [s.get("conditions") or {} for s in sessions]

    def worst(key, pick):
        vals = [c[key] for c in conds if c.get(key) is not None]
        return pick(vals) if vals else None

    cond = {**conds[-1], "load_before": conds[0].get("load_before"), "others_cpu": worst("others_cpu", max),
            "steal": worst("steal", max), "freq_mhz_before": conds[0].get("freq_mhz_before"),
            "affinity": [c.get("affinity") for c in conds], "pinned": all(c.get("pinned") for c in conds),
            "cpu_share": {k: min((c.get("cpu_share") or {}).get(k, 1.0) for c in conds) for k in kinds},
            "sessions": len(sessions)}
    each = "; ".join(f"{s['rounds']} ({s['stopped'].split(':')[0]})" for s in sessions)
    return {**pooled, "blocks": {}, "seconds": round(sum(s["seconds"] for s in sessions), 3),
            "warmup_calls": sessions[0].get("warmup_calls", {}), "conditions": cond,
            "stopped": (f"{len(sessions)} fresh processes, rounds {each}; pooled: widest interval {widest} of its "
                        f"median" + ("" if pooled["stable"] else f" (wanted ±{interval:.0%})"))}


# -- conditions and noise -----------------------------------------------------------------------------------

def _cpu_ticks() -> Optional[dict]:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    v = [int(x) for x in first[1:]]
    v += [0] * (8 - len(v))
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return {"busy": user + nice + system + irq + softirq, "steal": steal,
            "total": user + nice + system + idle + iowait + irq + softirq + steal}


def _freqs_mhz() -> list[float]:
    out = []
    for f in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        try:
            out.append(int(f.read_text()) / 1000.0)
        except (OSError, ValueError):
            pass
    return out


def governor() -> Optional[str]:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor").read_text().strip()
    except OSError:
        return None


def snapshot() -> dict:
    """What the OS says now: /proc/stat ticks, this process's CPU seconds, load average, frequencies."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"wall": time.perf_counter(), "ticks": _cpu_ticks(), "own_cpu_s": ru.ru_utime + ru.ru_stime,
            "load": load, "freq_mhz": _freqs_mhz()}


def conditions(before: dict, after: dict) -> dict:
    """The timed stretch's conditions from two ``snapshot()``s."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    out: dict = {"load_before": _round(before["load"]), "load_after": _round(after["load"]),
                 "others_cpu": None, "steal": None, "freq_mhz_before": _span(before["freq_mhz"]),
                 "freq_mhz_after": _span(after["freq_mhz"]), "governor": governor()}
    tb, ta = before["ticks"], after["ticks"]
    if tb and ta:
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy_s = (ta["busy"] - tb["busy"]) / hz
        own_s = after["own_cpu_s"] - before["own_cpu_s"]
        out["others_cpu"] = round(max(busy_s - own_s, 0.0) / wall, 3)  # cores' worth, averaged over the stretch
        total = ta["total"] - tb["total"]
        out["steal"] = round((ta["steal"] - tb["steal"]) / total, 4) if total > 0 else 0.0
    return out


def _round(xs):
    return [round(x, 2) for x in xs] if xs else None


def _span(xs: list[float]) -> Optional[list[float]]:
    return [round(min(xs)), round(max(xs))] if xs else None


def noise_reasons(cond: dict, stable: bool, stopped: str) -> list[str]:
    """Why a timing is noisy (empty: it is not): an interval still wide at the cap, other processes using
    CPU, hypervisor steal, a frequency that moved."""
    why = []
    if not stable:
        why.append(f"interval still wide: {stopped}")
    shares = cond.get("cpu_share") or {}
    if shares and (cond.get("threads") or 1) == 1 and min(shares.values()) < CPU_SHARE_NOISY:
        low = min(shares, key=shares.get)
        why.append(f"the timed process had its core {shares[low]:.0%} of the time while timing {low} "
                   f"(preempted by other processes)")
    others = cond.get("others_cpu")
    if others is not None and others > OTHERS_CPU_NOISY:
        why.append(f"other processes used {others:.2f} cores during timing")
    steal = cond.get("steal")
    if steal is not None and steal > STEAL_NOISY:
        why.append(f"CPU steal {steal:.1%} during timing")
    fb, fa = cond.get("freq_mhz_before"), cond.get("freq_mhz_after")
    if fb and fa and abs(fa[0] - fb[0]) > FREQ_CHANGE_NOISY * fb[0]:
        why.append(f"CPU frequency moved {fb[0]:.0f} -> {fa[0]:.0f} MHz")
    return why


# -- pinning ----------------------------------------------------------------------------------------------

def pin_to_free_cores(threads: Optional[int]) -> Optional[list[int]]:
    """Pin this process to the ``threads`` least busy cores when there are more cores than that (the
    timed process then does not migrate, and keeps away from a core another process holds). Returns the
    affinity (None: left as it was).

    Call it after the runtime is imported and before the artifacts are loaded; it pins every thread
    that exists then, and threads started later inherit it. Each half of that order was measured:
    ONNX Runtime imported in a process already pinned to one core ran the demo's int8 model 30 %
    slower (8.5 vs 6.4 ms, fp32 unchanged), and OpenVINO models compiled before pinning (their
    inference threads then forced onto the caller's core) read 0.44x in busy runs."""
    if not hasattr(os, "sched_setaffinity") or not threads:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= threads:
        return None
    busy = _per_core_busy(allowed)
    chosen = sorted(sorted(allowed, key=lambda c: busy.get(c, 0.0))[:threads])
    try:
        for tid in _threads():  # every thread the runtimes have started, and the ones they start later
            os.sched_setaffinity(tid, chosen)
    except OSError:
        return None
    return chosen


def _threads() -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        return [0]


def _per_core_busy(cores: list[int], window_s: float = 0.2) -> dict[int, float]:
    def read() -> dict[int, tuple[int, int]]:
        out = {}
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("cpu") and line[3:4].isdigit():
                    parts = line.split()
                    v = [int(x) for x in parts[1:9]] + [0] * 8
                    out[int(parts[0][3:])] = (v[0] + v[1] + v[2] + v[5] + v[6], sum(v[:8]))
        except OSError:
            pass
        return out

    a = read()
    time.sleep(window_s)
    b = read()
    return {c: (b[c][0] - a[c][0]) / max(b[c][1] - a[c][1], 1) for c in cores if c in a and c in b}
