"""Time every artifact of an edgekit run folder interleaved, per target: fp32, optimized and extras
(e.g. the unpruned int8 reference) loaded in one process with the target's runtime settings and timed
in rotating rounds, so load from other processes hits them alike. Prints each artifact's p50 (median
of the round p50s), its speed-up over the target's fp32 (median of the per-round ratios, with their
min..max), the machine and the load before and after. Numbers to quote; `edgekit run` times artifacts
one after the other.

    .venv/bin/python benchmarks/interleaved.py runs/demo [--rounds 15] [--per-round 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from edgekit.backends import get_backend
from edgekit.config.profiles import load_profile
from edgekit.measure.bench import interleaved
from edgekit.measure.machine import machine
from edgekit.report.schema import Report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="an edgekit output folder (with report.json and artifacts/)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    run = Path(args.run)
    doc = Report.read(run / "report.json")
    with np.load(doc.eval.path, allow_pickle=False) as z:
        feed = {i["name"]: z[i["name"]][:1] for i in doc.model.inputs}
    m = machine()
    print(f"machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores; load before {os.getloadavg()[0]:.2f}")
    out = {}
    for row in doc.targets:
        if row.status != "ok" or not row.fp32 or not row.fp32.latency_ms:
            print(f"{row.name}: skipped ({row.status}, {row.reason or 'not timed here'})")
            continue
        prof = load_profile(row.name)
        backend = get_backend(row.backend)
        runtime = backend.options(prof)[2]
        runners = {kind: backend.load(run / art.artifact, runtime) for kind, art in row.artifacts()}
        res = interleaved(runners, feed, warmup=prof.bench.warmup, rounds=args.rounds, per_round=args.per_round)
        fp = res["fp32"]["rounds_p50"]
        out[row.name] = {}
        for kind, r in res.items():
            ratios = [a / b for a, b in zip(fp, r["rounds_p50"])]
            out[row.name][kind] = {"p50_ms": round(statistics.median(r["rounds_p50"]), 3),
                                   "speedup": round(statistics.median(ratios), 2),
                                   "range": [round(min(ratios), 2), round(max(ratios), 2)],
                                   "metric": (row.extras or {}).get(kind, getattr(row, kind, None)).metric}
            o = out[row.name][kind]
            print(f"{row.name:14} {kind:14} p50 {o['p50_ms']:7.3f} ms  {o['speedup']:5.2f}x "
                  f"({o['range'][0]:.2f}..{o['range'][1]:.2f})  {doc.eval.metric} {o['metric']}")
    print(f"load after {os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.per_round} calls, 1 process")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": m, "results": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
