"""ONNX Runtime's side of the accuracy-aware quantization search and calibration guard.

- ``nonfinite_tensors``: run the fp32 graph on a few calibration samples with every float tensor as an
  output; tensors holding inf/NaN (a ``-inf`` attention mask) or a float-min sentinel (|x| >= 1e30,
  what HF masks use) would give a non-finite or absurd calibration range. The nodes that read or write
  them are excluded from quantization (``nodes_to_exclude``).
- ``candidates``: the search ladder, least fallback first: quantize ``Clip`` (ReLU6) too so it is fused
  with its conv (it restored EfficientNet-Lite0's image tower in the DESIGN probe), then per-node
  sensitivity from ORT's own ``qdq_loss_debug`` (each quantized activation before vs after its Q/DQ
  pair on calibration inputs, ``channel_sqnr``), and the quantized nodes reading or writing the 1, 2,
  4, 8, ... worst activations kept in float.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from edgekit.progress import say
from edgekit.quantize_search import channel_sqnr

SENTINEL = 1e30
BROKEN_DB = 10.0  # median per-channel SQNR below this: most channels are noise after quantization
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


def activation_sensitivity(qdq_path: Path, calibration, samples: int = 8) -> list[tuple[str, float]]:
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

    with tempfile.TemporaryDirectory() as tmp:
        aug = Path(tmp) / "debug.onnx"
        modify_model_output_intermediate_tensors(str(qdq_path), str(aug))
        acts = collect_activations(str(aug), Reader())
    ranked = [(name, channel_sqnr(m["pre_qdq"], m["post_qdq"]))
              for name, m in create_activation_matching(acts).items() if m.get("pre_qdq") and m.get("post_qdq")]
    return sorted(ranked, key=lambda t: t[1])


def candidates(fp32, opts, ctx) -> Iterator:
    from edgekit.quantize_search import Candidate

    op_types = opts.op_types
    base = opts
    import onnx

    # Step 1, both fixes that need no sensitivity pass, in one build: Clip (ReLU6) quantized with its
    # conv, and the layers whose int8 weights break their output (edgekit.weight_sensitivity; the
    # activation ranking below cannot see weight rounding) kept in float.
    from edgekit.weight_sensitivity import WEAK_DB, weak_layers

    has_clip = any(n.op_type == "Clip" for n in onnx.load(str(fp32.path), load_external_data=False).graph.node)
    update: dict = {}
    labels = []
    if op_types is not None and "Clip" not in op_types and has_clip:
        update["op_types"] = list(op_types) + ["Clip"]
        labels.append("quantize Clip (ReLU6) too, fused with its conv")
    weak = weak_layers(ctx.model, ctx.calibration, opts.per_channel)
    nodes = nodes_of_modules(Path(fp32.path), Path(ctx.best.artifact.path), [m for m, _ in weak])
    if nodes:
        say(f"[{ctx.target}] quantize search: layers whose int8 weights break their output (SQNR dB): "
            + ", ".join(f"{m} {v:.1f}" for m, v in weak[:5]))
        update["nodes_to_exclude"] = sorted(set(opts.nodes_to_exclude) | set(nodes))
        labels.append(f"the {len(weak)} layers whose int8 weights lose most (weight SQNR < {WEAK_DB:g} dB) in "
                      f"float ({len(nodes)} nodes)")
    if update:
        base = opts.model_copy(update=update)
        yield Candidate(" + ".join(labels), base, kept_float=list(base.nodes_to_exclude))
    # Greedy and re-measured: rank the activations of the latest artifact (the best one at first), keep
    # in float the nodes around its k worst, k = 1, 2, 4, ...; re-ranking after each step matters, as
    # damage hides downstream damage (a tensor already rounded to zero quantizes "exactly").
    art = ctx.best.artifact
    base = ctx.best.candidate.opts or base
    # Excluding nodes needs no new ranges: calibrate once (ORT's calibration cache), reuse it after.
    cache_dir = tempfile.mkdtemp(prefix="edgekit-ort-calib-")
    base = base.model_copy(update={"calibration_cache": str(Path(cache_dir) / "ranges.json")})
    try:
        yield from _ladder(ctx, art, base)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _ladder(ctx, art, base) -> Iterator:
    from edgekit.quantize_search import Candidate

    kept = set(base.nodes_to_exclude)
    k = 1
    while True:
        qdq = Path(art.path)
        say(f"[{ctx.target}] quantize search: qdq_loss_debug per-channel SQNR of each quantized activation "
            f"on {min(8, len(ctx.calibration))} calibration samples")
        ranked = activation_sensitivity(qdq, ctx.calibration)
        fresh = [(n, nodes) for n, _ in ranked
                 for nodes in [set(nodes_touching(qdq, [n], base.op_types)) - kept] if nodes]
        if not fresh:
            return
        say(f"[{ctx.target}] quantize search: worst activations (median per-channel SQNR, dB): "
            + ", ".join(f"{n} {v:.1f}" for n, v in ranked[:5]))
        # Every broken activation (median channel rounded to nothing, < BROKEN_DB) goes in one step:
        # on EfficientNet-Lite0 dozens of ReLU6 outputs are at 0 dB, one-by-one would never finish.
        k = max(k, sum(1 for n, v in ranked if v < BROKEN_DB and any(n == f for f, _ in fresh)))
        for _, nodes in fresh[:k]:
            kept |= nodes
        yield Candidate(f"float fallback: the quantized nodes around the {min(k, len(fresh))} worst "
                        f"activations ({len(kept)} nodes in all)",
                        base.model_copy(update={"nodes_to_exclude": sorted(kept)}), kept_float=sorted(kept))
        art = ctx.history[-1].artifact
        k *= 2
