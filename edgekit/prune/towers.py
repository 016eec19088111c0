"""Which tower does a layer belong to? Derived from the data, not from module names.

For each recipe input, the forward is run twice with only that input changed (another calibration
sample's value); every layer whose output changed depends on that input. A layer's modalities are the
modalities (``[model] inputs``) of the inputs it depends on: one modality = that tower, several = a
fusion layer (it gets the global ratio).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from edgekit.inputs.model import first_output
from edgekit.config.recipe import InputSpec


def layer_outputs(model: nn.Module, layers: dict[str, nn.Module], args) -> dict[str, torch.Tensor]:
    """Name -> output of each of ``layers`` in one forward of ``model`` on ``args``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in layers.items():
        def hook(_m, _i, out, name=name):
            out = first_output(out)
            if isinstance(out, torch.Tensor):
                seen[name] = out.detach().clone()
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def layer_modalities(model: nn.Module, specs: Sequence[InputSpec], samples: Sequence[tuple]) -> dict[str, set[str]]:
    """Layer name -> modalities of the recipe inputs that feed it (needs >= 2 distinct samples). Layers:
    every module holding parameters of its own (Conv/Linear, and norms and embeddings for recovery)."""
    layers = {n: m for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None}
    found: dict[str, set[str]] = {n: set() for n in layers}
    base = layer_outputs(model, layers, samples[0])
    for pos, spec in enumerate(specs):
        for other in samples[1:]:
            if torch.equal(other[pos], samples[0][pos]):
                continue
            args = list(samples[0])
            args[pos] = other[pos]
            changed = layer_outputs(model, layers, args)
            for n, out in base.items():
                if n in changed and (changed[n].shape != out.shape or not torch.equal(changed[n], out)):
                    found[n].add(spec.modality)
            break
    return found
