"""Accuracy-aware quantization: never ship a collapsed int8 model silently.

The policy lives here, once, for every toolchain; a backend only answers questions about its graph
(``edgekit.backends.base.Backend``: ``units_of_modules``, ``rank_activations``, ``keep_in_float``).
The first build already has the quality methods (``edgekit.quantize.quality``: the backend's cheap
fixes, weak-weight layers standardized). The build worker scores it on the first ``eval_samples``
evaluation samples with the report's metric against the fp32 torch reference (a step within budget
there is scored on the whole evaluation set, which decides). If the drop exceeds the target's
``max_metric_drop``, the search climbs a ladder, least fallback first, building, scoring and timing each
step in-process:

0. **The profile's quantization alone** (when the first build applied quality methods): edgekit is
   never worse off than the vendor flow its methods improve on.
1. **Quantization-aware distillation** (``edgekit.quantize.qad``, ``[quantize] distill_steps``): the
   best model so far fine-tuned against the fp32 outputs with int8 rounding in the loop, then quantized
   by the toolchain with the same options: full-int8 speed kept.
2. **Float fallback, latency-aware, re-ranked after every step**: the backend ranks each quantized
   activation of the latest build by its median per-channel SQNR on ``SENSITIVITY_SAMPLES`` calibration
   samples and says what its units cost in float (``unit_macs``); the k activations that give back the
   most noise per MAC have their units kept in float, k = 1, 2, 4, ... (every activation under
   ``BROKEN_DB`` first and at once: dozens of rounded-to-nothing ReLU6 outputs one by one would never
   finish). Ranking again
   after each step matters: damage upstream hides damage downstream (an activation already rounded
   to zero quantizes "exactly").

The search stops at the first step within budget, when the backend has nothing left to keep in float,
after ``max_steps``, or when the time left is less than the mean cost of a step (the first step has no
estimate, so the budget can be overrun by at most one step). It keeps the fastest artifact within
budget, or else the one with the lowest drop, and says which and why (``SearchOutcome``). This module
never imports a toolchain.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from edgekit.measure.verify import score
from edgekit.progress import say
from edgekit.quantize import rescue
from edgekit.quantize.quality import Start
from edgekit.report.schema import SearchOutcome, SearchStep

PLAIN = "profile's quantization"
SENSITIVITY_SAMPLES = 8
"""Calibration samples every sensitivity pass (weights and activations, every backend) runs on."""
BROKEN_DB = 10.0
"""An activation whose median channel SQNR is under this is mostly noise after int8: all such go at once."""


@dataclass
class Candidate:
    """One step of the search: the backend's quantization options to build with, and why."""

    label: str
    opts: Any
    kept_float: list[str] = field(default_factory=list)
    """Units (the backend's node / op / module names) this step keeps in float, cumulative."""
    source: Any = None
    """The fp32 artifact to quantize from, when a rung rewrote the torch model; None = the original's."""
    model: Any = None
    """The torch model ``source`` was exported from (None: the original)."""
    float_modules: list[str] = field(default_factory=list)
    """Torch modules a rung keeps in float (what later torch-level rungs must leave alone)."""


@dataclass
class Scored:
    candidate: Candidate
    artifact: Any
    metric: float
    drop: float
    latency_ms: Optional[float]
    seconds: float
    scored_on: int = 0
    """Evaluation samples the drop was measured on (the subset, or all of them)."""

    @property
    def kept_float(self) -> list[str]:
        """What the search kept in float, plus what the backend's calibration guard excluded."""
        auto = (getattr(self.artifact, "details", None) or {}).get("excluded_nonfinite_nodes", [])
        return sorted(set(self.candidate.kept_float) | set(auto))

    def step(self) -> SearchStep:
        return SearchStep(step=self.candidate.label, metric=round(self.metric, 6), drop=round(self.drop, 6),
                          latency_ms=None if self.latency_ms is None else round(self.latency_ms, 3),
                          kept_float=self.kept_float, seconds=round(self.seconds, 2), scored_on=self.scored_on)


class SearchContext:
    """What the driver needs: the backend, the data, the budget, the history of scored steps.

    ``samples``/``reference``/``labels``: the whole evaluation set; candidates are scored on its first
    ``subset`` samples, and one that is within budget there is scored on all of them before it counts
    as within budget (a subset verdict the full set would fail is never passed)."""

    def __init__(self, *, target: str, backend, runtime, calibration, samples: list[dict],
                 reference: np.ndarray, labels: Optional[np.ndarray], metric: str, max_drop: float,
                 time_budget_s: float, max_steps: int = 12, timing_runs: int = 15, model=None,
                 subset: Optional[int] = None, export: Optional[Callable[[Any, str], Any]] = None,
                 distill_steps: int = 0, distill_lr: float = 1e-5, profile_opts=None,
                 rescues: Optional[list] = None):
        self.target, self.backend, self.runtime = target, backend, runtime
        self.export = export
        """``export(torch_model, name)`` -> fp32 artifact of a rewritten model (None: no rewrites)."""
        self.distill_steps, self.distill_lr = distill_steps, distill_lr
        self.profile_opts = profile_opts
        """The profile's own quantization options (the vendor flow), tried when the first build misses."""
        self.rescues = rescues  # the build's conversion-error rescues (edgekit.quantize.rescue)
        self.model = model  # the torch model the fp32 artifact came from (weight sensitivity), or None
        self.calibration, self.samples = calibration, samples
        self.reference, self.labels, self.metric = reference, labels, metric
        self.subset = min(subset or len(samples), len(samples))
        self.fp32_metric = self._fp32(self.subset)
        self.fp32_metric_full = self._fp32(len(samples))
        self.max_drop, self.time_budget_s, self.max_steps = max_drop, time_budget_s, max_steps
        self.timing_runs = timing_runs
        self.start = time.perf_counter()
        self.history: list[Scored] = []
        self.tag = f"[{target}] quantize search"

    def torch_samples(self, n: int) -> list[tuple]:
        """The first ``n`` calibration samples as positional torch inputs of the model."""
        import torch

        return [tuple(torch.from_numpy(v) for v in self.calibration.sample(i).values())
                for i in range(min(n, len(self.calibration)))]

    def _fp32(self, n: int) -> float:
        labels = None if self.labels is None else self.labels[:n]
        return score(self.metric, self.reference[:n], self.reference[:n], labels)

    @property
    def best(self) -> Optional[Scored]:
        return choose_best(self.history, self.max_drop)

    def remaining(self) -> float:
        return self.time_budget_s - (time.perf_counter() - self.start)

    def evaluate(self, candidate: Candidate, artifact, seconds: float) -> Scored:
        """Score on the subset; if that is within budget and the subset is not the whole set, on the
        whole set too, which then decides."""
        runner = self.backend.load(Path(artifact.path), self.runtime)
        outs = [np.asarray(runner.run(s)[0]).reshape(-1) for s in self.samples[:self.subset]]
        drop = self._drop(outs)
        n = self.subset
        if drop <= self.max_drop + 1e-9 and n < len(self.samples):
            outs += [np.asarray(runner.run(s)[0]).reshape(-1) for s in self.samples[n:]]
            n = len(self.samples)
            drop = self._drop(outs)
        lat = _latency_ms(runner, self.samples[0], self.timing_runs)
        del runner
        fp32 = self.fp32_metric if n == self.subset else self.fp32_metric_full
        return Scored(candidate, artifact, fp32 - drop, drop, lat, seconds, scored_on=n)

    def _drop(self, outs: list[np.ndarray]) -> float:
        n = len(outs)
        labels = None if self.labels is None else self.labels[:n]
        return self._fp32(n) - score(self.metric, np.stack(outs), self.reference[:n], labels)


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


def within(s: Scored, max_drop: float) -> bool:
    return s.drop <= max_drop + 1e-9


def choose_best(history: list[Scored], max_drop: float) -> Optional[Scored]:
    """The fastest artifact within the accuracy budget; if none is, the one with the lowest drop."""
    ok = [s for s in history if within(s, max_drop)]
    if ok:
        return min(ok, key=lambda s: (s.latency_ms if s.latency_ms is not None else float("inf")))
    # ties (drops equal to 1e-4) go to the faster artifact
    return min(history, key=lambda s: (round(s.drop, 4), s.latency_ms or 0.0)) if history else None


# -- the ladder ---------------------------------------------------------------------------------------

def ladder(ctx: SearchContext, fp32) -> Iterator[Candidate]:
    """The candidates after the first build, least fallback first (module docstring). Reads
    ``ctx.history`` between steps."""
    backend = ctx.backend
    # Rung 0: the profile's quantization without the quality methods, when they were applied: a method
    # that hurts this model (or meets a converter bug: litert-torch mistranslated a float scale in front
    # of a Linear fed by a concat on the tiny example, drop 0.46) must never leave edgekit worse off than
    # the vendor's own flow.
    if ctx.profile_opts is not None and ctx.history[0].candidate.label != PLAIN:
        yield Candidate(f"{PLAIN} (without the quality methods)", ctx.profile_opts)
    best = ctx.best.candidate
    base, source = best.opts, best.source
    # Rung 1: quantization-aware distillation of the best model so far, quantized with the same options.
    if ctx.distill_steps and ctx.export is not None:
        from edgekit.quantize.qad import distill_for_int8

        best = ctx.best.candidate
        tuned, facts = distill_for_int8(best.model or ctx.model, ctx.torch_samples(len(ctx.calibration)),
                                        ctx.distill_steps, ctx.distill_lr, keep_float=best.float_modules,
                                        prefix=ctx.target)
        yield Candidate(f"quantization-aware distillation ({ctx.distill_steps} steps, {facts['layers']} int8 layers; "
                        f"held-out loss with int8 rounding {facts['held_out_loss_int8'][0]:.3g} -> "
                        f"{facts['held_out_loss_int8'][1]:.3g})", best.opts, kept_float=list(best.kept_float),
                        source=ctx.export(tuned, "distilled"), model=tuned, float_modules=best.float_modules)
        best = ctx.best.candidate
        base, source = best.opts, best.source
    # Rung 2+: float fallback around the worst activations of the latest build, re-ranked every step.
    kept = set(backend.float_units(base))
    art = ctx.best.artifact
    k = 1
    while True:
        say(f"{ctx.tag}: per-channel SQNR of each quantized activation on "
            f"{min(SENSITIVITY_SAMPLES, len(ctx.calibration))} calibration samples")
        ranked = backend.rank_activations(art, ctx.calibration, SENSITIVITY_SAMPLES)
        fresh = [(set(u) - kept, db) for u, db in ranked if set(u) - kept]
        if not fresh:
            return
        fresh = by_gain_per_cost(fresh, backend.unit_macs(art, sorted(set().union(*(u for u, _ in fresh)))))
        say(f"{ctx.tag}: first in line (median per-channel SQNR dB, MACs kept in float): "
            + ", ".join(f"{'/'.join(sorted(u))[:60]} {db:.1f} dB {macs / 1e6:.2f}M" for u, db, macs in fresh[:5]))
        k = max(k, sum(1 for _, db, _ in fresh if db < BROKEN_DB))
        for u, _, _ in fresh[:k]:
            kept |= u
        yield Candidate(f"float fallback: the units around the {min(k, len(fresh))} activations with the most "
                        f"noise per MAC given back ({len(kept)} in float in all)", backend.keep_in_float(base, kept),
                        kept_float=sorted(kept), source=source)
        art = ctx.history[-1].artifact
        k *= 2


def by_gain_per_cost(fresh: list[tuple[set, float]], macs: dict[str, int]) -> list[tuple[set, float, int]]:
    """Latency-aware order of the fallback candidates: what an activation's units cost in float (their
    MACs: int8 matmuls and convolutions are what float gives away; elementwise units cost next to
    nothing) against what keeping them buys (the activation's quantization noise, 10^(-SQNR/10)).
    Broken activations (SQNR under ``BROKEN_DB``) come first whatever they cost; then the most noise
    removed per MAC. With no cost known the order is the SQNR ranking's. Returns (units, dB, MACs)."""
    costs = [sum(macs.get(x, 0) for x in u) for u, _ in fresh]
    floor = max(1, int(np.median([c for c in costs if c] or [1]) * 0.01))  # elementwise: about free, not free

    def key(i: int):
        u, db = fresh[i]
        return (db >= BROKEN_DB, -(10 ** (-db / 10)) / (costs[i] + floor), db)

    return [(fresh[i][0], fresh[i][1], costs[i]) for i in sorted(range(len(fresh)), key=key)]


# -- the driver ---------------------------------------------------------------------------------------

def search(ctx: SearchContext, fp32, first, start: Start, out: Path,
           candidates: Optional[Callable[[SearchContext], Iterator[Candidate]]] = None) -> tuple[Any, SearchOutcome]:
    """Score ``first`` (built with ``start``: the profile's quantization and the quality methods); climb
    the ladder if it misses the budget. Returns the artifact to ship (its files moved into ``out``) and
    the outcome for the report. ``candidates`` replaces the ladder (tests)."""
    cand = Candidate(start.label, start.opts, kept_float=ctx.backend.float_units(start.opts), source=start.source,
                     model=start.model, float_modules=list(start.float_modules))
    first_scored = ctx.evaluate(cand, first, 0.0)
    ctx.history.append(first_scored)
    say(f"{ctx.tag}: first build drop {first_scored.drop:+.4f} ({ctx.metric} on {first_scored.scored_on} samples), "
        f"~{first_scored.latency_ms:.2f} ms; budget {ctx.max_drop:g}")
    stop = "first quantization within budget"
    ctx.start = time.perf_counter()  # the budget is for the search itself
    if not within(first_scored, ctx.max_drop):
        gen = candidates(ctx) if candidates else ladder(ctx, fp32)
        stop = _loop(ctx, fp32, out, gen)
    best = ctx.best
    art = _keep(best, ctx.history, out)
    ok = within(best, ctx.max_drop)
    outcome = SearchOutcome(
        status="ok" if ok else "failed",
        reason=None if ok else (f"accuracy budget not met (best drop {best.drop:.4f} at {best.latency_ms:.2f} ms; "
                                f"max_metric_drop {ctx.max_drop:g}; {stop})"),
        max_metric_drop=ctx.max_drop, metric=ctx.metric, eval_samples=ctx.subset,
        fp32_metric_on_subset=round(ctx.fp32_metric, 6), time_budget_s=ctx.time_budget_s,
        search_s=round(time.perf_counter() - ctx.start, 2) if len(ctx.history) > 1 else 0.0,
        stopped=stop, steps=[s.step() for s in ctx.history], chosen=ctx.history.index(best),
        kept_float=best.kept_float,
        before={"drop": round(first_scored.drop, 6), "latency_ms": round(first_scored.latency_ms, 3)},
        after={"drop": round(best.drop, 6), "latency_ms": round(best.latency_ms, 3)},
        latency_cost_ms=round(best.latency_ms - first_scored.latency_ms, 3))
    say(f"{ctx.tag}: {'ok' if ok else 'FAILED'}: step {outcome.chosen} '{best.candidate.label}', drop "
        f"{first_scored.drop:+.4f} -> {best.drop:+.4f}, ~{first_scored.latency_ms:.2f} -> "
        f"{best.latency_ms:.2f} ms, {len(best.kept_float)} kept in float ({stop})")
    return art, outcome


def _loop(ctx: SearchContext, fp32, out: Path, gen: Iterator[Candidate]) -> str:
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
            say(f"{ctx.tag}: the sensitivity pass failed ({msg})")
            return f"sensitivity pass failed ({msg})"
        i = len(ctx.history)
        say(f"{ctx.tag} step {i}: {cand.label} ({left:.0f} s of budget left)")
        folder = out / "search" / f"step{i}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            art, cand.opts = rescue.quantize(ctx.backend, cand.source or fp32, ctx.calibration, folder, cand.opts,
                                             tag=f"{ctx.tag} step {i}", deadline=ctx.start + ctx.time_budget_s,
                                             log=ctx.rescues)
            cand.kept_float = sorted(set(cand.kept_float) | set(ctx.backend.float_units(cand.opts)))
            scored = ctx.evaluate(cand, art, 0.0)
        except Exception as e:  # noqa: BLE001 - a failed candidate is a step, not the target's failure
            say(f"{ctx.tag} step {i}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            costs.append(time.perf_counter() - t0)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        scored.seconds = time.perf_counter() - t0
        costs.append(scored.seconds)
        ctx.history.append(scored)
        say(f"{ctx.tag} step {i}: drop {scored.drop:+.4f} on {scored.scored_on} samples, ~{scored.latency_ms:.2f} ms, "
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
