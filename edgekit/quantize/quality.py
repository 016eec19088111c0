"""The quality methods every build starts with: better quantization before any layer leaves int8.

- The backend's cheap fixes (``Backend.quality_fixes``: e.g. ReLU6 fused with its conv, attention's
  activation-by-activation matmuls kept out of int8 where the toolchain gains nothing from them).
- Layers whose int8 *weights* break their output (``edgekit.quantize.weights``, output SQNR under
  ``WEAK_DB``): a Linear is standardized (``edgekit.quantize.rewrite``: the scale of a folded input
  standardisation moves into the activation; the rewritten model is exported to quantize from, the fp32
  baseline stays the original), anything else is kept in float.
- Where the backend asks for it (``Backend.smoothing``): SmoothQuant's scale migration for Linear layers
  whose input has outlier channels (``edgekit.quantize.rewrite.smooth``).

``prepare`` returns what the first quantization is built with; the accuracy search
(``edgekit.quantize.search``) scores it and climbs from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from edgekit.progress import say

SAMPLES = 8
"""Calibration samples the weight-sensitivity pass runs on."""


@dataclass
class Start:
    """What the first quantization is built with."""

    opts: Any
    source: Any = None
    """The fp32 artifact to quantize from when the torch model was rewritten (None: the baseline's)."""
    model: Any = None
    """The torch model ``source`` came from (None: the original)."""
    float_modules: list[str] = field(default_factory=list)
    """Torch modules kept in float (what later torch-level rungs must leave alone)."""
    methods: list[str] = field(default_factory=list)
    """What was applied, for people."""
    rewritten: list[str] = field(default_factory=list)
    """The elementwise modules the rewrites added (kept in float)."""

    @property
    def label(self) -> str:
        from edgekit.quantize.search import PLAIN

        return PLAIN + (" + " + " + ".join(self.methods) if self.methods else "")


def prepare(backend, fp32, opts, model, calibration, export: Optional[Callable[[Any, str], Any]],
            tag: str = "quantize") -> Start:
    """The profile's options with the backend's quality fixes, the weak-weight layers handled and,
    where the backend asks for it, outlier input channels smoothed. ``model``: the torch model ``fp32``
    came from (None: no torch-level methods); ``export(model, name)``: exports a rewritten model (None:
    no rewrites, weak layers are kept in float instead)."""
    start = Start(opts)
    for fix in backend.quality_fixes(fp32, opts):
        start.methods.append(fix.label)
        start.opts = start.opts.model_copy(update=fix.update)
    if model is not None:
        samples = _torch_samples(calibration)
        _weak_weights(backend, fp32, model, calibration, samples, export is not None, start, tag)
        if export is not None:
            _smooth(backend, model, samples, start, tag)
        if start.model is not None:  # rewritten: export once, keep what the rewrites added in float
            start.source = export(start.model, "rewritten")
            start.opts = backend.keep_in_float(start.opts, backend.units_of_modules(start.source, start.rewritten))
    if start.methods:
        say(f"{tag}: quality methods: {'; '.join(start.methods)}")
    return start


def _torch_samples(calibration) -> list[tuple]:
    import torch

    return [tuple(torch.from_numpy(v) for v in calibration.sample(i).values()) for i in range(len(calibration))]


def _smooth(backend, model, samples, start: Start, tag: str) -> None:
    """SmoothQuant's scale migration into the weights, where the backend asks for it."""
    from edgekit.quantize.rewrite import OUTLIER_RATIO, smooth

    alpha = backend.smoothing(start.opts)
    if alpha is None:
        return
    base = start.model if start.model is not None else model
    owned = [n.rpartition(".")[0] for n in start.rewritten]  # standardized layers: Sequential(Standardize, Linear)
    new, added = smooth(base, samples[:32], alpha, exclude=owned + [f"{n}.1" for n in owned])
    if not added:
        return
    start.model = new
    start.rewritten += added
    start.methods.append(f"SmoothQuant scale migration (alpha {alpha:g}) into the {len(added)} Linear layers whose "
                         f"input has outlier channels (absmax max/median > {OUTLIER_RATIO:g})")


def _weak_weights(backend, fp32, model, calibration, samples, rewrites: bool, start: Start, tag: str) -> None:
    from edgekit.quantize.rewrite import standardize
    from edgekit.quantize.weights import WEAK_DB, weak_layers

    weak = weak_layers(model, calibration, backend.weights_per_channel(start.opts), SAMPLES)
    if not weak:
        return
    say(f"{tag}: layers whose int8 weights break their output (SQNR dB): "
        + ", ".join(f"{m} {v:.1f}" for m, v in weak[:5]))
    names, done = [m for m, _ in weak], []
    if rewrites:
        rewritten, added = standardize(model, names, samples)
        if added:
            done = [a.rpartition(".")[0] for a in added]
            start.model, start.rewritten = rewritten, start.rewritten + added
    rest = [n for n in names if n not in done]
    units = backend.units_of_modules(fp32, rest) if rest else []
    if units:
        start.opts = backend.keep_in_float(start.opts, units)
        start.float_modules = rest
    parts = ([f"{len(done)} standardized (scale moved into the activation)"] if done else []) + \
        ([f"{len(rest)} kept in float ({len(units)} units)"] if units else [])
    if parts:
        start.methods.append(f"the {len(weak)} layers whose int8 weights lose most (weight SQNR < {WEAK_DB:g} dB): "
                             + ", ".join(parts))
