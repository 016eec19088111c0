"""Small models for tests/test_prune.py: hand-written q/k/v attention with a residual stream, and two
towers fused by torch.cat (the shapes that broke Torch-Pruning without protection)."""
from __future__ import annotations

import torch
from torch import nn

SEQ, VOCAB = 32, 1000


class Attention(nn.Module):
    """Hand-written multi-head self-attention: q/k/v/o Linear, ``num_heads`` and ``head_dim``."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim ** 0.5, dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Fused(nn.Module):
    """image (conv stack) + text (embedding + hand-written attention block) -> cat -> MLP head."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim))
        self.tok = nn.Embedding(VOCAB, dim)
        self.block = Block(dim)
        self.head = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image, input_ids, attention_mask):
        t = self.block(self.tok(input_ids))
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        t = (t * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(torch.cat([self.image(image), t], dim=-1))


def build() -> nn.Module:
    torch.manual_seed(0)
    return Fused().eval()
