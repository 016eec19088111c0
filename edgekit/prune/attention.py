"""Attention heads: find them, make them prunable, remove whole heads.

Torch-Pruning's dependency graph sees ``nn.MultiheadAttention`` as one opaque layer whose only prunable
width is ``embed_dim`` (= the residual stream), so its heads are never removed; and through hand-written
q/k/v attention the graph follows the head reshape into the residual stream. So heads are handled
here, as a unit: each attention block is an :class:`Heads` view (q, k, v, output projection, head
count, head size), heads are ranked by Taylor importance and removed with Torch-Pruning's layer
pruning functions (rows of q/k/v, columns of the output projection), and the module's head count is
updated. ``nn.MultiheadAttention`` is first replaced by :class:`QKVAttention`, the same computation
with separate q/k/v projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class QKVAttention(nn.Module):
    """``nn.MultiheadAttention`` (self or cross attention, batch_first or not) with separate q/k/v
    projections, so that whole heads can be removed. Same call signature and outputs
    (``(output, None)``; attention weights are not returned)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads, self.head_dim = h, mha.head_dim
        self.batch_first = mha.batch_first
        # What nn.TransformerEncoder(Layer) reads to choose its fused fast path: these values keep it off.
        self._qkv_same_embed_dim = False
        self.in_proj_weight = self.in_proj_bias = None
        has_bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(e, e, bias=has_bias)
        self.k_proj = nn.Linear(mha.kdim, e, bias=has_bias)
        self.v_proj = nn.Linear(mha.vdim, e, bias=has_bias)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in zip((self.q_proj, self.k_proj, self.v_proj), (wq, wk, wv)):
                lin.weight.copy_(w)
            if has_bias:
                for lin, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported")
        self.out_proj = nn.Linear(e, mha.out_proj.out_features, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(b, lq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, lk, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, lk, -1, self.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if attn_mask is not None:
            scores = scores.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                else scores + attn_mask
        elif is_causal:
            causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, lq, -1)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def replace_mha(model: nn.Module) -> int:
    """Swap every ``nn.MultiheadAttention`` for an equivalent :class:`QKVAttention`; return how many."""
    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, QKVAttention(child))
            n += 1
        else:
            n += replace_mha(child)
    return n


@dataclass
class Heads:
    """One attention block seen as heads: q/k/v projections (head h = rows h*d:(h+1)*d), the output
    projection (columns), and how to read/write the module's head count."""

    name: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    get: Callable[[], int]
    set: Callable[[int], None]

    @property
    def linears(self) -> tuple[nn.Linear, ...]:
        return self.q, self.k, self.v, self.o


def find_heads(model: nn.Module) -> list[Heads]:
    """Attention blocks edgekit knows how to prune by heads: :class:`QKVAttention` and modules shaped
    like it (q/k/v/out Linear + ``num_heads`` + ``head_dim``), and Hugging Face BERT-style attention
    (``.self.{query,key,value}`` + ``num_attention_heads`` / ``attention_head_size`` and ``.output.dense``)."""
    found = []
    for name, m in model.named_modules():
        hf = getattr(m, "self", None)
        if isinstance(hf, nn.Module) and all(isinstance(getattr(hf, a, None), nn.Linear)
                                             for a in ("query", "key", "value")) \
                and hasattr(hf, "num_attention_heads") and isinstance(getattr(getattr(m, "output", None),
                                                                              "dense", None), nn.Linear):
            def _set(n: int, s=hf) -> None:
                s.num_attention_heads = n
                s.all_head_size = n * s.attention_head_size
            found.append(Heads(name, hf.query, hf.key, hf.value, m.output.dense, hf.attention_head_size,
                               lambda s=hf: s.num_attention_heads, _set))
            continue
        names = _qkvo_names(m)
        if names and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            q, k, v, o = (getattr(m, a) for a in names)

            def _set(n: int, s=m) -> None:
                s.num_heads = n
            found.append(Heads(name, q, k, v, o, int(m.head_dim), lambda s=m: s.num_heads, _set))
    return found


def _qkvo_names(m: nn.Module) -> Optional[tuple[str, str, str, str]]:
    for names in (("q_proj", "k_proj", "v_proj", "out_proj"), ("q", "k", "v", "o"),
                  ("query", "key", "value", "out"), ("q_proj", "k_proj", "v_proj", "o_proj")):
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in names):
            return names
    return None


def head_scores(h: Heads) -> torch.Tensor:
    """First-order Taylor importance per head: sum of |w * dL/dw| over the head's q/k/v rows (weights
    and biases) and output-projection columns. Needs the gradients of a calibration loss."""
    n, d = h.get(), h.head_dim
    score = torch.zeros(n)
    for lin in (h.q, h.k, h.v):
        if lin.weight.grad is None:
            continue
        s = (lin.weight * lin.weight.grad).abs().sum(1)
        if lin.bias is not None and lin.bias.grad is not None:
            s = s + (lin.bias * lin.bias.grad).abs()
        score += s.detach().view(n, d).sum(1)
    if h.o.weight.grad is not None:
        score += (h.o.weight * h.o.weight.grad).abs().sum(0).detach().view(n, d).sum(1)
    return score


def prune_heads(h: Heads, drop: list[int]) -> None:
    """Remove heads ``drop`` (indices) with Torch-Pruning's Linear pruning functions."""
    import torch_pruning as tp

    if not drop:
        return
    d = h.head_dim
    idxs = [i for head in sorted(drop) for i in range(head * d, (head + 1) * d)]
    for lin in (h.q, h.k, h.v):
        tp.prune_linear_out_channels(lin, idxs)
    tp.prune_linear_in_channels(h.o, idxs)
    h.set(h.get() - len(drop))
