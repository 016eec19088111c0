"""Accuracy-aware quantization: never ship a collapsed int8 model silently.

After a target's first quantization, the build worker scores the artifact on (a subset of) the
evaluation set with the report's metric (``edgekit.verify.score`` against the fp32 torch reference).
If the drop exceeds the target's ``max_metric_drop``, the backend proposes candidates one at a time
(``Backend.search_candidates``: better calibration, then the most sensitive layers kept in higher
precision, found with the toolchain's own means); each is built, scored and timed in-process, within
the recipe's ``[quantize] time_budget_s``. The best artifact is kept: the fastest within budget, or
else the one with the lowest drop, and the outcome says which and why. This module never imports a
toolchain: backends do.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from edgekit.progress import say
from edgekit.verify import score


@dataclass
class Candidate:
    """One step of the search, proposed by a backend."""

    label: str
    """What this step changes, for people (e.g. "quantize Clip (ReLU6) too")."""
    opts: Any = None
    """The backend's QuantizeOptions for this step (built with ``backend.quantize``) ..."""
    build: Optional[Callable[[Path], Any]] = None
    """... or a callable building the artifact into the given folder (toolchain-driven searches)."""
    kept_float: list[str] = field(default_factory=list)
    """Layers / tensors this candidate keeps in higher precision (cumulative)."""


@dataclass
class Scored:
    candidate: Candidate
    artifact: Any
    metric: float
    drop: float
    latency_ms: Optional[float]
    seconds: float

    def row(self) -> dict:
        return {"step": self.candidate.label, "metric": round(self.metric, 6), "drop": round(self.drop, 6),
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
                "kept_float": self.kept_float, "seconds": round(self.seconds, 2)}

    @property
    def kept_float(self) -> list[str]:
        """What the search kept in float, plus what the backend's calibration guard excluded."""
        auto = (getattr(self.artifact, "details", None) or {}).get("excluded_nonfinite_nodes", [])
        return sorted(set(self.candidate.kept_float) | set(auto))


class SearchContext:
    """What the driver and the backends' candidate generators share: the data, the budget, the history."""

    def __init__(self, *, target: str, backend, runtime, calibration, samples: list[dict],
                 reference: np.ndarray, labels: Optional[np.ndarray], metric: str, max_drop: float,
                 time_budget_s: float, max_steps: int = 12, timing_runs: int = 15, model=None):
        self.target, self.backend, self.runtime = target, backend, runtime
        self.model = model  # the torch model the fp32 artifact came from (weight-sensitivity pass), or None
        self.calibration, self.samples = calibration, samples
        self.reference, self.labels, self.metric = reference, labels, metric
        self.fp32_metric = score(metric, reference, reference, labels)
        self.max_drop, self.time_budget_s, self.max_steps = max_drop, time_budget_s, max_steps
        self.timing_runs = timing_runs
        self.start = time.perf_counter()
        self.history: list[Scored] = []

    # -- for backends ---------------------------------------------------------------------------
    @property
    def best(self) -> Optional[Scored]:
        return choose_best(self.history, self.max_drop)

    def remaining(self) -> float:
        return self.time_budget_s - (time.perf_counter() - self.start)

    def validate(self, run: Callable[[dict], np.ndarray]) -> float:
        """Score any callable (sample -> first output) on the search subset: the report's metric."""
        outs = np.stack([np.asarray(run(s)).reshape(-1) for s in self.samples])
        return score(self.metric, outs, self.reference, self.labels)

    # -- for the driver -------------------------------------------------------------------------
    def evaluate(self, candidate: Candidate, artifact, seconds: float) -> Scored:
        runner = self.backend.load(Path(artifact.path), self.runtime)
        metric = self.validate(lambda s: runner.run(s)[0])
        lat = _latency_ms(runner, self.samples[0], self.timing_runs)
        del runner
        return Scored(candidate, artifact, metric, self.fp32_metric - metric, lat, seconds)


def _latency_ms(runner, sample: dict, runs: int) -> float:
    """A quick in-process p50 to choose between candidates (the report's latency is the measure worker's)."""
    for _ in range(3):
        runner.run(sample)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.run(sample)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


import math  # noqa: E402


def channel_sqnr(pre: list, post: list) -> float:
    """SQNR (dB) of a quantized activation, per channel, median over channels; channels along axis 1
    (NCHW) and along the last axis (tokens x features), the worse of the two. Per channel, because an
    outlier channel that eats a per-tensor scale leaves the tensor's total SQNR high while every other
    channel is rounded to zero."""
    x = np.concatenate([np.asarray(a, np.float64).reshape(-1, *np.shape(a)[1:]) for a in pre])
    y = np.concatenate([np.asarray(b, np.float64).reshape(-1, *np.shape(b)[1:]) for b in post])
    if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return -math.inf
    worst = math.inf
    for axis in sorted({1 % x.ndim, x.ndim - 1}):
        other = tuple(i for i in range(x.ndim) if i != axis)
        sig = (x ** 2).sum(axis=other) if other else x ** 2
        noise = ((x - y) ** 2).sum(axis=other) if other else (x - y) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            db = np.where(noise > 0, 10 * np.log10(np.maximum(sig, 1e-30) / np.maximum(noise, 1e-30)), 200.0)
        worst = min(worst, float(np.median(db)))
    return worst


def within(s: Scored, max_drop: float) -> bool:
    return s.drop <= max_drop + 1e-9


def choose_best(history: list[Scored], max_drop: float) -> Optional[Scored]:
    """The fastest artifact within the accuracy budget; if none is, the one with the lowest drop."""
    ok = [s for s in history if within(s, max_drop)]
    if ok:
        return min(ok, key=lambda s: (s.latency_ms if s.latency_ms is not None else float("inf")))
    # ties (drops equal to 1e-4) go to the faster artifact
    return min(history, key=lambda s: (round(s.drop, 4), s.latency_ms or 0.0)) if history else None


def search(ctx: SearchContext, fp32, first, first_opts, out: Path,
           candidates: Callable[[SearchContext], Iterator[Candidate]]) -> tuple[Any, dict]:
    """Score ``first`` (the default quantization); search if it misses the budget. Returns the artifact
    to ship (its files moved into ``out``) and the outcome for the report (``row["quantize_search"]``)."""
    tag = f"[{ctx.target}] quantize search"
    first_scored = ctx.evaluate(Candidate("default (profile's quantization)", first_opts), first, 0.0)
    ctx.history.append(first_scored)
    say(f"{tag}: default drop {first_scored.drop:+.4f} ({ctx.metric} {first_scored.metric:.4f} vs fp32 "
        f"{ctx.fp32_metric:.4f} on {len(ctx.samples)} samples), ~{first_scored.latency_ms:.2f} ms; "
        f"budget {ctx.max_drop:g}")
    stop = "default quantization within budget"
    ctx.start = time.perf_counter()  # the budget is for the search itself
    if not within(first_scored, ctx.max_drop):
        stop = _loop(ctx, fp32, out, candidates(ctx), tag)
    best = ctx.best
    art = _keep(best, ctx.history, out)
    ok = within(best, ctx.max_drop)
    outcome = {
        "status": "ok" if ok else "failed",
        "reason": None if ok else (f"accuracy budget not met (best drop {best.drop:.4f} at "
                                   f"{best.latency_ms:.2f} ms; max_metric_drop {ctx.max_drop:g}; {stop})"),
        "max_metric_drop": ctx.max_drop, "metric": ctx.metric, "eval_samples": len(ctx.samples),
        "fp32_metric_on_subset": round(ctx.fp32_metric, 6),
        "time_budget_s": ctx.time_budget_s,
        "search_s": round(time.perf_counter() - ctx.start, 2) if len(ctx.history) > 1 else 0.0,
        "stopped": stop,
        "steps": [s.row() for s in ctx.history],
        "chosen": ctx.history.index(best),
        "kept_float": best.kept_float,
        "before": {"drop": round(first_scored.drop, 6), "latency_ms": round(first_scored.latency_ms, 3)},
        "after": {"drop": round(best.drop, 6), "latency_ms": round(best.latency_ms, 3)},
        "latency_cost_ms": round(best.latency_ms - first_scored.latency_ms, 3),
    }
    say(f"{tag}: {'ok' if ok else 'FAILED'}: step {outcome['chosen']} '{best.candidate.label}', drop "
        f"{first_scored.drop:+.4f} -> {best.drop:+.4f}, ~{first_scored.latency_ms:.2f} -> "
        f"{best.latency_ms:.2f} ms, {len(best.kept_float)} kept in float ({stop})")
    return art, outcome


def _loop(ctx: SearchContext, fp32, out: Path, gen: Iterator[Candidate], tag: str) -> str:
    costs: list[float] = []
    while True:
        if len(ctx.history) > ctx.max_steps:
            return f"max_steps {ctx.max_steps} reached"
        left = ctx.remaining()
        need = float(np.mean(costs)) if costs else 0.0
        if left <= 0 or need > left:
            return f"time budget {ctx.time_budget_s:g} s spent" if left <= 0 else \
                f"time budget: {left:.0f} s left, a step takes ~{need:.0f} s"
        t0 = time.perf_counter()
        try:
            cand = next(gen)
        except StopIteration:
            return "no more candidates"
        except Exception as e:  # noqa: BLE001 - a broken sensitivity pass ends the search, keeps the best
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            say(f"{tag}: the candidate generator failed ({msg})")
            return f"sensitivity pass failed ({msg})"
        i = len(ctx.history)
        say(f"{tag} step {i}: {cand.label} ({left:.0f} s of budget left)")
        folder = out / "search" / f"step{i}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            art = cand.build(folder) if cand.build else ctx.backend.quantize(fp32, ctx.calibration, folder, cand.opts)
            scored = ctx.evaluate(cand, art, 0.0)
        except Exception as e:  # noqa: BLE001 - a failed candidate is a step, not the target's failure
            say(f"{tag} step {i}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            costs.append(time.perf_counter() - t0)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        scored.seconds = time.perf_counter() - t0
        costs.append(scored.seconds)
        ctx.history.append(scored)
        say(f"{tag} step {i}: drop {scored.drop:+.4f}, ~{scored.latency_ms:.2f} ms, "
            f"{len(scored.kept_float)} kept in float, {scored.seconds:.0f} s")
        if within(scored, ctx.max_drop):
            return "within budget"


def _keep(best: Scored, history: list[Scored], out: Path):
    """Move the chosen artifact's files into ``out`` (replacing the default's) and drop the others."""
    art = best.artifact
    if best is not history[0]:
        for f in history[0].artifact.files:
            Path(f).unlink(missing_ok=True)
        moved = []
        for f in art.files:
            dest = out / Path(f).name
            shutil.move(str(f), dest)
            moved.append(dest)
        art.path, art.files = out / Path(art.path).name, moved
    shutil.rmtree(out / "search", ignore_errors=True)
    return art
