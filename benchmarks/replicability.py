"""Does edgekit's speed-up column survive a busy machine? Five runs of a recipe on an idle machine, five with
cores kept busy by bounded busy loops this script starts and stops itself, each target's speed-up (median
over interleaved rounds, with its 95 % interval) per run, and the spread.

    .venv/bin/python benchmarks/replicability.py [RECIPE] [--runs 5] [--busy 1]

The goal (benchmarks/targets.toml, [replicability]) : every loaded run's speed-up within ±10 % of the idle
median, and the loaded run's interval covering the idle median in at least 4 of 5 runs. Builds come from
edgekit's cache after the first run (the same artifacts every run); verification outputs too, so what is
repeated is the timing. Prints what it measured and the machine; exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from edgekit.measure.machine import machine

HERE = Path(__file__).resolve().parent
BUSY = "import time\nt = time.time()\nwhile time.time() - t < {cap}: pass\n"


def one_run(recipe: str, out: Path, busy: int, cap_s: float) -> dict:
    loops = [subprocess.Popen([sys.executable, "-c", BUSY.format(cap=cap_s)]) for _ in range(busy)]
    try:
        p = subprocess.run([sys.executable, "-m", "edgekit", "run", recipe, "--out", str(out)],
                           capture_output=True, text=True, timeout=cap_s)
    finally:
        for b in loops:
            b.kill()
            b.wait()
    if p.returncode not in (0, 3):
        raise SystemExit(f"edgekit run failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default=str(HERE.parent / "examples" / "tiny_multimodal"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--busy", type=int, default=1, help="cores kept busy in the loaded runs (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args()
    goal = tomllib.loads((HERE / "targets.toml").read_text()).get("replicability", {})
    tol, cover_min = goal.get("max_deviation", 0.10), goal.get("min_covering_runs", 4)
    rows: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        one_run(args.recipe, Path(tmp) / "warm", 0, 1800)  # fills the cache: every run below times the same files
        for cond, busy in (("idle", 0), ("loaded", args.busy)):
            for i in range(args.runs):
                doc = one_run(args.recipe, Path(tmp) / f"{cond}{i}", busy, 1800)
                for t in doc["targets"]:
                    if t.get("speedup_p50"):
                        rows.setdefault(t["name"], {}).setdefault(cond, []).append(
                            (t["speedup_p50"], t.get("speedup_ci"), t.get("timing", {}).get("noisy"),
                             t.get("timing", {}).get("conditions", {}).get("others_cpu")))
    m = machine()
    print(f"{datetime.date.today()} · {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['os']}")
    print(f"recipe {args.recipe}; {args.runs} runs idle, {args.runs} with {args.busy} core(s) busy; "
          f"speed-up = median over interleaved rounds [95 % interval]")
    print()
    print("| target | idle runs | idle median | loaded runs (busy) | max deviation | intervals covering idle median | noisy flagged (loaded) |")
    print("|---|---|---|---|---|---|---|")
    ok, figures = True, {}
    fmt = lambda r: f"{r[0]:.2f} [{r[1][0]:.2f}–{r[1][1]:.2f}]" if r[1] else f"{r[0]:.2f}"  # noqa: E731
    for name, by in rows.items():
        idle, loaded = by.get("idle", []), by.get("loaded", [])
        med = statistics.median(r[0] for r in idle)
        dev = max(abs(r[0] / med - 1) for r in loaded)
        covering = sum(1 for r in loaded if r[1] and r[1][0] <= med <= r[1][1])
        flagged = sum(1 for r in loaded if r[2])
        meets = dev <= tol and covering >= min(cover_min, len(loaded))
        ok &= meets
        print(f"| {name} | {', '.join(fmt(r) for r in idle)} | {med:.2f} | {', '.join(fmt(r) for r in loaded)} | "
              f"{dev:.1%} {'meets' if dev <= tol else 'MISSES'} ±{tol:.0%} | {covering} of {len(loaded)} | "
              f"{flagged} of {len(loaded)} |")
        figures[name] = {"idle": idle, "loaded": loaded, "idle_median": med, "max_deviation": dev,
                         "covering": covering, "noisy_flagged": flagged, "meets": meets}
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": m, "date": str(datetime.date.today()), "targets": figures},
                                              indent=1))
    print()
    print("all goals met" if ok else "a goal was MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
