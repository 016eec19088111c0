"""Regressions against the previous release's report.json (``edgekit ci --baseline PREV/report.json``).

Per target present in both reports, for the optimized artifact (the one that ships):

- ``baseline_latency``: noise-aware, in two stages.
  1. From the stored numbers. Reports timed in interleaved rounds keep a 95 % interval of each p50
     (``Latency.ci``): a regression is suspected only when p50 grew by more than the floor AND the two
     intervals separate (``judge_intervals``). Older reports keep the spread of their timed runs (MAD,
     quartiles, n). The relative standard error of a p50 is ``1.2533 * 1.4826 * MAD / sqrt(n) / p50``;
     the two sides combine as ``sqrt(a² + b²)``. A regression is *suspected* when
     ``p50_now / p50_before - 1 > max(max_latency_regression, K * combined)`` with ``K = 2``: never
     below the recipe's floor (default 10 %), wider when either measurement was noisy.
  2. A suspected regression is measured again before it fails the gate (not with ``--reuse``): when
     the baseline's artifact is still next to its report.json, both artifacts are timed *interleaved*
     in one process (``edgekit.measure.bench.ab_compare``: 10 alternating blocks of 20 calls), so load from
     other processes slows both alike; the per-round ratios' median and interval are judged: a
     regression only when the interval's lower bound exceeds 1 + floor (``judge_ab``);
     otherwise the current artifact is timed ``REMEASURE`` more times and the fastest p50 is judged
     (interference only adds time). Latency measured at different times on a shared machine can
     differ by far more than 30 % (measured here: p50 1.7 to 6.7 ms for one artifact under load), which
     is why stage 2 exists.
- ``baseline_metric``: ``metric_before - metric_now > max_metric_regression`` (absolute, default 0.005).
- ``baseline_size``: ``size_now / size_before - 1 > max_size_growth`` (default 5 %).

A malformed baseline is bad input (exit 2) with a message naming the file and what is wrong.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

from pydantic import ValidationError

from edgekit.errors import InputError
from edgekit.report.schema import SCHEMA, GateResult, Latency, Report, TargetRow

K = 2.0
REMEASURE = 2  # used by edgekit.release.confirm
DEFAULTS = {"max_latency_regression": 0.10, "max_metric_regression": 0.005, "max_size_growth": 0.05}
_LIMITS = {"baseline_latency": "max_latency_regression", "baseline_metric": "max_metric_regression",
           "baseline_size": "max_size_growth"}
_WHAT = {"baseline_latency": "optimized p50 change vs baseline (relative)",
         "baseline_metric": "optimized metric loss vs baseline",
         "baseline_size": "optimized size growth vs baseline (relative)"}


def load(path: str | Path) -> Report:
    p = Path(path)
    where = f"baseline {p}"
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise InputError(f"{where}: file not found (pass the previous release's report.json)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{where}: not a readable JSON report: {e}") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise InputError(f"{where}: no 'schema' field; not an edgekit report.json")
    if doc["schema"] != SCHEMA:
        raise InputError(f"{where}: schema {doc['schema']!r} does not match this edgekit's {SCHEMA!r}; "
                         f"re-run the baseline with this version, or compare with a matching edgekit")
    targets = doc.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, dict) and "name" in t and "status" in t
                                                for t in targets):
        raise InputError(f"{where}: 'targets' must be a list of target rows with 'name' and 'status'")
    try:
        rep = Report.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(f"{where}: not a valid {SCHEMA} report: {'.'.join(map(str, first['loc']))}: "
                         f"{first['msg']}") from None
    for row in rep.targets:
        for kind, art in row.artifacts():
            lat = art.latency_ms
            if lat is not None and not (lat.p50 > 0 and math.isfinite(lat.p50)):
                raise InputError(f"{where}: target {row.name} {kind}: latency p50 {lat.p50!r} ms is not a "
                                 f"positive number; not a measured report")
    return rep


def check_matches(base: Report, recipe, path: str | Path) -> None:
    """A baseline is the previous release of the same model: same name, inputs and metric. Anything
    else is bad input (exit 2), found before any work."""
    where = f"baseline {path}"
    if base.model.name != recipe.name:
        raise InputError(f"{where}: is a report of model {base.model.name!r}, not {recipe.name!r} "
                         f"(the recipe's [model] name); compare a release with its own previous release")
    mine = [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in recipe.model.inputs]
    theirs = [{k: i.get(k) for k in ("name", "shape", "dtype")} for i in base.model.inputs]
    if theirs and theirs != mine:
        raise InputError(f"{where}: model inputs {theirs} differ from the recipe's {mine}")
    if base.eval.metric != recipe.data.metric:
        raise InputError(f"{where}: scored with metric {base.eval.metric!r}, the recipe with "
                         f"{recipe.data.metric!r}; metrics of different kinds cannot be compared")


def rel_noise(lat: Latency) -> float:
    """Relative standard error of one measured p50: 1.2533 * sigma / sqrt(n) / p50, sigma robust
    (1.4826 * MAD, else IQR / 1.349, else std for reports from before MAD was stored)."""
    p50, n = lat.p50, max(int(lat.n or 1), 1)
    if not p50:
        return 0.0
    if lat.mad is not None:
        sigma = 1.4826 * lat.mad
    elif lat.q1 is not None and lat.q3 is not None:
        sigma = (lat.q3 - lat.q1) / 1.349
    else:
        sigma = lat.std or 0.0
    return 1.2533 * sigma / math.sqrt(n) / p50


def latency_threshold(before: Latency, now: Latency, floor: float) -> float:
    return max(floor, K * math.hypot(rel_noise(before), rel_noise(now)))


def judge_latency(before: Latency, now: Latency, floor: float) -> tuple[float, float, bool]:
    """(relative change of p50, threshold, passed)."""
    change = now.p50 / before.p50 - 1
    thr = latency_threshold(before, now, floor)
    return change, thr, change <= thr


def judge_intervals(before: Latency, now: Latency, floor: float) -> tuple[float, bool, str]:
    """For reports timed in interleaved rounds (each p50 has a 95 % interval): (relative change of p50,
    passed, basis). A regression is called only when the change exceeds ``floor`` AND the intervals
    separate (now's lower bound above the baseline's upper bound)."""
    change = now.p50 / before.p50 - 1
    apart = now.ci[0] > before.ci[1]
    basis = (f"intervals {'separate' if apart else 'overlap'}: baseline p50 95 % interval "
             f"[{before.ci[0]:g}, {before.ci[1]:g}] ms, now [{now.ci[0]:g}, {now.ci[1]:g}] ms")
    return change, not (change > floor and apart), basis


def judge_ab(a: Latency, b: Latency, floor: float) -> tuple[float, bool, str]:
    """Baseline (a) and current (b) timed in the same interleaved rounds: the slow-down is the median of
    the per-round ratios b/a; a regression only when its interval's lower bound exceeds ``1 + floor``."""
    from edgekit.measure.timing import ratio_summary

    r = ratio_summary(b.rounds_p50, a.rounds_p50)
    lo, hi = r["ci"]
    return r["median"] - 1, not (lo - 1 > floor), (f"interleaved: slow-down {r['median']:.3f}x, 95 % interval "
                                                   f"[{lo:.3f}, {hi:.3f}] over {r['rounds']} rounds")


def compare(doc: Report, base: Report, gates,
            confirm: Optional[Callable[[TargetRow, TargetRow], Optional[dict]]] = None) -> list[GateResult]:
    """One result per target x baseline gate, in the shape of ``edgekit.release.gates.evaluate``'s results.

    ``confirm(row, baseline_row)`` is called for a suspected latency regression and measures again:
    ``{"method": "ab", "a": baseline Latency, "b": current Latency}`` (both artifacts timed
    interleaved) or ``{"method": "repeat", "latencies": [Latency, ...]}`` (current artifact only),
    or None (the stored numbers stand)."""
    out: list[GateResult] = []
    for row in doc.targets:
        spec = gates.for_target(row.name)
        lim = {k: (getattr(spec, k, None) if getattr(spec, k, None) is not None else v) for k, v in DEFAULTS.items()}
        prev = base.target(row.name)

        def add(gate, value, passed, note=None, limit=None, **extra):
            out.append(GateResult(target=row.name, gate=gate, limit=lim[_LIMITS[gate]] if limit is None else limit,
                                  value=value, passed=passed, what=_WHAT[gate], note=note, **extra))

        skip = None
        if prev is None:
            skip = "target not in the baseline"
        elif prev.status != "ok":
            skip = f"baseline target status {prev.status}"
        elif row.status != "ok":
            skip = row.reason or row.status
        if skip:
            for g in _LIMITS:
                add(g, None, None, skip)
            continue
        b_op, n_op = prev.optimized, row.optimized
        b_lat, n_lat = b_op and b_op.latency_ms, n_op and n_op.latency_ms
        floor = lim["max_latency_regression"]
        if not b_lat or not n_lat:
            add("baseline_latency", None, None, "latency not measured in one of the reports")
        else:
            extra = {"baseline_p50": b_lat.p50, "p50": n_lat.p50, "floor": floor, "confirmed_by": None}
            if b_lat.ci and n_lat.ci:  # both timed in rounds: judged on the intervals
                change, ok, extra["basis"] = judge_intervals(b_lat, n_lat, floor)
                thr = floor
            else:  # a report from before intervals: the stored spread widens the floor
                change, thr, ok = judge_latency(b_lat, n_lat, floor)
                extra.update(k=K, noise={"baseline": round(rel_noise(b_lat), 4), "now": round(rel_noise(n_lat), 4)})
            if not ok and confirm is not None:
                c = confirm(row, prev)
                if c and c.get("method") == "ab":  # same machine, same moment, interleaved
                    if c["a"].rounds_p50 and c["b"].rounds_p50:
                        change, ok, extra["basis"] = judge_ab(c["a"], c["b"], floor)
                        thr = floor
                    else:
                        change, thr, ok = judge_latency(c["a"], c["b"], floor)
                    extra["confirmed_by"] = {"method": "ab", "baseline_p50": c["a"].p50, "p50": c["b"].p50}
                elif c and c.get("method") == "repeat":
                    best = min(c["latencies"], key=lambda lat: lat.p50)
                    if best.p50 < n_lat.p50:
                        change, thr, ok = judge_latency(b_lat, best, floor)
                    extra["confirmed_by"] = {"method": "repeat", "p50s": [lat.p50 for lat in c["latencies"]]}
            add("baseline_latency", round(change, 4), ok, limit=round(thr, 4), **extra)

        b_m, n_m = b_op and b_op.metric, n_op and n_op.metric
        if b_m is None or n_m is None:
            add("baseline_metric", None, None, "metric missing in one of the reports")
        else:
            loss = round(b_m - n_m, 6)
            add("baseline_metric", loss, loss <= lim["max_metric_regression"], baseline=b_m, now=n_m)

        b_s, n_s = b_op and b_op.size_bytes, n_op and n_op.size_bytes
        if not b_s or n_s is None:
            add("baseline_size", None, None, "size missing in one of the reports")
        else:
            growth = round(n_s / b_s - 1, 4)
            add("baseline_size", growth, growth <= lim["max_size_growth"], baseline=b_s, now=n_s)
    return out
