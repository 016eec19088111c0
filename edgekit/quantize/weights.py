"""Which layers' int8 *weights* break their output, measured on the fp32 torch model.

The search's activation rankings (PT2E q/dq pairs, OpenVINO FakeQuantize, ORT QDQ) only see activation
noise. A layer whose weights have a few huge entries per output channel (e.g. a linear probe fitted on
standardised features with the standardisation folded in: a near-constant feature gets weight 1/std)
loses every ordinary weight of that channel to int8 rounding (one scale per channel = absmax/127),
while its activations look fine. Here each Conv/Linear layer is run on its real fp32 inputs (a few
calibration samples) once with its own weights and once with them fake-quantized the way the targets
do (symmetric int8, per output channel or per tensor); the ratio of output energy to the difference
is the layer's weight-quantization SQNR in dB. Healthy layers score 30 dB or more.
"""
from __future__ import annotations

import math
from typing import Iterable


def fake_quant_weight(w, per_channel: bool = True, bits: int = 8):
    """Symmetric int8 (-127..127) fake quantization; per output channel (dim 0) or per tensor."""
    q = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_channel and w.dim() > 1 \
        else w.abs().max()
    s = (amax / q).clamp(min=1e-12)
    return (w / s).round().clamp(-q, q) * s


WEAK_DB = 20.0
"""A Conv/Linear whose output with int8 weights (symmetric, per output channel or per tensor; fp32 inputs)
has an SQNR under this is kept in float by the accuracy search's first step. Measured on mnist_bbc: the
two linear probes (standardisation folded into the weights: per-row max/median up to 6e4) 2.1 and
10.8 dB, every other of its 88 layers >= 37.6 dB per-channel."""


def weak_layers(model, calibration, per_channel: bool, samples: int) -> list[tuple[str, float]]:
    """Conv/Linear modules of ``model`` whose int8 weights leave their output under ``WEAK_DB``, worst
    first (none when ``model`` is None)."""
    if model is None:
        return []
    ranked = weight_sensitivity(model, [calibration.sample(i) for i in range(min(samples, len(calibration)))],
                                per_channel)
    return [(m, v) for m, v in ranked if v < WEAK_DB]


def weight_sensitivity(model, samples: Iterable[dict], per_channel: bool = True) -> list[tuple[str, float]]:
    """[(module name, output SQNR dB)] for every Conv/Linear with a weight, worst first. ``samples``:
    feeds (name -> numpy array), passed to ``model`` as keywords in order of its forward's parameters."""
    import torch
    from torch import nn

    sums: dict[str, list[float]] = {}

    def hook(name):
        def run(mod, args, kwargs, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            w = mod.weight.data
            try:
                mod.weight.data = fake_quant_weight(w, per_channel)
                yq = mod.forward(*args, **kwargs)  # forward, not __call__: no hooks again
            finally:
                mod.weight.data = w
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] += float(out.double().pow(2).sum())
            s[1] += float((out.double() - yq.double()).pow(2).sum())
        return run

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules()
               if isinstance(m, kinds) and getattr(m, "weight", None) is not None]
    try:
        with torch.no_grad():
            for feeds in samples:
                model(*[torch.from_numpy(v) for v in feeds.values()])
    finally:
        for h in handles:
            h.remove()
    ranked = [(n, 10 * math.log10(sig / noise) if noise > 0 else math.inf) for n, (sig, noise) in sums.items()
              if sig > 0]
    return sorted(ranked, key=lambda t: t[1])
