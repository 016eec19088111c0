"""Measure fp32-vs-optimized speedup per target on a recipe, repeated, and compare with the targets in
benchmarks/targets.toml. Prints what it measured and the machine it ran on; exits 1 if a target is missed.
With a recipe that prunes ([prune]) it also compares the pruned int8 artifact with the unpruned int8 one
(goal `min_prune_speedup`).

    .venv/bin/python benchmarks/speedup.py [RECIPE] [--repeat 3]
    .venv/bin/python benchmarks/speedup.py examples/tiny_multimodal/prune.toml

Latency on a shared machine is noisy: the figure compared is the median over the repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import tomllib
from pathlib import Path

from edgekit.orchestrate import pipeline
from edgekit.measure.machine import machine

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default=str(HERE.parent / "examples" / "tiny_multimodal"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    goals = tomllib.loads((HERE / "targets.toml").read_text())
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            doc = pipeline.run(args.recipe, out=Path(tmp) / f"r{i}").to_json()
            for t in doc["targets"]:
                runs.setdefault(t["name"], []).append(t)
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['os']}; recipe: {args.recipe}; repeats: {args.repeat}")
    ok = True
    for name, rows in runs.items():
        line = {"target": name}
        prunes = [r.get("prune") or {} for r in rows]
        measured = [("speedup", "min_speedup", [r["speedup_p50"] for r in rows])]
        if any(prunes):
            measured.append(("prune_speedup", "min_prune_speedup", [p.get("speedup_vs_int8_unpruned") for p in prunes]))
        for key, goal_key, values in measured:
            values = [v for v in values if v]
            med = statistics.median(values) if values else None
            goal = goals.get(name, {}).get(goal_key)
            verdict = "no goal" if goal is None else ("meets" if med and med >= goal else "MISSES")
            ok &= verdict != "MISSES"
            line.update({f"{key}s": values, f"median_{key}": med, goal_key: goal, f"{key}_verdict": verdict})
        fp = [r["fp32"]["latency_ms"]["p50"] for r in rows if r["fp32"] and r["fp32"]["latency_ms"]]
        op = [r["optimized"]["latency_ms"]["p50"] for r in rows if r["optimized"] and r["optimized"]["latency_ms"]]
        line.update({"fp32_p50_ms": fp, "optimized_p50_ms": op, "metric_drop": [r["metric_drop"] for r in rows]})
        if any(prunes):
            line["int8_unpruned_p50_ms"] = [(p.get("latency_p50_ms") or {}).get("int8_unpruned") for p in prunes]
            line["macs"] = [(p["macs_before"], p["macs_after"]) for p in prunes if p]
        print(json.dumps(line))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
