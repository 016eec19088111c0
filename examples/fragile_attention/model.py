"""A deliberately fragile model for edgekit's accuracy-aware quantization (tests/test_quantize_search.py).

One attention block over 16 tokens of 32 features with a ``-inf`` padding mask (the mask path gives a
non-finite calibration range if it is quantized), then a projection with one *outlier channel*
(~1000x the others, as LLM activations have) that the head ignores. Quantizing the head's input per
tensor spends the whole 8-bit range on the outlier and rounds every other channel to zero: the
default int8 collapses, and keeping that one MatMul in float repairs it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

TOKENS, DIM, HIDDEN, CLASSES = 16, 32, 64, 10


class Fragile(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            self.proj.bias[0] = 1000.0   # the outlier channel ...
            self.head.weight[:, 0] = 0.0  # ... which the head does not use

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / DIM ** 0.5
        scores = scores + torch.zeros_like(scores).masked_fill((mask == 0)[:, None, :], float("-inf"))
        h = self.proj(torch.softmax(scores, dim=-1) @ v)
        return self.head(h.mean(dim=1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return Fragile().eval()


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Random features and masks with 4..16 valid tokens (the first token always valid)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, TOKENS + 1, size=n)
    mask = (np.arange(TOKENS)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": rng.standard_normal((n, TOKENS, DIM)).astype(np.float32), "mask": mask}
