"""Exact rewrites of torch modules that a toolchain cannot convert, applied when its export names the op.

``nn.Bilinear`` traces to ``aten._trilinear``, which litert-torch ("Lowering not found") and OpenVINO
("No conversion rule found") do not convert, while ONNX Runtime's exporter does. The same function
written as a Linear over one input, a reshape, a product with the other input and a sum converts
everywhere, and its Linear quantizes like any other. The rewrite is exact (the same sums, in another
order: float round-off only) and is applied to a copy of the model, only for a target whose export
failed on the op, so nothing changes where the toolchain copes.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class BilinearAsLinear(nn.Module):
    """``nn.Bilinear(x1, x2)`` = sum_ij x1_i W_oij x2_j + b_o, as ``Linear(x1)`` reshaped to (o, j),
    times x2, summed over j."""

    def __init__(self, bil: nn.Bilinear):
        super().__init__()
        o, i, j = bil.weight.shape
        self.out_features, self.in2 = o, j
        self.linear = nn.Linear(i, o * j, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(bil.weight.detach().permute(0, 2, 1).reshape(o * j, i))
        self.bias = None if bil.bias is None else nn.Parameter(bil.bias.detach().clone())

    def forward(self, x1, x2):
        y = (self.linear(x1).unflatten(-1, (self.out_features, self.in2)) * x2.unsqueeze(-2)).sum(-1)
        return y if self.bias is None else y + self.bias


REWRITES = {"_trilinear": (nn.Bilinear, BilinearAsLinear)}
"""The op a toolchain's message names -> (the module that traces to it, its exact replacement)."""


def rewrite(model: nn.Module, message: str) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every module replaced whose op ``message`` names, and the replaced
    modules' names ([] and ``model`` itself when the message names no op in ``REWRITES``)."""
    ops = [op for op in REWRITES if op in message]
    return rewrite_ops(model, ops) if ops else (model, [])


def rewrite_ops(model: nn.Module, ops: list[str]) -> tuple[nn.Module, list[str]]:
    kinds = {REWRITES[op] for op in ops}
    names = [n for n, m in model.named_modules() if any(type(m) is cls for cls, _ in kinds)]
    if not names:
        return model, []
    new = copy.deepcopy(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        old = getattr(parent, attr)
        make = next(f for cls, f in kinds if type(old) is cls)
        setattr(parent, attr, make(old))
    return new.eval(), names
