"""ONNX graph passes around ORT's static quantization (measured on mnist_bbc, AVX-512 VNNI + AMX CPU).

- ``matmul_add_as_gemm`` (before quantizing): MatMul(X, W) + Add(b), W and b constants, becomes
  Reshape -> Gemm(W, b) -> Reshape, exact in float. ORT's quantizer gives a Gemm an int32 bias, so the
  runtime fuses every linear layer into QGemm (int8 or float output); a MatMul with a float bias Add only
  becomes an integer kernel when its output is quantized again, else it runs as a float Gemm on
  dequantized weights. ``quant_pre_process`` does this for some linears only (MiniLM: the FFN, not
  Q/K/V/out-proj). New nodes are named ``<matmul>/...`` and keep the MatMul's metadata (torch scopes).
- ``drop_unread_qdq`` (after quantizing): Q->DQ pairs on MatMul/Gemm outputs that no int8 consumer
  reads only add a rounding step and a kernel; without them the integer matmul writes float. On MiniLM
  the FFN outputs (outlier channels, read by the float residual Add/LayerNorm) and the projection outputs
  (read by float bias adds) were the text tower's worst activations (0 dB median channel SQNR).
- ``sentinel_tensors``: the tensors computed from a constant holding inf/NaN or |x| >= 1e30 (an additive
  attention mask built with float-min): structural, so it holds when no calibration sample is padded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SENTINEL = 1e30
DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Expand",
                 "Split", "Concat", "MaxPool", "Resize"}


def matmul_add_as_gemm(src: Path, dst: Path) -> int:
    """Rewrite MatMul(X[..., K], W[K, N] constant) whose only consumer is Add(., b[N] constant) as
    Reshape(X, [-1, K]) -> Gemm(., W, b) -> Reshape(., static output shape). Skipped where the output
    shape is not static. Writes ``dst``; returns the number of rewrites."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - without shapes nothing is rewritten
        pass
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in [*g.value_info, *g.input, *g.output]}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    nodes, skip, count = [], set(), 0
    for n in g.node:
        if id(n) in skip:
            continue
        add = _bias_add(n, inits, users, outputs)
        out_shape = shapes.get(add.output[0]) if add is not None else None
        in_shape = shapes.get(n.input[0]) if add is not None else None
        if add is None or not out_shape or not all(out_shape) or not in_shape or in_shape[-1] != inits[n.input[1]].dims[0]:
            nodes.append(n)
            continue
        k, width = inits[n.input[1]].dims
        bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        base = n.name or n.output[0]
        if list(inits[bias].dims) == [1, width]:
            g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[bias]).reshape(width),
                                                         f"{base}/bias"))
            bias = f"{base}/bias"
        new = []
        x = n.input[0]
        if len(in_shape) != 2:
            g.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{base}/in_shape"))
            new.append(helper.make_node("Reshape", [x, f"{base}/in_shape"], [f"{base}/in"], name=f"{base}/Reshape_in"))
            x = f"{base}/in"
        y = add.output[0] if len(out_shape) == 2 else f"{base}/out"
        new.append(helper.make_node("Gemm", [x, n.input[1], bias], [y], name=f"{base}/Gemm"))
        if len(out_shape) != 2:
            g.initializer.append(numpy_helper.from_array(np.array(out_shape, np.int64), f"{base}/out_shape"))
            new.append(helper.make_node("Reshape", [y, f"{base}/out_shape"], [add.output[0]],
                                        name=f"{base}/Reshape_out"))
        for node in new:
            node.metadata_props.extend(n.metadata_props)  # the torch module it came from (search units)
        nodes.extend(new)
        skip.add(id(add))
        count += 1
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(dst))
    return count


def _bias_add(n, inits, users, outputs):
    """The Add that adds a constant bias [N] / [1, N] to MatMul ``n``'s output (its only consumer), or None."""
    if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2 or n.output[0] in outputs:
        return None
    used = users.get(n.output[0], [])
    add = used[0] if len(used) == 1 and used[0].op_type == "Add" else None
    if add is None:
        return None
    bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
    width = inits[n.input[1]].dims[1]
    return add if bias in inits and list(inits[bias].dims) in ([width], [1, width]) else None


def drop_unread_qdq(path: Path, quantized_ops) -> int:
    """Remove, in place, the Q->DQ pairs on MatMul/Gemm outputs that no int8 consumer reads: a consumer
    is int8 if its type is in ``quantized_ops``, or it is a Q/DQ, or a data-movement op whose outputs
    only feed QuantizeLinear (it runs in int8 after ORT's QDQ propagation). Returns pairs removed."""
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    qops = set(quantized_ops or ())

    def int8(n) -> bool:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type in qops:
            return True
        if n.op_type in DATA_MOVEMENT:
            after = [c for o in n.output for c in users.get(o, [])]
            return bool(after) and all(c.op_type == "QuantizeLinear" for c in after)
        return False

    remove, rename = [], {}
    for q in g.node:
        p = producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if p is None or p.op_type not in ("MatMul", "Gemm") or q.output[0] in outputs:
            continue
        dqs = users.get(q.output[0], [])
        if not dqs or any(c.op_type != "DequantizeLinear" or c.output[0] in outputs for c in dqs):
            continue
        if any(int8(u) for dq in dqs for u in users.get(dq.output[0], [])):
            continue
        remove += [q, *dqs]
        rename.update({dq.output[0]: q.input[0] for dq in dqs})
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for n in remove:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    onnx.save(m, str(path))
    return sum(n.op_type == "QuantizeLinear" for n in remove)


def sentinel_tensors(path: Path) -> set[str]:
    """Float tensors computed (through any op but Softmax/Shape/Size) from a constant that holds inf/NaN
    or |x| >= 1e30."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph

    def bad_value(a: np.ndarray) -> bool:
        return a.dtype.kind == "f" and a.size > 0 and not (np.isfinite(a).all() and np.abs(a).max() < SENTINEL)

    bad = {i.name for i in g.initializer if bad_value(numpy_helper.to_array(i))}
    bad |= {n.output[0] for n in g.node if n.op_type == "Constant"
            for a in n.attribute if a.name == "value" and bad_value(numpy_helper.to_array(a.t))}
    changed = True
    while changed:
        changed = False
        for n in g.node:
            if n.op_type in ("Softmax", "Shape", "Size") or not bad.intersection(n.input):
                continue
            for o in n.output:
                if o and o not in bad:
                    bad.add(o)
                    changed = True
    return bad


def q_ranges(path: Path) -> dict[str, tuple[float, float]]:
    """The float range each QuantizeLinear of a QDQ graph can represent, by the tensor it quantizes
    (per-tensor quantizers only)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        scale, zero = inits[n.input[1]], inits[n.input[2]]
        if scale.size != 1:
            continue
        info = np.iinfo(zero.dtype)
        s, z = float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])
        out[n.input[0]] = ((info.min - z) * s, (info.max - z) * s)
    return out
