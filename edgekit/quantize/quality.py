"""The quality methods every build starts with: better quantization before any layer leaves int8.

- The backend's cheap fixes (``Backend.quality_fixes``: e.g. ReLU6 fused with its conv, attention's
  activation-by-activation matmuls kept out of int8 where the toolchain gains nothing from them).
- Layers whose int8 *weights* break their output (``edgekit.quantize.weights``, output SQNR under
  ``WEAK_DB``): a Linear is standardized (``edgekit.quantize.rewrite``: the scale of a folded input
  standardisation moves into the activation; the rewritten model is exported to quantize from, the fp32
  baseline stays the original), anything else is kept in float.

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

    @property
    def label(self) -> str:
        return "profile's quantization" + (" + " + " + ".join(self.methods) if self.methods else "")


def prepare(backend, fp32, opts, model, calibration, export: Optional[Callable[[Any, str], Any]],
            tag: str = "quantize") -> Start:
    """The profile's options with the backend's quality fixes, and the weak-weight layers handled.
    ``model``: the torch model ``fp32`` came from (None: weights are not analysed); ``export(model,
    name)``: exports a rewritten model (None: weak layers are kept in float instead of standardized)."""
    start = Start(opts)
    for fix in backend.quality_fixes(fp32, opts):
        start.methods.append(fix.label)
        start.opts = start.opts.model_copy(update=fix.update)
    if model is not None:
        _weak_weights(backend, fp32, model, calibration, export, start, tag)
    if start.methods:
        say(f"{tag}: quality methods: {'; '.join(start.methods)}")
    return start


def _weak_weights(backend, fp32, model, calibration, export, start: Start, tag: str) -> None:
    import torch

    from edgekit.quantize.rewrite import standardize
    from edgekit.quantize.weights import WEAK_DB, weak_layers

    weak = weak_layers(model, calibration, backend.weights_per_channel(start.opts), SAMPLES)
    if not weak:
        return
    say(f"{tag}: layers whose int8 weights break their output (SQNR dB): "
        + ", ".join(f"{m} {v:.1f}" for m, v in weak[:5]))
    names, done = [m for m, _ in weak], []
    if export is not None:
        samples = [tuple(torch.from_numpy(v) for v in calibration.sample(i).values()) for i in range(len(calibration))]
        rewritten, added = standardize(model, names, samples)
        if added:
            done = [a.rpartition(".")[0] for a in added]
            start.model, start.source = rewritten, export(rewritten, "standardized")
            # the elementwise (x - c) / s stays float wherever the backend would otherwise quantize it
            start.opts = backend.keep_in_float(start.opts, backend.units_of_modules(start.source, added))
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
