"""Torch-level rewrites that make a model quantize better without changing what it computes in float.

**Standardize** (for a Linear whose int8 *weights* break its output, ``edgekit.quantize.weights``): a
linear probe fitted on standardised features with the standardisation folded into its weights has a
few weights 10^4x the rest in each row, so one int8 scale per row rounds every ordinary weight to zero.
Keeping the layer in float costs its latency and leaves its input in float; this moves the scale into
the activation instead. For y = W x + b, with c_j, s_j the mean and std of input feature j on the
calibration set:

    x' = (x - c) / s                       (a tiny elementwise module, kept out of int8)
    y  = (W diag(s)) x' + (b + W c)        (a well-conditioned Linear, quantized as usual)

exact in float. The quantized activation is then x' (zero mean, unit std per feature) and the weights
span a normal range. ``s`` is floored at ``FLOOR`` x its largest entry so that a constant feature does
not blow x' up.

**Smooth** (SmoothQuant's scale migration, for a Linear whose input has outlier channels: per-channel
absmax max/median over ``OUTLIER_RATIO`` on the calibration set, e.g. a transformer's FFN inputs): one
per-tensor int8 scale for that activation spends most of its levels on a few channels. With a_j the
input absmax of channel j and w_j the absmax of weight column j, s_j = a_j^alpha / w_j^(1 - alpha)
(normalised to geometric mean 1), and

    x' = x / s                             (a tiny elementwise module, kept out of int8)
    y  = (W diag(s)) x' + b                (per-output-channel int8 weights absorb s)
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

FLOOR = 1e-3
OUTLIER_RATIO = 8.0


class Standardize(nn.Module):
    """x -> (x - mean) * inv_std over the last axis; added by ``standardize`` in front of a Linear."""

    def __init__(self, mean: torch.Tensor, inv_std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("inv_std", inv_std.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


@torch.no_grad()
def observe_inputs(model: nn.Module, names: Sequence[str], samples: Sequence[tuple],
                   record: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``samples`` (positional model inputs) through ``model``, calling ``record(name, x)`` with the
    input of each named module on every call."""
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0].detach()))
               for n in names]
    try:
        for args in samples:
            model(*args)
    finally:
        for h in handles:
            h.remove()


def input_stats(model: nn.Module, names: Sequence[str], samples: Sequence[tuple]) -> dict[str, tuple]:
    """Per-input-feature mean and std (last axis; every row/token counts) of each named module's input."""
    acc = {n: [0, 0.0, 0.0] for n in names}

    def record(n: str, x: torch.Tensor) -> None:
        x = x.double().reshape(-1, x.shape[-1])
        a = acc[n]
        a[0], a[1], a[2] = a[0] + x.shape[0], a[1] + x.sum(0), a[2] + (x * x).sum(0)

    observe_inputs(model, names, samples, record)
    out = {}
    for n, (k, s1, s2) in acc.items():
        mean = s1 / k
        out[n] = (mean, (s2 / k - mean * mean).clamp(min=0).sqrt())
    return out


@torch.no_grad()
def standardize(model: nn.Module, names: Sequence[str], samples: Sequence[tuple]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each named ``nn.Linear`` replaced by ``Sequential(Standardize, Linear')``.
    Returns (the copy, the names of the Standardize modules, which a backend must keep in float).
    ``samples``: positional model inputs (torch tensors) from the calibration set."""
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    if not linears:
        return model, []
    new_model = copy.deepcopy(model)
    stats = input_stats(new_model, linears, samples)
    added = []
    for n in linears:
        lin: nn.Linear = new_model.get_submodule(n)
        mean, std = stats[n]
        std = torch.maximum(std, FLOOR * std.max()).clamp(min=1e-12)
        w = lin.weight.double()
        b = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        new = nn.Linear(lin.in_features, lin.out_features, bias=True)
        new.weight.copy_((w * std[None, :]).to(lin.weight.dtype))
        new.bias.copy_((b + w @ mean).to(lin.weight.dtype))
        parent, _, leaf = n.rpartition(".")
        setattr(new_model.get_submodule(parent) if parent else new_model, leaf,
                nn.Sequential(Standardize(mean, 1.0 / std), new))
        added.append(f"{n}.0")
    return new_model.eval(), added


class ChannelScale(nn.Module):
    """x -> x * inv_scale over the last axis; added by ``smooth`` in front of a Linear."""

    def __init__(self, inv_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_scale", inv_scale.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv_scale


def input_absmax(model: nn.Module, names: Sequence[str], samples: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax (last axis) of each named module's input over the samples."""
    acc: dict[str, torch.Tensor] = {}

    def record(n: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).double()
        acc[n] = torch.maximum(acc[n], m) if n in acc else m

    observe_inputs(model, names, samples, record)
    return acc


@torch.no_grad()
def smooth(model: nn.Module, samples: Sequence[tuple], alpha: float, ratio: float = OUTLIER_RATIO,
           exclude: Sequence[str] = ()) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every ``nn.Linear`` whose input has outlier channels (absmax max/median >
    ``ratio``) replaced by ``Sequential(ChannelScale, Linear')``. Returns (the copy, the names of the
    ChannelScale modules, which a backend must keep in float); ``model`` itself if none qualifies."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in set(exclude)]
    stats = input_absmax(model, linears, samples)
    outliers = [n for n, a in stats.items() if float(a.max() / a.median().clamp(min=1e-12)) > ratio]
    if not outliers:
        return model, []
    new_model = copy.deepcopy(model)
    added = []
    for n in outliers:
        lin: nn.Linear = new_model.get_submodule(n)
        a = stats[n].clamp(min=1e-5)
        w = lin.weight.detach().double().abs().amax(0).clamp(min=1e-5)
        s = a.pow(alpha) / w.pow(1 - alpha)
        s = s / s.log().mean().exp()
        new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight.copy_((lin.weight.double() * s[None, :]).to(lin.weight.dtype))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
        parent, _, leaf = n.rpartition(".")
        setattr(new_model.get_submodule(parent) if parent else new_model, leaf,
                nn.Sequential(ChannelScale(1.0 / s), new))
        added.append(f"{n}.0")
    return new_model.eval(), added
