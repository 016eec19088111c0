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


def make_quantizer(per_channel: bool, fuse_conv_hardtanh: bool, float_modules: list[str],
                   float_attention: bool = False, pad_shared: bool = False, conv_observer: str = "default",
                   share_same_scale: bool = True, float_lines: list[str] = ()):
    """litert-torch's PT2EQuantizer (symmetric int8, per-channel weights, static) with edgekit's options:
    ``fuse_conv_hardtanh`` (below), ``float_modules`` left unannotated, ``float_attention`` (the
    activation x activation matmuls and the elementwise chain between them left float: XNNPACK has no
    int8 BATCH_MATMUL, TFLite's reference kernel took 29 % of mnist_bbc's time), ``pad_shared`` (a PAD
    shares its input's quantization, no requantize before the padded conv), ``conv_observer`` ("minmax":
    MinMax activation observers for conv partitions instead of litert's default histogram)."""
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as U
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)

    class EdgekitQuantizer(PT2EQuantizer):
        def _annotate_for_static_quantization_config(self, model):
            if fuse_conv_hardtanh:
                _annotate_conv_hardtanh(model, self.global_config, U, torch)
            model = super()._annotate_for_static_quantization_config(model)
            if conv_observer == "minmax":
                _swap_conv_act_specs(model, self.global_config, _minmax_config(config), torch)
            drop = attention_core(model) if float_attention else set()
            drop |= dynamic_weight_ops(model)
            if float_lines:
                drop |= nodes_at_lines(model, float_lines)
            for n in model.graph.nodes:
                if n in drop or (float_modules and _under(_module_of(n), float_modules)):
                    n.meta.pop("quantization_annotation", None)
            return model

        def annotate(self, model):
            model = super().annotate(model)
            if pad_shared:
                _annotate_pad_shared(model, torch)
            if share_same_scale:
                share_same_scale_ops(model)
            return model

    return EdgekitQuantizer().set_global(config)


def _minmax_config(config):
    """``config`` with MinMax activation observers."""
    import dataclasses

    import torch
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    spec = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                            is_dynamic=False, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    return dataclasses.replace(config, input_activation=spec, output_activation=spec)


def _swap_conv_act_specs(gm, config, minmax, torch) -> None:
    """The activation qspecs of conv and conv -> clip partitions replaced by ``minmax``'s (on mnist_bbc's
    EfficientNet-Lite0 the histogram observer's clipping cost digit accuracy: 0.926 -> 0.934 with MinMax)."""
    A = torch.ops.aten
    convs = (A.conv1d.default, A.conv2d.default, A.convolution.default)
    old, new = config.input_activation, minmax.input_activation
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        clip = n.target in (A.hardtanh.default, A.hardtanh_.default, A.relu.default) and \
            getattr(n.args[0], "target", None) in convs
        ann = n.meta.get("quantization_annotation")
        if ann is None or not (n.target in convs or clip):
            continue
        ann.input_qspec_map = {k: (new if v is old or v == old else v) for k, v in ann.input_qspec_map.items()}
        if ann.output_qspec is not None and (ann.output_qspec is old or ann.output_qspec == old):
            ann.output_qspec = new


ELEMENTWISE = ("mul.Tensor", "add.Tensor", "div.Tensor", "sub.Tensor", "softmax.int", "_softmax.default",
               "dropout.default", "clone.default", "where.self", "masked_fill.Scalar", "to.dtype")


def attention_core(gm) -> set:
    """Activation x activation matmuls (attention scores and context) and the elementwise chain that
    connects them (scale, mask add, softmax), from the graph."""
    import torch
    from torch.fx import Node

    A = torch.ops.aten
    core = {n for n in gm.graph.nodes if n.op == "call_function" and n.target in (A.matmul.default, A.bmm.default)
            and all(isinstance(a, Node) and a.op != "get_attr" for a in n.args[:2])}
    frontier = list(core)
    while frontier:
        for u in frontier.pop().users:
            if u not in core and u.op == "call_function" and str(u.target).split("aten.")[-1] in ELEMENTWISE:
                core.add(u)
                frontier.append(u)
    return core


SAME_SCALE = ("view.default", "_unsafe_view.default", "reshape.default", "squeeze.default", "squeeze.dim",
              "squeeze.dims", "unsqueeze.default", "transpose.int", "permute.default", "t.default",
              "flatten.using_ints", "unflatten.int", "expand.default", "select.int", "slice.Tensor",
              "narrow.default", "contiguous.default", "clone.default", "alias.default", "repeat.default",
              "view_copy.default", "squeeze_copy.dim", "squeeze_copy.dims", "unsqueeze_copy.default",
              "permute_copy.default", "transpose_copy.int", "slice_copy.Tensor", "select_copy.int",
              "expand_copy.default", "pad.default", "constant_pad_nd.default")
"""ATen ops that become TFLite RESHAPE / SQUEEZE / EXPAND_DIMS / TRANSPOSE / GATHER / SLICE /
STRIDED_SLICE / BROADCAST_TO / TILE: kernels that require their int8 input and output to share one scale
and zero point (the converter rejects "quantization parameters violate the same scale constraint")."""


def share_same_scale_ops(gm) -> int:
    """Each same-scale op (``SAME_SCALE``, and the pieces of a ``split``/``chunk``/``unbind``) whose input
    is quantized shares its input's observer, in graph order so chains (transpose -> squeeze -> view)
    share one. litert-torch's own propagation covers ``squeeze.dim``/``view``/``permute``/``flatten``
    only. Measured with torch 2.13: litert's ``cat`` annotator never fires (``get_source_partitions``
    finds no ``torch.cat`` in a ``torch.export`` graph), so a concatenation is quantized by the
    converter's propagation, and an unobserved same-scale op read by two concatenations got one scale
    from its input and another from each concatenation, which the converter rejects ("'tfl.transpose'
    op quantization parameters violate the same scale constraint"). The XNNPACK quantizer shares the
    same way. Returns how many ops it annotated."""
    import operator

    import torch
    from torch.fx import Node
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    A = torch.ops.aten
    splits = (A.split.Tensor, A.split_with_sizes.default, A.chunk.default, A.unbind.int,
              A.split_with_sizes_copy.default, A.unbind_copy.int)
    shared = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem and isinstance(n.args[0], Node) and n.args[0].target in splits:
            prev = n.args[0].args[0]  # a piece of a split shares the split's input's observer
            ann = n.meta.get("quantization_annotation")
            before = prev.meta.get("quantization_annotation") if isinstance(prev, Node) else None
            if before is not None and before.output_qspec is not None and not (ann is not None and ann._annotated):
                n.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=SharedQuantizationSpec(prev),
                                                                           _annotated=True)
                shared += 1
            continue
        if str(n.target).split("aten.")[-1] not in SAME_SCALE:
            continue
        prev = n.args[0] if n.args else None
        ann = n.meta.get("quantization_annotation")
        if not isinstance(prev, Node) or (ann is not None and ann._annotated):
            continue
        before = prev.meta.get("quantization_annotation")
        if before is None or before.output_qspec is None:
            continue
        spec = SharedQuantizationSpec(prev)
        n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={prev: spec}, output_qspec=spec,
                                                                   _annotated=True)
        shared += 1
    return shared


def dynamic_weight_ops(gm) -> set:
    """Convolutions and linears whose weight is computed (a text-conditioned dynamic filter), not a
    parameter: TFLite's int8 CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED take constant per-channel
    weights, and litert-torch's layout pass mis-transposes a quantized computed filter ("Given
    groups=32, weight of size [32, 3, 3, 1] ... expected input[1, 32, 4, 4] to have 96 channels").
    They stay float."""
    import torch
    from torch.fx import Node

    A = torch.ops.aten
    ops = (A.conv1d.default, A.conv2d.default, A.convolution.default, A.linear.default)
    return {n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops and len(n.args) > 1
            and isinstance(n.args[1], Node) and n.args[1].op != "get_attr"}


TFL_OPS = {"tfl.reshape": ("view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "flatten", "unflatten"),
           "tfl.squeeze": ("squeeze",), "tfl.expand_dims": ("unsqueeze",),
           "tfl.transpose": ("transpose", "permute", "t"), "tfl.pad": ("pad", "constant_pad_nd"),
           "tfl.slice": ("slice", "split", "split_with_sizes", "chunk", "narrow", "select"),
           "tfl.strided_slice": ("slice", "select"), "tfl.gather": ("select", "index_select", "embedding"),
           "tfl.concatenation": ("cat",), "tfl.broadcast_to": ("expand",), "tfl.tile": ("repeat",)}
"""The ATen ops a TFLite op the converter names comes from (to keep only those ops of a line in float)."""


def nodes_at_lines(gm, lines) -> set:
    """The nodes traced from any of ``lines``, the nodes that read them and the nodes that feed them:
    leaving all of them unannotated keeps that code, and the quantized ops on both sides, in float (the
    converter's same-scale errors come from the scales on both sides of the named op). A line is ``file.py:LINE`` (a source line as the
    converter's errors name it; matched on the file's name and the line of any frame of the node's stack
    trace) or ``file.py:LINE:tfl.OP`` (only the ops at that line that become ``tfl.OP``, when any do)."""
    import re

    hit = set()
    for spec in lines:
        m = re.fullmatch(r"(.+\.py):(\d+)(?::(tfl\.\w+))?", spec)
        if not m:
            continue
        where = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
        at = [n for n in gm.graph.nodes if n.op == "call_function" and where in {
            (f.rsplit("/", 1)[-1], int(ln))
            for f, ln in re.findall(r'File "([^"]+)", line (\d+)', n.meta.get("stack_trace") or "")}]
        kinds = TFL_OPS.get(m.group(3) or "", ())
        named = [n for n in at if str(n.target).split("aten.")[-1].split(".")[0] in kinds]
        hit |= set(named or at)
    around = {u for n in hit for u in n.users if u.op == "call_function"} | \
        {a for n in hit for a in n.all_input_nodes if a.op == "call_function"}
    return hit | around


def _annotate_pad_shared(gm, torch) -> None:
    """A PAD shares its input's quantization (like view/permute): no requantize between a conv's input
    and its explicit "same" padding."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    A = torch.ops.aten
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (A.pad.default, A.constant_pad_nd.default):
            continue
        prev = n.args[0]
        ann = prev.meta.get("quantization_annotation")
        if not ann or not ann.output_qspec or n.meta.get("quantization_annotation"):
            continue
        shared = SharedQuantizationSpec(prev)
        n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={prev: shared},
                                                                   output_qspec=shared, _annotated=True)


def fold_symmetric_pads(gm) -> int:
    """Exact graph rewrite before PT2E: a constant-zero pad (left == right, top == bottom) whose users
    are all 2-D convs without padding becomes those convs' own padding. In int8 an explicit PAD stays a
    separate op (its zero point is not 0, XNNPACK cannot fuse it): on mnist_bbc 13 of 16 transpose ->
    pad -> transpose chains, 12 % of the int8 time. Returns the number folded."""
    import torch

    A = torch.ops.aten
    folded = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target not in (A.pad.default, A.constant_pad_nd.default):
            continue
        pads = list(n.args[1])
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        value = n.args[3] if len(n.args) > 3 else n.kwargs.get("value", None)
        if len(pads) != 4 or mode != "constant" or value not in (None, 0, 0.0) or pads[0] != pads[1] \
                or pads[2] != pads[3]:
            continue
        users = list(n.users)
        if not users or not all(u.op == "call_function" and u.target == A.conv2d.default and u.args[0] is n
                                and list(u.args[4] if len(u.args) > 4 else [0, 0]) in ([0, 0], [0]) for u in users):
            continue
        for u in users:
            args = list(u.args) + [None] * (7 - len(u.args))
            defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]
            args = [a if a is not None or i < 3 else defaults[i] for i, a in enumerate(args)]
            args[0], args[4] = n.args[0], [pads[2], pads[0]]
            u.args = tuple(args)
        gm.graph.erase_node(n)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


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
