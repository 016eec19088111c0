"""Release gates: the recipe's ``[gates]`` checked against each target's row of the report.

A speed gate is judged on the interval, not the point: ``min_speedup`` passes only when the lower bound
of the speed-up's 95 % interval (``TargetRow.speedup_ci``, from interleaved rounds) reaches the limit, so
a noisy machine cannot pass a release that a quiet one would fail."""
from __future__ import annotations

from edgekit.config.recipe import Gates
from edgekit.report.schema import GateResult, TargetRow

# gate name -> (how to read the value from a target row, passes(value, limit), what it means)
_CHECKS = {
    "max_metric_drop": (lambda r: r.metric_drop, lambda v, lim: v <= lim, "metric drop vs fp32 torch"),
    "min_speedup": (lambda r: r.speedup_p50, lambda v, lim: v >= lim, "p50 speedup vs fp32 artifact"),
    "max_latency_ms": (lambda r: r.optimized.p50, lambda v, lim: v <= lim, "optimized p50 latency (ms)"),
    "max_size_bytes": (lambda r: r.optimized.size_bytes, lambda v, lim: v <= lim, "optimized artifact size (bytes)"),
}


def evaluate(gates: Gates, targets: list[TargetRow]) -> list[GateResult]:
    """One entry per target x configured gate. ``passed`` is None when the value was not measured
    (e.g. latency on an absent device) or the target failed before it could be judged."""
    results = []
    for row in targets:
        spec = gates.for_target(row.name)
        for gate, (read, ok, what) in _CHECKS.items():
            limit = getattr(spec, gate)
            if limit is None:
                continue
            value = read(row) if row.judged else None  # a missed accuracy budget still has figures
            if value is None:
                note = row.reason if row.status != "ok" else "not measured"
                results.append(GateResult(target=row.name, gate=gate, limit=limit, what=what, note=note))
            elif gate == "min_speedup" and row.speedup_ci:
                lo, hi = row.speedup_ci
                results.append(GateResult(target=row.name, gate=gate, limit=limit, value=value, interval=[lo, hi],
                                          passed=bool(ok(lo, limit)), what=what,
                                          basis=f"judged on the lower bound of its 95 % interval "
                                                f"[{lo:g}, {hi:g}]"))
            else:
                results.append(GateResult(target=row.name, gate=gate, limit=limit, value=value,
                                          passed=bool(ok(value, limit)), what=what))
    return results


def failed(results: list[GateResult]) -> list[GateResult]:
    return [g for g in results if g.passed is False]
