"""Structured pruning on Torch-Pruning's dependency graph, with the widths that must not move protected.

Every group the dependency graph builds (a Conv/Linear's output channels plus every layer coupled to
them) is either pruned as a whole or left alone:

- left alone when it reaches a residual addition, a concatenation/split (a fusion), an embedding, a
  normalisation over the feature axis (LayerNorm/GroupNorm: the residual stream of a transformer) or
  an attention projection (heads are pruned as units, in :mod:`edgekit.prune.attention`);
- left alone when it is a fusion (:func:`fusion_blocker`): layers of two towers coupled channel by
  channel (an elementwise product of the towers, gating, bilinear pooling), or token features
  flattened into one vector (tower embeddings stacked as tokens, then flattened);
- otherwise its width ``n`` becomes ``round_to``-aligned ``round(n·(1-ratio))`` (at least ``round_to``),
  ``ratio`` being the ratio of the group's tower (from :mod:`edgekit.prune.towers`), and the channels
  with the lowest Taylor importance go.

After each group (and each attention block) a forward runs; a shape break raises ``TargetError`` naming
the layer.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from edgekit.errors import TargetError
from edgekit.prune.attention import Heads, head_scores, prune_heads

RESIDUAL_OPS = re.compile(r"\b(Add|Sub|Rsub)Backward\d")   # not AddmmBackward (a Linear's bias)
BLOCKING_OPS = {"_OutputOp": "model output", "_ConcatOp": "concatenation (fusion)", "_SplitOp": "split", "_UnbindOp": "split",
                "_ExpandOp": "expand"}
LAYER_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass
class Plan:
    """Widths chosen for one model: one entry per pruned group/attention block, and what was protected."""

    widths: list[dict] = field(default_factory=list)
    protected: dict[str, int] = field(default_factory=dict)


def rounded_width(n: int, ratio: float, round_to: int) -> int:
    """Width kept out of ``n``: ``n·(1-ratio)`` rounded to the nearest multiple of ``round_to``, at least
    ``round_to``, at most ``n`` (a width below ``round_to``, or ``ratio`` 0, is left as is)."""
    if ratio <= 0 or n <= round_to:
        return n
    keep = int(round(n * (1.0 - ratio) / round_to)) * round_to
    return max(round_to, min(n, keep))


def rounded_heads(n: int, head_dim: int, ratio: float, round_to: int) -> int:
    """Heads kept out of ``n``: about ``n·(1-ratio)``, at least 1, such that heads·head_dim is a multiple
    of ``round_to`` when that is possible."""
    if ratio <= 0:
        return n
    want = max(1, int(round(n * (1.0 - ratio))))
    ok = [h for h in range(1, n) if (h * head_dim) % round_to == 0]   # some head is to go: never all kept
    return min(ok, key=lambda h: (abs(h - want), -h)) if ok else want


def blocker(group, protected: dict) -> Optional[str]:
    """Why this dependency group must keep its width, or None when it can be pruned."""
    from torch_pruning import ops

    for dep, _ in group:
        m = dep.target.module
        kind = type(m).__name__
        if kind in BLOCKING_OPS:
            return BLOCKING_OPS[kind]
        if isinstance(m, ops._ElementWiseOp) and RESIDUAL_OPS.search(str(m._grad_fn)):
            return "residual addition"
        if isinstance(m, nn.Embedding):
            return "embedding"
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            return "layer norm (residual stream)"
        if isinstance(m, nn.Parameter):
            return "free parameter"
        if m in protected and (protected[m] != "model output"
                               or "out_channels" in getattr(dep.handler, "__name__", "")):
            return protected[m]
        if isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups not in (1, m.in_channels):
            return "grouped convolution"
    return None


def fusion_blocker(group, names: dict, towers: dict[str, set[str]], token_linears: set) -> Optional[str]:
    """Why this group is a fusion whose width must stay, or None; told apart with the towers found from
    the data. Without this, both fusions of ``tests/prune_models.py`` break the forward after pruning
    (Torch-Pruning 1.6.1):

    - layers of two different towers in one group: their features are coupled channel by channel
      (``a * b``, ``x * gate(t)``, bilinear pooling ``a[:, :, None] * b[:, None, :]``); kept whole, so
      that no tower's width is decided by the other's. For bilinear pooling Torch-Pruning couples the
      two sides index by index, which is wrong: the forward breaks;
    - a reshape in the group fed by a Linear whose output has a token axis ((B, T, D) -> (B, T*D)):
      Torch-Pruning maps a flattened index channel-major (right for NCHW conv maps, wrong for
      token-major features), which is what stacking the towers' embeddings as tokens and flattening
      them into the head does.
    """
    from torch_pruning import ops

    layers = [dep.target.module for dep, _ in group if isinstance(dep.target.module, LAYER_TYPES)]
    single = set()
    for m in layers:
        mods = towers.get(names.get(m, ""), set())
        if len(mods) == 1:
            single |= mods
    if len(single) >= 2:
        return "fusion: " + " and ".join(sorted(single)) + " channels coupled"
    if any(isinstance(dep.target.module, ops._ReshapeOp) for dep, _ in group):
        out_widths = {m.out_features for m in layers if m in token_linears}
        consumers = [dep.target.module for dep, _ in group if isinstance(dep.target.module, LAYER_TYPES)
                     and "in_channels" in getattr(dep.handler, "__name__", "")]
        in_widths = {c.in_features if isinstance(c, nn.Linear) else c.in_channels for c in consumers}
        if out_widths and in_widths - out_widths:
            return "fusion: token features flattened"
    return None


def token_linears(model: nn.Module, example: tuple) -> set:
    """Linear layers whose output on ``example`` has a token axis (3-D or more)."""
    from edgekit.prune.towers import layer_outputs

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {linears[n] for n, out in layer_outputs(model, linears, example).items() if out.dim() >= 3}


def output_layers(dg) -> set:
    """Conv/Linear layers whose output reaches a model output without passing another Conv/Linear:
    their width is the model's output width (the dependency graph puts no output op in their group)."""
    found = set()
    for m, node in dg.module2node.items():
        if not isinstance(m, LAYER_TYPES):
            continue
        stack, seen = list(node.outputs), set()
        if not stack:
            found.add(m)
        while stack:
            n = stack.pop()
            if id(n) in seen or isinstance(n.module, LAYER_TYPES):
                continue
            seen.add(id(n))
            if not n.outputs:
                found.add(m)
                break
            stack.extend(n.outputs)
    return found


def prune_heads_all(heads: list[Heads], names: dict, ratio_of: Callable[[str], float], round_to: int,
                    check: Callable[[str], None], plan: Plan) -> None:
    """Remove the least important whole heads of every attention block (gradients in ``.grad``)."""
    for h in heads:
        n = h.get()
        keep = rounded_heads(n, h.head_dim, ratio_of(names[h.q]), round_to)
        if keep >= n:
            continue
        scores = head_scores(h)
        drop = scores.argsort()[: n - keep].tolist()
        prune_heads(h, drop)
        check(f"attention heads of {h.name}")
        plan.widths.append({"layer": h.name, "kind": "heads", "before": n, "after": keep,
                            "width_before": n * h.head_dim, "width_after": keep * h.head_dim})


def prune_channels(model: nn.Module, example: tuple, names: dict, ratio_of: Callable[[str], float], round_to: int,
                   protected: set, check: Callable[[str], None], plan: Plan, towers: dict[str, set[str]]) -> None:
    """Prune every unprotected Conv/Linear output group of ``model`` (gradients must be in ``.grad``);
    ``towers``: layer name -> modalities feeding it (:func:`edgekit.prune.towers.layer_modalities`)."""
    import torch_pruning as tp

    try:
        with warnings.catch_warnings():  # free parameters (e.g. positional tables) are protected below
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as e:  # noqa: BLE001 - the model's graph is the problem, name it
        raise TargetError(f"prune: Torch-Pruning could not trace the model: {type(e).__name__}: {e}") from None
    imp = tp.importance.GroupTaylorImportance()
    protected = {**{m: "model output" for m in output_layers(dg)},
                 **{m: "attention projection (pruned by heads)" for m in protected}}
    tokens = token_linears(model, example)
    todo = []
    for group in dg.get_all_groups(root_module_types=list(LAYER_TYPES)):
        root = group[0].dep.target.module
        why = blocker(group, protected) or fusion_blocker(group, names, towers, tokens)
        if why:
            plan.protected[why] = plan.protected.get(why, 0) + 1
            continue
        todo.append((root, group))
    for root, group in todo:
        name = names.get(root, type(root).__name__)
        n = root.out_channels if isinstance(root, nn.Conv2d | nn.Conv1d) else root.out_features
        keep = rounded_width(n, ratio_of(name), round_to)
        if keep >= n:
            continue
        with torch.no_grad():
            scores = imp(group)
        if scores is None:
            plan.protected["no importance"] = plan.protected.get("no importance", 0) + 1
            continue
        drop = scores.argsort()[: n - keep].tolist()
        fn = dg.get_pruner_of_module(root).prune_out_channels
        dg.get_pruning_group(root, fn, drop).prune()
        check(f"output channels of {name} (and the layers coupled to them)")
        plan.widths.append({"layer": name, "kind": "channels", "before": n, "after": keep})
