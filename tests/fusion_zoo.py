"""A zoo of small, seeded multimodal fusion models: the fusions users write, for tests/test_fusion_zoo.py.

Every model takes ``image`` (1, 3, 32, 32), ``input_ids`` (1, 16) and ``attention_mask`` (1, 16) and
returns logits (1, 10). The towers are shared: a conv image tower that gives a 4x4 grid of tokens and a
pooled vector, and a text tower (embedding + one hand-written attention block) that gives tokens and a
masked mean. Only the fusion differs. ``ZOO`` maps each name to its builder (``fusion_zoo.py:NAME`` is
a recipe's model source).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

DIM, SEQ, VOCAB, IMG = 32, 16, 500, 32


def masked_average(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the padded axis 1 of ``t`` counting only positions where ``mask`` is 1."""
    m = mask.unsqueeze(-1).to(t.dtype)
    return (t * m).sum(1) / m.sum(1).clamp(min=1.0)


class ImageTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                                 nn.Conv2d(16, DIM, 3, 2, 1), nn.BatchNorm2d(DIM), nn.ReLU6(),
                                 nn.Conv2d(DIM, DIM, 3, 2, 1), nn.ReLU())

    def forward(self, image):
        return self.net(image)  # (B, DIM, 4, 4)


class SelfAttention(nn.Module):
    """Hand-written attention with an additive padding mask."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.heads, self.hd = heads, DIM // heads
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x, bias):
        b, l, _ = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * self.hd ** -0.5 + bias, dim=-1)
        return self.o((a @ v).transpose(1, 2).reshape(b, l, DIM))


class TextTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(1, SEQ, DIM) * 0.1)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = SelfAttention()
        self.ff = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, input_ids, attention_mask):
        x = self.tok(input_ids) + self.pos
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ff(self.norm2(x))  # (B, SEQ, DIM)


class Fusion(nn.Module):
    """Both towers, then ``fuse`` (what each zoo entry defines)."""

    def __init__(self):
        super().__init__()
        self.image, self.text = ImageTower(), TextTower()

    def towers(self, image, input_ids, attention_mask):
        grid = self.image(image)
        return grid, self.text(input_ids, attention_mask)


class LateConcat(Fusion):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(2 * DIM, DIM), nn.ReLU(), nn.Linear(DIM, 10))

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        return self.head(torch.cat([grid.mean((2, 3)), masked_average(t, attention_mask)], dim=-1))


class GatedProduct(Fusion):
    """The model of issue 23: a projected pooled text vector attends over image tokens with
    ``nn.MultiheadAttention``, both are squeezed back, a sigmoid gate reads their concat, the head reads
    ``cat([a, q, g * a * q])``."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj, self.kproj = nn.LayerNorm(DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.mha = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.gate = nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(3 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        k = self.kproj(grid.flatten(2).transpose(1, 2))
        q = self.proj(self.norm(masked_average(t, attention_mask))).unsqueeze(1)
        a, _ = self.mha(q, k, k)  # need_weights=True, the default users write
        a, q = a.squeeze(1), q.squeeze(1)
        g = torch.sigmoid(self.gate(torch.cat([a, q], dim=-1)))
        return self.head(torch.cat([a, q, g * a * q], dim=-1))


class CrossAttentionMHA(Fusion):
    """Cross-attention both ways with ``nn.MultiheadAttention``: text tokens over image tokens, image
    tokens over text tokens (padding masked out)."""

    def __init__(self):
        super().__init__()
        self.t2i = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.i2t = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.head = nn.Linear(2 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        i = grid.flatten(2).transpose(1, 2)
        ti, _ = self.t2i(t, i, i, need_weights=False)
        it, _ = self.i2t(i, t, t, key_padding_mask=attention_mask == 0, need_weights=False)
        return self.head(torch.cat([masked_average(t + ti, attention_mask), (i + it).mean(1)], dim=-1))


class CrossAttentionHand(Fusion):
    """Hand-written cross-attention both ways (q/k/v Linears, scaled softmax, additive mask)."""

    def __init__(self):
        super().__init__()
        self.q1, self.k1, self.v1 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.q2, self.k2, self.v2 = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(2 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        i = grid.flatten(2).transpose(1, 2)
        s = DIM ** -0.5
        ti = torch.softmax(self.q1(t) @ self.k1(i).transpose(1, 2) * s, -1) @ self.v1(i)
        bias = (1.0 - attention_mask[:, None, :].to(t.dtype)) * -1e4
        it = torch.softmax(self.q2(i) @ self.k2(t).transpose(1, 2) * s + bias, -1) @ self.v2(t)
        return self.head(torch.cat([masked_average(ti, attention_mask), it.mean(1)], dim=-1))


class ShapeOps(Fusion):
    """squeeze / unsqueeze / view / flatten / permute / reshape between quantized ops."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(DIM, DIM), nn.Linear(16 * DIM // 4, DIM)
        self.c, self.head = nn.Linear(DIM, DIM), nn.Linear(2 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        g = self.a(grid.permute(0, 2, 3, 1))                       # (B, 4, 4, D)
        g = self.b(g.reshape(g.shape[0], 4, 4 * DIM)).unsqueeze(1)  # (B, 1, 4, D)
        g = torch.flatten(g.squeeze(1).transpose(1, 2).contiguous().view(-1, DIM, 2, 2), 2).mean(-1)
        v = self.c(masked_average(t, attention_mask).unsqueeze(1)).squeeze(1)
        return self.head(torch.cat([g, v], dim=-1))


class FiLM(Fusion):
    """The text vector scales and shifts the image feature map (feature-wise linear modulation)."""

    def __init__(self):
        super().__init__()
        self.film = nn.Linear(DIM, 2 * DIM)
        self.conv = nn.Conv2d(DIM, DIM, 3, 1, 1)
        self.head = nn.Linear(DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        gamma, beta = self.film(masked_average(t, attention_mask)).chunk(2, dim=-1)
        x = grid * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class Bilinear(Fusion):
    """The outer product of the two pooled vectors, flattened, then a Linear; plus ``nn.Bilinear``."""

    def __init__(self):
        super().__init__()
        self.pi, self.pt = nn.Linear(DIM, 8), nn.Linear(DIM, 8)
        self.outer = nn.Linear(64, 10)
        self.bil = nn.Bilinear(DIM, DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        i, v = grid.mean((2, 3)), masked_average(t, attention_mask)
        o = (self.pi(i).unsqueeze(2) * self.pt(v).unsqueeze(1)).flatten(1)
        return self.outer(o) + self.bil(i, v)


class TokenConcat(Fusion):
    """Image and text tokens concatenated into one sequence, one shared attention block over both."""

    def __init__(self):
        super().__init__()
        self.type_emb = nn.Parameter(torch.randn(2, DIM) * 0.1)
        self.norm = nn.LayerNorm(DIM)
        self.attn = SelfAttention()
        self.head = nn.Linear(DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        i = grid.flatten(2).transpose(1, 2) + self.type_emb[0]
        x = torch.cat([i, t + self.type_emb[1]], dim=1)
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]).expand(-1, i.shape[1]), attention_mask], dim=1)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        x = x + self.attn(self.norm(x), bias)
        return self.head(masked_average(x, mask))


class MaskedMean(Fusion):
    """Masked means over a padded axis on both sides, then their sum and difference."""

    def __init__(self):
        super().__init__()
        self.pi, self.pt = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(2 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        i = self.pi(grid.flatten(2).transpose(1, 2)).mean(1)
        v = self.pt(masked_average(t, attention_mask))
        return self.head(torch.cat([i + v, i - v], dim=-1))


class CrossResidual(Fusion):
    """A residual that crosses towers: the text vector is added to every image position, the image
    vector to every text token, and both streams continue through their own layers."""

    def __init__(self):
        super().__init__()
        self.t2i, self.i2t = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.conv = nn.Conv2d(DIM, DIM, 1)
        self.ff = nn.Linear(DIM, DIM)
        self.head = nn.Linear(2 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        v = masked_average(t, attention_mask)
        g = grid + self.t2i(v)[:, :, None, None]
        g = g + torch.relu(self.conv(g))
        t = t + self.i2t(grid.mean((2, 3))).unsqueeze(1)
        t = t + torch.relu(self.ff(t))
        return self.head(torch.cat([g.mean((2, 3)), masked_average(t, attention_mask)], dim=-1))


class DynamicConv(Fusion):
    """Text-conditioned dynamic convolution: the text vector predicts a depthwise 3x3 kernel that
    filters the image feature map (batch 1, as the recipe's inputs are). The conv's weight is an
    activation, not a constant."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Linear(DIM, DIM * 9)
        self.head = nn.Linear(DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        w = self.kernel(masked_average(t, attention_mask)).view(DIM, 1, 3, 3)
        return self.head(torch.relu(torch.nn.functional.conv2d(grid, w, padding=1, groups=DIM)).mean((2, 3)))


class SharedView(Fusion):
    """One reshaped projection read by two concatenations (each stacks it under another tower's view):
    with litert-torch's own annotation the converter rejects it ("'tfl.reshape' op quantization
    parameters violate the same scale constraint")."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.head = nn.Linear(2 * DIM, 10)

    def forward(self, image, input_ids, attention_mask):
        grid, t = self.towers(image, input_ids, attention_mask)
        i = grid.flatten(2).transpose(1, 2)  # (B, 16, DIM): as many image tokens as text tokens
        r = self.a(t).unsqueeze(1)
        x, y = torch.cat([self.b(i).view(-1, 1, SEQ, DIM), r], 1), torch.cat([self.c(t).view(-1, 1, SEQ, DIM), r], 1)
        return self.head(torch.cat([x.mean((1, 2)), y.mean((1, 2))], dim=-1))


ZOO = {"late_concat": LateConcat, "gated_product": GatedProduct, "cross_attention_mha": CrossAttentionMHA,
       "cross_attention_hand": CrossAttentionHand, "shape_ops": ShapeOps, "film": FiLM, "bilinear": Bilinear,
       "token_concat": TokenConcat, "masked_mean": MaskedMean, "cross_residual": CrossResidual, "dynamic_conv": DynamicConv,
       "shared_view": SharedView}


def _builder(cls):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls().eval()
    build.__doc__ = cls.__doc__
    return build


globals().update({name: _builder(cls) for name, cls in ZOO.items()})


def data(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` samples (no batch axis): smooth random images, token ids with padding of random length."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    image = np.repeat(np.repeat(base, 4, axis=2), 4, axis=3) + 0.3 * rng.standard_normal((n, 3, IMG, IMG))
    lengths = rng.integers(4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (n, SEQ)) * mask
    return {"image": image.astype(np.float32), "input_ids": ids.astype(np.int64), "attention_mask": mask}
