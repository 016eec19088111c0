"""Quantization-aware distillation: the rung before float fallback.

Post-training quantization rounds every weight to its int8 grid and every Conv/Linear input to a
per-tensor grid, independently; the errors add up through a deep tower. Here the model is fine-tuned
*with* that rounding in the loop (fake quantization, straight-through gradients) to follow the fp32
teacher's outputs on the calibration inputs: label-free, like the pruning recovery, and with its
training loop (``edgekit.prune.recovery.distill``: Adam, cosine learning rate, early stopping on held-out
calibration batches). The result is a float model whose weights sit on their int8 grid (per output
channel, symmetric: what every edgekit target uses) and have learnt to compensate the activation
rounding; the target's own toolchain then quantizes it as usual, so the shipped artifact keeps
full-int8 speed, where keeping layers in float gives speed away.

Activation ranges are the calibration set's min/max (per-tensor, asymmetric 8-bit), measured once on
the fp32 model; the toolchain calibrates again on the tuned model, on the same data.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from edgekit.progress import step

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _WeightInt8(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight (straight-through gradient)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / 127).clamp(min=1e-12)
        return torch.fake_quantize_per_channel_affine(w, scale.float(), torch.zeros_like(scale, dtype=torch.int32),
                                                      0, -127, 127)


def _input_fq(lo: float, hi: float):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255
    zero = int(round(-lo / scale))

    def hook(mod, args):
        return (torch.fake_quantize_per_tensor_affine(args[0], scale, zero, 0, 255), *args[1:])
    return hook


def _input_ranges(model: nn.Module, names: Sequence[str], batches: Sequence[tuple]) -> dict[str, list[float]]:
    """Min and max of each named module's (float) input over the batches."""
    from edgekit.quantize.rewrite import observe_inputs

    rng: dict[str, list[float]] = {}

    def record(n: str, x: torch.Tensor) -> None:
        if x.is_floating_point():
            r = rng.setdefault(n, [float("inf"), float("-inf")])
            r[0], r[1] = min(r[0], float(x.min())), max(r[1], float(x.max()))

    observe_inputs(model, names, batches, record)
    return rng


def distill_for_int8(model: nn.Module, samples: Sequence[tuple], steps: int, lr: float = 1e-5,
                     batch_size: int = 8, keep_float: Sequence[str] = (), prefix: str = "qad") -> tuple[nn.Module, dict]:
    """A copy of ``model`` fine-tuned against its own fp32 outputs with int8 fake quantization of every
    Conv/Linear (weights and inputs) except ``keep_float``; its weights are left on their int8 grid.
    ``samples``: positional model inputs (calibration set). Returns (model, facts for the report)."""
    from edgekit.prune import make_batches, outputs_of
    from edgekit.prune.recovery import distill, kd_loss

    student = copy.deepcopy(model).eval()
    names = [n for n, m in student.named_modules() if isinstance(m, LAYERS) and n not in set(keep_float)]
    batches = make_batches(student, samples, batch_size)
    teacher = outputs_of(model, batches)
    held = [i for i in range(len(batches)) if i % 5 == 4] or [0]
    train = [i for i in range(len(batches)) if i not in held] or held
    held_b, held_t = [batches[i] for i in held], [teacher[i] for i in held]
    ranges = _input_ranges(student, names, batches)
    handles = []
    for n in names:
        mod = student.get_submodule(n)
        parametrize.register_parametrization(mod, "weight", _WeightInt8())
        if n in ranges:
            handles.append(mod.register_forward_pre_hook(_input_fq(*ranges[n])))
    params = [p for n in names for p in student.get_submodule(n).parameters()]
    with step(prefix, f"quantization-aware distillation: {steps} steps on {len(names)} int8 layers") as s:
        before = kd_loss(student, held_b, held_t)
        facts = distill(student, [batches[i] for i in train], [teacher[i] for i in train], steps, lr,
                        f"[{prefix}] qad", params, held_b, held_t)
        after = kd_loss(student, held_b, held_t)
        s["note"] = f"held-out loss with int8 rounding {before:.4g} -> {after:.4g}"
    for h in handles:
        h.remove()
    with torch.no_grad():
        for n in names:  # leave the weights on their int8 grid: any per-channel int8 quantizer reproduces them
            parametrize.remove_parametrizations(student.get_submodule(n), "weight", leave_parametrized=True)
    for p in student.parameters():
        p.requires_grad_(False)
    return student.eval(), {"layers": len(names), "steps": steps, "lr": lr, "held_out_loss_int8": [round(before, 6),
                                                                                                   round(after, 6)],
                            "kept_step": facts["kept_step"]}
