"""Accuracy recovery without labels: distillation from the unpruned fp32 model, then BatchNorm
re-estimation, both on the calibration inputs only.

Distillation: ``recover_steps`` Adam steps (cosine-decayed learning rate) on the mean squared error
between the pruned model's output and the teacher's (precomputed once), scaled by the teacher
outputs' mean square so the learning rate does not depend on the output's scale. Only the towers
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

from edgekit.model import first_output
from edgekit.progress import bar, say


def distill(model: nn.Module, batches: Sequence[tuple], teacher: Sequence[torch.Tensor], steps: int,
            lr: float, desc: str, params: Sequence[nn.Parameter] | None = None) -> list[float]:
    """Run ``steps`` distillation steps cycling over the batches, training ``params`` (default: all);
    return the loss every step."""
    if steps <= 0:
        return []
    model.eval()
    params = list(model.parameters()) if params is None else list(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    scale = [t.float().pow(2).mean().clamp(min=1e-12) for t in teacher]
    losses = []
    cycle = itertools.cycle(range(len(batches)))
    with torch.enable_grad():
        for _ in bar(range(steps), steps, desc):
            i = next(cycle)
            out = first_output(model(*batches[i])).float()
            loss = (out - teacher[i].float()).pow(2).mean() / scale[i]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if len(losses) % max(1, steps // 5) == 0:   # for logs, where the bar is not drawn
                say(f"{desc}: step {len(losses)}/{steps}, loss {losses[-1]:.4g}")
    model.zero_grad(set_to_none=True)
    return losses


def kd_loss(model: nn.Module, batches: Sequence[tuple], teacher: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(((first_output(model(*b)).float() - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
                         for b, t in zip(batches, teacher)) / max(1, len(batches)))


def reestimate_batchnorm(model: nn.Module, batches: Sequence[tuple], teacher: Sequence[torch.Tensor]) -> int:
    """Recompute every BatchNorm's running mean/var over the batches; keep them only if the pruned
    model then follows the teacher more closely (a model whose statistics never came from data, e.g.
    untrained, is better off without). Return how many were updated (0 = kept the old ones)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    before = kd_loss(model, batches, teacher)
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
    if kd_loss(model, batches, teacher) > before:
        for m, state in zip(bns, old):
            m.load_state_dict(state)
        return 0
    return len(bns)
