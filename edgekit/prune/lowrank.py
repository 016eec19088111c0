"""Low-rank factorization (``[prune.low_rank]``): a Linear (or 1x1 Conv) ``W`` (out x in) kept at rank r,
``W ~ U_r S_r V_r^T``, becomes two thinner layers, ``in -> r`` (weight ``sqrt(S_r) V_r^T``, no bias) then
``r -> out`` (weight ``U_r sqrt(S_r)``, the bias): multiply-accumulates ``out*in -> r*(in+out)``.

**The rank rule.** Per layer, the smallest r whose singular values keep ``energy`` of the weight's
squared Frobenius norm (``sum_{i<=r} s_i^2 >= energy * sum s_i^2``), rounded up to the target's
``round_to`` (the same width multiple pruning uses), and the layer is left alone when ``r*(in+out) >=
out*in`` (it would not pay) or when it has fewer than ``min_size`` weights. The energy is per tower
(input modality), like the pruning ratios; layers are chosen by type and by ``include`` name patterns.

Before any recovery, each factorized layer's output error is bounded by the energy it drops: for any
input x, ``|W x - W_r x| <= s_{r+1} |x|`` and ``|W - W_r|_F^2 = (1 - kept energy) |W|_F^2``.

Order: pruning first, then factorization (the factorized widths are of the pruned layers), then one
recovery (``edgekit.prune.recovery.distill``, keep-if-better) over the factorized layers.
"""
from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import nn


class Factorized(nn.Sequential):
    """``nn.Sequential(first, second)``: the two thin layers a factorized layer became (a marker type)."""


def rank_for(s: torch.Tensor, energy: float, round_to: int) -> int:
    """The smallest rank keeping ``energy`` of sum(s^2), rounded up to a multiple of ``round_to``."""
    e = torch.cumsum(s.double() ** 2, 0) / float((s.double() ** 2).sum())
    r = int(torch.searchsorted(e, torch.tensor(energy - 1e-12, dtype=e.dtype)).item()) + 1
    r = min(len(s), r)
    return min(len(s), -(-r // round_to) * round_to)


def _matrix(m: nn.Module) -> Optional[torch.Tensor]:
    if isinstance(m, nn.Linear):
        return m.weight.detach()
    if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 and m.stride == (1, 1) \
            and m.padding in ((0, 0), 0) and m.dilation == (1, 1):
        return m.weight.detach()[:, :, 0, 0]
    return None


def _split(m: nn.Module, r: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> Factorized:
    root = s[:r].sqrt()
    a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        first, second = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=bias)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    else:
        first, second = nn.Conv2d(m.in_channels, r, 1, bias=False), nn.Conv2d(r, m.out_channels, 1, bias=bias)
        first.weight.data.copy_(a[:, :, None, None])
        second.weight.data.copy_(b[:, :, None, None])
    if bias:
        second.bias.data.copy_(m.bias.detach())
    return Factorized(first, second).to(m.weight.dtype)


def factorize(model: nn.Module, energy_of, round_to: int, include: list[str], layer_types: list[str],
              min_size: int) -> list[dict]:
    """Factorize ``model`` in place. ``energy_of(name)``: the energy to keep for that layer (None: leave
    it); ``include``: fnmatch patterns on module names (empty: every layer of the chosen types). Returns
    one row per considered layer: name, shape, rank, kept energy, params before/after, and why a layer
    was left alone."""
    rows = []
    for name, m in list(model.named_modules()):
        kind = "Linear" if isinstance(m, nn.Linear) else "Conv1x1" if isinstance(m, nn.Conv2d) else None
        if kind not in layer_types or (include and not any(fnmatch.fnmatchcase(name, p) for p in include)):
            continue
        w = _matrix(m)
        energy = energy_of(name)
        if w is None or energy is None:
            continue
        out_f, in_f = w.shape
        row = {"layer": name, "type": kind, "shape": [out_f, in_f], "energy": energy}
        if w.numel() < min_size:
            rows.append({**row, "rank": None, "skipped": f"{w.numel()} weights < min_size {min_size}"})
            continue
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = rank_for(s, energy, round_to)
        kept = float((s[:r] ** 2).sum() / (s ** 2).sum())
        if r * (in_f + out_f) >= out_f * in_f:
            rows.append({**row, "rank": r, "skipped": f"rank {r} does not pay: {r}*({in_f}+{out_f}) >= {out_f}*{in_f}"})
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _split(m, r, u.float(), s.float(), vh.float()))
        rows.append({**row, "rank": r, "kept_energy": round(kept, 6), "sigma_next": float(s[r]) if r < len(s) else 0.0,
                     "params_before": out_f * in_f, "params_after": r * (in_f + out_f)})
    return rows


def energies(spec, towers: dict[str, set[str]]):
    """``energy_of(name)`` for ``factorize``: the tower's energy (``spec.energies``, by input modality)
    for a layer fed by one tower, else ``spec.energy`` (None: not factorized)."""
    def energy_of(name: str) -> Optional[float]:
        mods = towers.get(name, set())
        if len(mods) == 1 and next(iter(mods)) in spec.energies:
            return spec.energies[next(iter(mods))]
        return spec.energy
    return energy_of
