"""LiteRT's PT2E pieces: the quantizer edgekit configures, and the per-module sensitivity the search ranks.

- ``make_quantizer``: litert-torch's ``PT2EQuantizer`` with two extras: conv -> hardtanh (ReLU6)
  annotated like conv -> relu (the conv's output observer then sees the clipped range; it raised
  EfficientNet-Lite0's image agreement 35 % -> 70 % at no latency cost, shared/DESIGN.md), and per-module
  float fallback (nodes whose ``nn_module_stack`` lies under a listed module are left unannotated, the
  PT2E way to keep a module in float; litert-torch's own ``set_module_name`` refuses ``None``).
- ``activation_sensitivity``: on the converted (reference-quantized) torch graph, the median per-channel
  SQNR of every activation before vs after its quantize/dequantize pair on calibration inputs, per module.
"""
from __future__ import annotations

import math

import numpy as np


def _module_of(node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    fqn = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L__self__."):
        if fqn.startswith(prefix):
            fqn = fqn[len(prefix):]
    return fqn


def _under(fqn: str | None, modules: list[str]) -> bool:
    """``name``: ops whose innermost module is exactly ``name``; ``name.*``: that module's whole subtree."""
    return fqn is not None and any(fqn == m or (m.endswith(".*") and (fqn == m[:-2] or fqn.startswith(m[:-1])))
                                   for m in modules)


def make_quantizer(per_channel: bool, fuse_conv_hardtanh: bool, float_modules: list[str]):
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as U
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    class SearchQuantizer(PT2EQuantizer):
        def _annotate_for_static_quantization_config(self, model):
            if fuse_conv_hardtanh:
                _annotate_conv_hardtanh(model, self.global_config, U, torch)
            model = super()._annotate_for_static_quantization_config(model)
            if float_modules:
                for n in model.graph.nodes:
                    if _under(_module_of(n), float_modules):
                        n.meta.pop("quantization_annotation", None)
            return model

    return SearchQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel,
                                                                          is_dynamic=False))


def _annotate_conv_hardtanh(gm, config, U, torch) -> None:
    """litert-torch's conv_relu annotator, for hardtanh (ReLU6): one output observer after the clip."""
    from torch.fx import Node

    convs = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (torch.ops.aten.hardtanh.default,
                                                       torch.ops.aten.hardtanh_.default):
            continue
        conv = n.args[0]
        if not isinstance(conv, Node) or conv.op != "call_function" or conv.target not in convs \
                or len(conv.users) != 1:
            continue
        qmap = {conv.args[0]: U.get_input_act_qspec(config), conv.args[1]: U.get_weight_qspec(config)}
        partition = [n, conv, conv.args[1]]
        bias = conv.args[2] if len(conv.args) > 2 else None
        if isinstance(bias, Node):
            qmap[bias] = U.get_bias_qspec(config)
            partition.append(bias)
        if U._is_annotated(partition):
            continue
        conv.meta["quantization_annotation"] = U.QuantizationAnnotation(input_qspec_map=qmap, _annotated=True)
        n.meta["quantization_annotation"] = U.QuantizationAnnotation(
            output_qspec=U.get_output_act_qspec(config), _annotated=True)
        U._mark_nodes_as_annotated(partition)


def activation_sensitivity(converted, calibration, samples: int) -> list[tuple[str, float]]:
    """Per module: the worst median per-channel SQNR (dB, ``edgekit.quantize.sqnr.channel_sqnr``) of an
    activation across its quantize/dequantize pair in the converted PT2E graph, averaged over samples."""
    import torch
    from torch.fx import Interpreter

    from edgekit.quantize.sqnr import channel_sqnr

    per_sample: list[dict[str, float]] = []

    class Probe(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            q = n.args[0] if n.args else None
            if n.op == "call_function" and "dequantize" in str(n.target) and hasattr(q, "op") \
                    and "quantize" in str(q.target) and "dequantize" not in str(q.target):
                src = q.args[0]
                if hasattr(src, "op") and src.op != "get_attr" and src in self.env:
                    x = self.env[src]
                    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.shape == out.shape:
                        mod = _module_of(src) or next((_module_of(u) for u in n.users if _module_of(u)), None)
                        if mod:
                            db = channel_sqnr([x.detach().numpy()], [out.detach().numpy()])
                            cur[mod] = min(cur.get(mod, math.inf), db)
            return out

    with torch.no_grad():
        for i in range(min(samples, len(calibration))):
            cur: dict[str, float] = {}
            sample = calibration.sample(i)
            # keep every value: a quantize node is often the last user of its input
            Probe(converted, garbage_collect_values=False).run(*[torch.from_numpy(v) for v in sample.values()])
            per_sample.append(cur)
    mods = set().union(*per_sample) if per_sample else set()
    ranked = [(m, float(np.mean([d[m] for d in per_sample if m in d]))) for m in mods]
    return sorted(((m, v) for m, v in ranked if v < math.inf), key=lambda t: t[1])  # +inf: nothing measured


def module_macs(converted, modules) -> dict[str, int]:
    """Multiply-accumulates of the linear / convolution ops directly in each of ``modules`` (module paths
    as ``float_modules`` takes them), from the converted graph's shapes."""
    import torch

    wanted = set(modules)
    out = {m: 0 for m in wanted}
    for n in converted.graph.nodes:
        mod = _module_of(n)
        if mod not in wanted or n.op != "call_function":
            continue
        val = n.meta.get("val")
        w = _shape(converted, n.args[1]) if len(n.args) > 1 else None
        if not isinstance(val, torch.Tensor) or w is None:
            continue
        if n.target in (torch.ops.aten.linear.default,):
            out[mod] += val.numel() * w[-1]
        elif n.target in (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default,
                          torch.ops.aten.convolution.default):
            out[mod] += val.numel() * math.prod(w[1:])
    return out


def _shape(gm, node, depth: int = 4):
    """The shape of a graph value: its traced value, a parameter's, or (through a dequantize) its input's."""
    import torch

    val = getattr(node, "meta", {}).get("val")
    if isinstance(val, torch.Tensor):
        return list(val.shape)
    if getattr(node, "op", None) == "get_attr":
        t = gm
        for part in node.target.split("."):
            t = getattr(t, part)
        return list(t.shape)
    if depth and getattr(node, "op", None) == "call_function" and node.args:
        return _shape(gm, node.args[0], depth - 1)
    return None
