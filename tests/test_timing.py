"""Timing you can trust (edgekit.measure.timing): the interval arithmetic, the interleaved rounds and their
stopping rule, the noise check, and the decisions gates and baselines take on intervals. The timings here
are made up on purpose: these tests check arithmetic and decisions, not a runtime."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from edgekit.measure import timing
from edgekit.release import baseline, gates, junit
from edgekit.report.html import render
from edgekit.report.markdown import markdown
from edgekit.report.schema import (ArtifactResult, EvalInfo, Fidelity, Latency, Machine, ModelInfo, Report, TargetRow,
                                   Timing)


# -- the interval -------------------------------------------------------------------------------------------

def test_median_interval_is_the_order_statistics_with_binomial_coverage():
    med, lo, hi, cover = timing.median_ci(list(range(1, 11)))
    assert (med, lo, hi) == (5.5, 2, 9)  # n = 10: [x(2), x(9)], coverage 1 - 2 * 11/1024
    assert cover == pytest.approx(1 - 2 * 11 / 1024)
    med, lo, hi, cover = timing.median_ci([5, 1, 4, 2, 3])  # too few for 95 %: [min, max], and it says so
    assert (med, lo, hi) == (3, 1, 5) and cover == pytest.approx(1 - 2 / 32)
    assert timing.median_ci([2.0]) == (2.0, 2.0, 2.0, 0.0)
    with pytest.raises(ValueError):
        timing.median_ci([])


def test_median_interval_covers_the_true_median_at_least_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true = np.exp(0.0)  # median of a lognormal(0, 0.3): skewed like latencies
    hits = sum(lo <= true <= hi for _, lo, hi, _ in
               (timing.median_ci(rng.lognormal(0.0, 0.3, size=15)) for _ in range(2000)))
    assert hits / 2000 >= 0.95


def test_ratio_summary_is_the_median_of_per_round_ratios():
    s = timing.ratio_summary([10, 20, 10, 20, 10, 20], [5, 10, 5, 10, 5, 10])
    assert s["median"] == 2.0 and s["ci"] == [2.0, 2.0] and s["rounds"] == 6


# -- the rounds ------------------------------------------------------------------------------------------------

class FakeMachine:
    """Made-up artifacts (fp32 4 ms, int8 1 ms) on a machine whose load multiplies every call by a
    factor that changes with time; the clock advances by the calls' time."""

    def __init__(self, load=lambda t: 1.0, jitter=0.0, seed=0):
        self.t, self.load, self.jitter, self.rng = 0.0, load, jitter, np.random.default_rng(seed)
        self.base = {"fp32": 4e-3, "optimized": 1e-3}
        self.order = []

    def block(self, name, n):
        self.order.append(name)
        out = []
        for _ in range(n):
            s = self.base[name] * self.load(self.t) * (1 + self.jitter * self.rng.standard_normal())
            self.t += s
            out.append(s)
        return out

    def clock(self):
        return self.t


def test_rounds_stop_when_stable_and_load_that_comes_and_goes_hits_both_sides():
    # load doubles every other 50 ms: sequential timing (fp32 then int8) would see 4 ms vs 2 ms or 8 ms vs
    # 1 ms; interleaved per-round ratios stay near 4
    m = FakeMachine(load=lambda t: 2.0 if int(t / 0.05) % 2 else 1.0, jitter=0.01)
    res = timing.rounds(m.block, ["fp32", "optimized"], per_round=5, min_rounds=10, baseline="fp32",
                        clock=m.clock)
    assert res["stable"] and res["stopped"].startswith("stable") and res["rounds"] >= 10
    s = timing.ratio_summary(res["rounds_p50"]["fp32"], res["rounds_p50"]["optimized"])
    assert 3.8 < s["median"] < 4.2 and s["ci"][0] <= 4.0 <= s["ci"][1] + 0.1
    # the order rotates and flips: each artifact goes first in some rounds
    firsts = {m.order[2 * r] for r in range(res["rounds"])}
    assert firsts == {"fp32", "optimized"}


def test_rounds_stop_at_the_time_cap_and_say_the_interval_is_still_wide():
    m = FakeMachine(jitter=0.4)
    res = timing.rounds(m.block, ["fp32", "optimized"], per_round=1, min_rounds=10, baseline="fp32",
                        max_seconds=0.2, clock=m.clock)
    assert not res["stable"] and res["stopped"].startswith("time cap (0.2 s)") and "wanted ±5%" in res["stopped"]
    assert res["seconds"] >= 0.2


def test_warm_up_runs_until_the_first_call_outliers_are_gone():
    calls = iter([0.5, 0.3, 0.2] + [0.01] * 100)
    assert timing.warm_up(lambda: next(calls), min_calls=2) == 2 + 5 + 5  # two groups agree after the outliers


def test_interleaved_timing_of_real_callables_gives_an_interval_around_the_true_ratio():
    """Two real workloads (numpy matmuls of known relative cost) timed by the same code the worker uses."""
    a, b = np.ones((160, 160)), np.ones((80, 80))

    class R:
        def __init__(self, m):
            self.m = m

        def run(self, feed):
            for _ in range(4):
                self.m @ self.m

    res = timing.timed_interleaved({"fp32": R(a), "optimized": R(b)}, None, threads=1, warmup=3, per_round=5,
                                   min_rounds=8, max_seconds=5, interval=0.05, baseline="fp32")
    lat = res["latency"]
    assert lat["fp32"]["n"] == lat["optimized"]["n"] == res["rounds"] * 5
    assert lat["fp32"]["ci"][0] <= lat["fp32"]["p50"] * 1.2 and len(lat["fp32"]["rounds_p50"]) == res["rounds"]
    assert res["conditions"]["threads"] == 1 and "others_cpu" in res["conditions"]
    assert set(res["conditions"]["cpu_share"]) == {"fp32", "optimized"}


# -- noise ------------------------------------------------------------------------------------------------

def test_noise_reasons_name_the_numbers():
    quiet = {"others_cpu": 0.02, "steal": 0.0, "freq_mhz_before": [2000, 2000], "freq_mhz_after": [2010, 2010]}
    assert timing.noise_reasons(quiet, True, "stable") == []
    loud = {"others_cpu": 0.97, "steal": 0.08, "freq_mhz_before": [3000, 3000], "freq_mhz_after": [2000, 2000]}
    why = timing.noise_reasons(loud, False, "time cap (20 s) after 40 rounds")
    assert why == ["interval still wide: time cap (20 s) after 40 rounds",
                   "other processes used 0.97 cores during timing", "CPU steal 8.0% during timing",
                   "CPU frequency moved 3000 -> 2000 MHz"]
    preempted = {"threads": 1, "cpu_share": {"fp32": 0.55, "optimized": 0.97}}
    assert timing.noise_reasons(preempted, True, "stable") == [
        "the timed process had its core 55% of the time while timing fp32 (preempted by other processes)"]
    assert timing.noise_reasons({**preempted, "threads": 4}, True, "stable") == []  # CPU/wall means nothing there


def test_a_busy_process_is_seen_as_other_processes_cpu():
    before = timing.snapshot()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
    try:
        time.sleep(1.2)
        cond = timing.conditions(before, timing.snapshot())
    finally:
        busy.wait()
    if cond["others_cpu"] is None:
        pytest.skip("/proc/stat not readable here")
    assert cond["others_cpu"] > 0.5
    assert any("other processes used" in w for w in timing.noise_reasons(cond, True, "stable"))


# -- decisions on intervals -------------------------------------------------------------------------------------

def _lat(p50, ci):
    return Latency(p50=p50, p90=p50, p99=p50, mean=p50, n=200, mad=0.01, ci=list(ci),
                   rounds_p50=[ci[0], p50, ci[1]])


def _row(speedup, ci, noisy=False, name="ort-cpu") -> TargetRow:
    art = lambda p50, prec: ArtifactResult(artifact=f"{prec}.onnx", files=[f"{prec}.onnx"], size_bytes=100,  # noqa: E731
                                           precision=prec, metric=0.99, latency_ms=_lat(p50, (p50 * .98, p50 * 1.02)),
                                           load_ms=1.0, verified_on="host",
                                           fidelity=Fidelity(cosine=1.0, top1_agreement=1.0, max_abs_error=0.0))
    t = Timing(method="interleaved rounds in one process", rounds=12, stopped="stable", stable=not noisy,
               seconds=1.0, noisy=noisy, noise=["other processes used 1.01 cores during timing"] if noisy else [],
               speedups={"optimized": {"median": speedup, "ci": list(ci), "confidence": 0.96, "rounds": 12}},
               conditions={"threads": 1, "affinity": [1], "pinned": True, "per_round": 20, "others_cpu": 1.01,
                           "steal": 0.0, "load_before": [1.0, 1, 1], "load_after": [1.1, 1, 1]})
    return TargetRow(name=name, backend="onnxruntime", device="host-x86_64", threads=1, fp32=art(4.0, "fp32"),
                     optimized=art(4.0 / speedup, "int8"), speedup_p50=speedup, speedup_ci=list(ci), timing=t,
                     metric_drop=0.001, size_ratio=0.25)


def _report(*rows) -> Report:
    return Report(edgekit_version="t", created="t", machine=Machine(cpu="c", arch="x86_64", cores=2),
                  model=ModelInfo(name="m", source="s", params=1, macs=1), calibration={"n": 1},
                  eval=EvalInfo(path="e", metric="cosine", n=1, fp32_torch=1.0), targets=list(rows))


def test_speed_gate_passes_only_when_the_lower_bound_passes(write_recipe):
    from edgekit.config.recipe import load_recipe

    spec = load_recipe(write_recipe(extra="[gates]\nmin_speedup = 2.5\n")).gates
    sure, unsure = _row(2.8, (2.6, 3.0)), _row(2.8, (2.3, 3.1), name="openvino-x86")
    (g_sure,), (g_unsure,) = gates.evaluate(spec, [sure]), gates.evaluate(spec, [unsure])
    assert g_sure.passed is True and g_sure.value == 2.8 and g_sure.interval == [2.6, 3.0]
    assert g_unsure.passed is False and g_unsure.value == 2.8  # the median passes, the interval does not
    msg = junit.message(g_unsure)
    assert "openvino-x86: gate min_speedup failed" in msg and "lower bound of its 95 % interval [2.3, 3.1]" in msg
    old = _row(2.8, (2.3, 3.1))
    old.speedup_ci = None  # a report timed without rounds: the point is judged
    assert gates.evaluate(spec, [old])[0].passed is True


def test_latency_regression_is_called_only_when_the_intervals_separate():
    before = _lat(2.0, (1.9, 2.1))
    overlap = _lat(2.3, (2.05, 2.6))  # +15 %, but the intervals overlap: noise
    change, ok, basis = baseline.judge_intervals(before, overlap, 0.10)
    assert change == pytest.approx(0.15) and ok is True and "overlap" in basis
    apart = _lat(2.3, (2.2, 2.4))
    change, ok, basis = baseline.judge_intervals(before, apart, 0.10)
    assert ok is False and "separate" in basis
    small = _lat(2.15, (2.12, 2.18))  # separate, but within the floor
    assert baseline.judge_intervals(before, small, 0.10)[1] is True


def test_interleaved_confirmation_judges_the_per_round_ratio_interval():
    a = Latency(p50=2.0, p90=2, p99=2, mean=2, n=60, rounds_p50=[2.0, 2.4, 1.8, 2.0, 2.2, 2.0], ci=[1.8, 2.4])
    b_same = Latency(p50=2.1, p90=2, p99=2, mean=2, n=60, rounds_p50=[2.1, 2.5, 1.9, 2.0, 2.3, 2.1], ci=[1.9, 2.5])
    change, ok, basis = baseline.judge_ab(a, b_same, 0.10)
    assert ok is True and "interleaved" in basis
    b_slow = Latency(p50=2.6, p90=2, p99=2, mean=2, n=60, rounds_p50=[2.6, 3.1, 2.35, 2.6, 2.9, 2.6], ci=[2.35, 3.1])
    change, ok, _ = baseline.judge_ab(a, b_slow, 0.10)
    assert ok is False and change == pytest.approx(0.3, abs=0.01)


# -- what a person sees ------------------------------------------------------------------------------------------

def test_interval_and_noise_flag_show_in_report_md_and_html():
    doc = _report(_row(2.8, (2.6, 3.0), noisy=True), _row(3.1, (3.0, 3.2), name="openvino-x86"))
    md = markdown(doc)
    assert "| **2.80× [2.60–3.00]** ⚠️ noisy |" in md
    assert "⚠️ **noisy timing**: other processes used 1.01 cores during timing" in md
    assert "**3.10× [3.00–3.20]**" in md and md.count("noisy timing") == 1
    assert "12 rounds × 20 calls" in md and "pinned to core(s) [1]" in md
    page = render(doc)
    assert "2.80× [2.60–3.00] <span class=\"na\">noisy</span>" in page
    assert "noisy timing: other processes used 1.01 cores during timing" in page
    assert "3.10× [3.00–3.20]</td>" in page


def test_terminal_summary_is_an_aligned_table_with_the_best_target_within_gates_marked():
    from edgekit.report import terminal
    from edgekit.report.schema import GateResult

    fast_but_failing = _row(5.0, (4.8, 5.2), name="tflite-mobile")
    doc = _report(_row(2.8, (2.6, 3.0), noisy=True), _row(3.1, (3.0, 3.2), name="openvino-x86"), fast_but_failing)
    results = [GateResult(target="tflite-mobile", gate="max_metric_drop", limit=0.001, value=0.002, passed=False,
                          what="metric drop"),
               GateResult(target="openvino-x86", gate="min_speedup", limit=2.0, value=3.1, passed=True, what="x")]
    text = terminal.table(doc, results, colour=False)
    lines = text.splitlines()
    assert "|" not in text and "**" not in text  # not Markdown
    row = {ln.split()[0]: ln for ln in lines[2:5]}
    assert row["openvino-x86"].endswith("★ best") and "FAILED max_metric_drop" in row["tflite-mobile"]
    assert "3.10× [3.00–3.20]" in row["openvino-x86"] and "2.80× [2.60–3.00] noisy" in row["ort-cpu"]
    starts = {ln.index(ln.split()[2]) for ln in lines[2:5]}  # the p50 column starts at one offset in every row
    assert len(starts) == 1
    assert "ort-cpu: noisy timing (other processes used 1.01 cores during timing)" in text


def test_pinning_reaches_threads_a_runtime_already_started():
    import os
    import threading

    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and 2 cores")
    before = os.sched_getaffinity(0)
    started, stop = threading.Event(), threading.Event()
    tid = []

    def worker():  # stands for an inference thread OpenVINO starts when it compiles a model
        tid.append(threading.get_native_id())
        started.set()
        stop.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    started.wait(5)
    try:
        chosen = timing.pin_to_free_cores(1)
        assert chosen is not None and len(chosen) == 1
        assert os.sched_getaffinity(0) == set(chosen) and os.sched_getaffinity(tid[0]) == set(chosen)
    finally:
        stop.set()
        t.join()
        os.sched_setaffinity(0, before)


def test_pooling_two_processes_puts_their_spread_into_the_interval():
    """Two made-up processes whose speed-ups differ by 10 % (memory layout), each tight on its own."""
    def session(ratio, cpu):
        fp = [[4e-3] * 5 for _ in range(10)]
        op = [[4e-3 / (ratio * (1 + 0.002 * (i % 3)))] * 5 for i in range(10)]
        one = timing.from_blocks({"fp32": fp, "optimized": op}, "fp32", 0.05)
        return {**one, "blocks": {"fp32": fp, "optimized": op}, "seconds": 1.0, "warmup_calls": {},
                "conditions": {"others_cpu": cpu, "steal": 0.0, "affinity": [1], "pinned": True,
                               "cpu_share": {"fp32": 1.0, "optimized": 0.97}, "load_before": [1.0]}}

    a, b = session(4.0, 0.01), session(4.4, 0.6)
    alone = timing.ratio_summary(a["latency"]["fp32"].get("rounds_p50"), a["latency"]["optimized"]["rounds_p50"])
    assert alone["ci"][1] < 4.1  # one process alone never sees 4.4
    pooled = timing.merge_sessions([a, b], "fp32", 0.05)
    s = timing.ratio_summary(pooled["latency"]["fp32"]["rounds_p50"], pooled["latency"]["optimized"]["rounds_p50"])
    assert pooled["rounds"] == 20 and s["ci"][0] <= 4.05 and s["ci"][1] >= 4.35
    assert pooled["conditions"]["others_cpu"] == 0.6 and pooled["conditions"]["sessions"] == 2
    assert pooled["stopped"].startswith("2 fresh processes") and pooled["seconds"] == 2.0
    assert timing.merge_sessions([a], "fp32", 0.05) is a
