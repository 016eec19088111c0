"""Small models for tests/test_prune.py: hand-written q/k/v attention with a residual stream, two
towers fused by torch.cat, and two fusions that Torch-Pruning's dependency graph alone breaks
(measured: the forward fails after pruning one of their groups)."""
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


class _Towers(nn.Module):
    """A conv image tower and an embedding + Linear text tower, each giving a ``dim`` vector."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim))
        self.tok = nn.Embedding(VOCAB, 48)
        self.text = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, dim))

    def text_vector(self, input_ids, attention_mask):
        t = self.text(self.tok(input_ids))
        m = attention_mask.unsqueeze(-1).to(t.dtype)
        return (t * m).sum(1) / m.sum(1).clamp(min=1.0)


class StackedTokens(_Towers):
    """The two tower embeddings stacked as a 2-token sequence, mixed per token, flattened into the head."""

    def __init__(self, dim: int = 64):
        super().__init__(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(2 * dim, 10)

    def forward(self, image, input_ids, attention_mask):
        x = torch.stack([self.image(image), self.text_vector(input_ids, attention_mask)], dim=1)
        return self.head(torch.relu(self.mix(x)).flatten(1))


class Bilinear(_Towers):
    """Bilinear pooling: the outer product of the two embeddings (narrowed first), flattened into the head."""

    def __init__(self, dim: int = 64):
        super().__init__(dim)
        self.pi, self.pt = nn.Linear(dim, 16), nn.Linear(dim, 16)
        self.head = nn.Linear(16 * 16, 10)

    def forward(self, image, input_ids, attention_mask):
        a, b = self.pi(self.image(image)), self.pt(self.text_vector(input_ids, attention_mask))
        return self.head((a.unsqueeze(2) * b.unsqueeze(1)).flatten(1))


def fusion(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {"stacked_tokens": StackedTokens, "bilinear": Bilinear}[name]().eval()
