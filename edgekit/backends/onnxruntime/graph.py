"""Questions about an ONNX graph that the ORT backend answers for the calibration guard and the search.

- ``nonfinite_tensors``: run the fp32 graph on a few calibration samples with every float tensor as an
  output; tensors holding inf/NaN (a ``-inf`` attention mask) or a float-min sentinel (|x| >= 1e30,
  what HF masks use) would give a non-finite or absurd calibration range. The nodes that read or write
  them are excluded from quantization (``nodes_to_exclude``).
- ``nodes_touching``, ``nodes_of_modules``: the nodes around tensors, the nodes that came from torch modules.
- ``activation_sensitivity``: ORT's own ``qdq_loss_debug``: each quantized activation before and after
  its QuantizeLinear/DequantizeLinear pair on calibration inputs, ranked by ``channel_sqnr``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgekit.quantize.sqnr import channel_sqnr

SENTINEL = 1e30
_FLOAT = 1  # onnx.TensorProto.FLOAT


def nonfinite_tensors(model_path: Path, calibration, samples: int = 2) -> list[str]:
    """Float tensors of the graph that hold inf/NaN or |x| >= 1e30 on the first calibration samples."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    for vi in model.graph.value_info:
        if vi.type.tensor_type.elem_type == _FLOAT and vi.name in produced and vi.name not in have:
            model.graph.output.append(vi)
    with tempfile.TemporaryDirectory() as tmp:
        aug = Path(tmp) / "all_outputs.onnx"
        onnx.save(model, str(aug))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        inputs = {i.name for i in sess.get_inputs()}
        bad: set[str] = set()
        for i in range(min(samples, len(calibration))):
            feeds = {k: v for k, v in calibration.sample(i).items() if k in inputs}
            for name, value in zip(names, sess.run(None, feeds)):
                v = np.asarray(value)
                if v.dtype.kind == "f" and v.size and not (np.isfinite(v).all() and np.abs(v).max() < SENTINEL):
                    bad.add(name)
    return sorted(bad)


def nodes_touching(model_path: Path, tensors: list[str], op_types) -> list[str]:
    """Names of the nodes (of the quantized op types, or any if None) that read or write ``tensors``."""
    import onnx

    tset = set(tensors)
    model = onnx.load(str(model_path), load_external_data=False)
    # In a QDQ graph a quantized node reads X through QuantizeLinear -> DequantizeLinear.
    q_out = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in tset}
    tset |= {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_out}
    return sorted({n.name for n in model.graph.node
                   if (op_types is None or n.op_type in op_types) and n.name
                   and tset.intersection(list(n.input) + list(n.output))})


def nodes_of_modules(fp32_path: Path, qdq_path: Path, modules: list[str]) -> list[str]:
    """Names of the nodes of the quantized graph that come from the torch ``modules`` (by the exporter's
    ``pkg.torch.onnx.name_scopes`` metadata on the fp32 graph; ORT's pre-processing keeps a fused node's
    name as a prefix, e.g. ``node_MatMul_7/MatMulAddFusion``)."""
    import onnx

    if not modules:
        return []
    wanted = {f"'{m}'" for m in modules}
    names = set()
    for n in onnx.load(str(fp32_path), load_external_data=False).graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(w in scopes for w in wanted):
            names.add(n.name)
    qdq = onnx.load(str(qdq_path), load_external_data=False).graph.node
    return sorted({n.name for n in qdq if n.name and n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                   and (n.name in names or n.name.split("/")[0] in names)})


def activation_sensitivity(qdq_path: Path, calibration, samples: int) -> list[tuple[str, float]]:
    """ORT's qdq_loss_debug: every quantized activation before and after its QuantizeLinear /
    DequantizeLinear pair on calibration inputs; ``channel_sqnr`` of each, worst first."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, create_activation_matching, \
        modify_model_output_intermediate_tensors

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([calibration.sample(i) for i in range(min(samples, len(calibration)))])

        def get_next(self):
            return next(self._it, None)

    from edgekit.backends.onnxruntime.passes import q_ranges

    with tempfile.TemporaryDirectory() as tmp:
        aug = Path(tmp) / "debug.onnx"
        modify_model_output_intermediate_tensors(str(qdq_path), str(aug))
        acts = collect_activations(str(aug), Reader())
    # The float side clipped to what the quantizer represents: where ORT folded a Clip (ReLU6) into the
    # conv's output range, the unclipped conv output is not the reference (it would read as 0 dB); with
    # MinMax ranges nothing else saturates on calibration data.
    ranges = q_ranges(qdq_path)
    ranked = [(name, channel_sqnr([np.clip(a, *ranges[name]) for a in m["pre_qdq"]] if name in ranges
                                  else m["pre_qdq"], m["post_qdq"]))
              for name, m in create_activation_matching(acts).items() if m.get("pre_qdq") and m.get("post_qdq")]
    return sorted(ranked, key=lambda t: t[1])


def node_macs(model_path: Path, names) -> dict[str, int]:
    """Multiply-accumulates of the MatMul / Gemm / Conv nodes among ``names`` (0 for any other node),
    from the graph's static shapes (weights read through their DequantizeLinear)."""
    import math

    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are an estimate's input; without them the node has no cost
        pass
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    wanted, out = set(names), {}
    for n in model.graph.node:
        if n.name not in wanted:
            continue
        out[n.name] = 0
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.input) < 2:
            continue
        y, w = shapes.get(n.output[0]), shapes.get(dq.get(n.input[1], n.input[1]))
        if not y or not w or not all(y) or not all(w):
            continue
        if n.op_type == "Conv":
            k = math.prod(w[1:])
        elif n.op_type == "Gemm":
            k = w[1] if any(a.name == "transB" and a.i for a in n.attribute) else w[0]
        else:
            k = w[-2] if len(w) >= 2 else w[0]
        out[n.name] = math.prod(y) * k
    return out
