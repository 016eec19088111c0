"""Accuracy recovery without labels: distillation from the unpruned fp32 model, then BatchNorm
re-estimation, both on the calibration inputs only.

Distillation: ``recover_steps`` Adam steps (cosine-decayed learning rate) on the mean squared error
between the pruned model's output and the teacher's (precomputed once), scaled by the teacher
outputs' mean square so the learning rate does not depend on the output's scale, early-stopped on
held-out calibration batches (see :func:`distill`). Only the towers
that were pruned are trained: Adam moves every parameter it is given by about ``lr`` a step whatever
its gradient, which on the demo drifted an untouched pretrained tower (distillation loss 0.013 ->
0.097 when only the text tower was pruned). Dropout stays off (eval mode) and BatchNorm uses its
running statistics while training; the statistics are then re-estimated over the calibration set
(cumulative average), since pruning changed the activations they describe. Both steps are kept only
if the pruned model then follows the teacher more closely on the calibration set.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

from edgekit.inputs.model import first_output
from edgekit.progress import bar, say


def distill(model: nn.Module, batches: Sequence[tuple], teacher: Sequence[torch.Tensor], steps: int, lr: float,
            desc: str, params: Sequence[nn.Parameter], held: Sequence[tuple],
            held_teacher: Sequence[torch.Tensor]) -> dict:
    """``steps`` Adam steps on ``params`` cycling over ``batches``. The state with the lowest loss on
    the ``held`` batches is kept (early stopping: on the tiny example the calibration loss reached
    1e-5 while the held-out loss stalled at 0.04). Returns the held-out losses and the step kept."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    scale = [t.float().pow(2).mean().clamp(min=1e-12) for t in teacher]
    every = max(1, steps // 10)
    best, best_step, best_state = kd_loss(model, held, held_teacher), 0, [p.detach().clone() for p in params]
    curve = [(0, best)]
    cycle = itertools.cycle(range(len(batches)))
    with torch.enable_grad():
        for k in bar(range(1, steps + 1), steps, desc):
            i = next(cycle)
            loss = (first_output(model(*batches[i])).float() - teacher[i].float()).pow(2).mean() / scale[i]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if k % every == 0 or k == steps:
                held_loss = kd_loss(model, held, held_teacher)
                curve.append((k, held_loss))
                say(f"{desc}: step {k}/{steps}, loss {float(loss.detach()):.4g}, held-out {held_loss:.4g}")
                if held_loss < best:
                    best, best_step, best_state = held_loss, k, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
    model.zero_grad(set_to_none=True)
    return {"held_out_loss": [[k, round(v, 6)] for k, v in curve], "kept_step": best_step}


def kd_loss(model: nn.Module, batches: Sequence[tuple], teacher: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(((first_output(model(*b)).float() - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
                         for b, t in zip(batches, teacher)) / max(1, len(batches)))


def reestimate_batchnorm(model: nn.Module, batches: Sequence[tuple], held: Sequence[tuple],
                         held_teacher: Sequence[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running mean/var over the batches; keep them only if the pruned
    model then follows the teacher more closely on the ``held`` batches (a model whose statistics
    never came from data, e.g. untrained, is better off without). Return how many were updated (0 =
    kept the old ones)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    before = kd_loss(model, held, held_teacher)
    old = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over all batches
        m.train()
    try:
        with torch.no_grad():
            for args in batches:
                model(*args)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    if kd_loss(model, held, held_teacher) > before:
        for m, state in zip(bns, old):
            m.load_state_dict(state)
        return 0
    return len(bns)
