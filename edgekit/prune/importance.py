"""Importance from the calibration data: gradients of a label-free loss against the teacher.

The unpruned model's own outputs are the targets, so no labels are needed. At the start the pruned
model *is* the teacher, so a distillation loss (MSE/KL to the teacher) has zero gradient; the loss used
for ranking is the cross-entropy to the teacher's top-1 class (classifier-like outputs) or the output
energy ``0.5·|y|²`` (embeddings), whose gradients say which channels the current predictions rest on.
Torch-Pruning's ``GroupTaylorImportance`` (|w · dL/dw| over a whole dependency group) then ranks
channels, and :func:`edgekit.prune.attention.head_scores` ranks heads, from these gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.inputs.model import first_output


def ranking_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s = student.reshape(student.shape[0], -1).float()
    if s.shape[1] > 1:
        return F.cross_entropy(s, teacher.reshape(teacher.shape[0], -1).argmax(1), reduction="sum")
    return 0.5 * s.pow(2).sum()


def accumulate_gradients(model: nn.Module, batches: Sequence[tuple], teacher: Sequence[torch.Tensor]) -> None:
    """Leave d(ranking loss)/dw, summed over the calibration batches, in every parameter's ``.grad``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for args, t in zip(batches, teacher):
            ranking_loss(first_output(model(*args)), t).backward()
