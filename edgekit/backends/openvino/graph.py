"""Questions about an OpenVINO IR that the OpenVINO backend answers for the accuracy search.

``activation_sensitivity`` reads a quantized IR, adds the input and the output of every activation
``FakeQuantize`` as model outputs, runs a few calibration samples (f32 compile: the reference is float,
not bf16) and ranks the FakeQuantize nodes by the median per-channel SQNR between the two
(``edgekit.quantize.sqnr.channel_sqnr``): the local quantization noise of each activation, with the ops
it feeds (what NNCF's ``ignored_scope`` keeps out of int8). ``ops_of_modules`` finds the ops that came
from given torch modules, by the ``torch.export`` node names the converter keeps as op-name prefixes.
""" 
from __future__ import annotations

from pathlib import Path
import numpy as np

from edgekit.quantize.sqnr import channel_sqnr


def activation_sensitivity(xml: Path, calibration, samples: int) -> list[tuple[list[str], float]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    fqs = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
           and op.input_value(0).get_node().get_type_name() not in ("Constant", "Convert")]
    if not fqs:
        return []
    consumers = [sorted({t.get_node().get_friendly_name() for t in fq.output(0).get_target_inputs()
                         if t.get_node().get_type_name() != "Result"}) for fq in fqs]
    model.add_outputs([fq.input_value(0) for fq in fqs] + [fq.output(0) for fq in fqs])

    def key(port) -> tuple:
        return port.get_node().get_friendly_name(), port.get_index()

    index = {}
    for i, out in enumerate(model.outputs):  # a Result per output, in the compiled model's order
        index.setdefault(key(out.get_node().input_value(0)), i)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    names = {p.get_any_name() for p in compiled.inputs}
    pre: list[list] = [[] for _ in fqs]
    post: list[list] = [[] for _ in fqs]
    for i in range(min(samples, len(calibration))):
        res = req.infer({k: v for k, v in calibration.sample(i).items() if k in names})
        vals = [np.asarray(res[compiled.outputs[j]]) for j in range(len(compiled.outputs))]
        for j, fq in enumerate(fqs):
            pre[j].append(vals[index[key(fq.input_value(0))]])
            post[j].append(vals[index[key(fq.output(0))]])
    ranked = [(consumers[j], channel_sqnr(pre[j], post[j])) for j in range(len(fqs))]
    return sorted(ranked, key=lambda t: t[1])


WEIGHTED = ("MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData")


def ops_of_modules(xml: Path, fx_modules: dict[str, str], modules: list[str]) -> list[str]:
    """Friendly names of the weighted ops of the IR ``xml`` whose ``torch.export`` node (the first path
    component of the name, e.g. ``linear_3`` in ``linear_3/aten.linear.default/MatMul``) came from one
    of ``modules``. ``fx_modules``: fx node name -> module path, recorded at export. Ops the converter
    renamed while fusing (a conv folded with its BatchNorm) are not found."""
    import openvino as ov

    wanted = set(modules)
    return sorted(op.get_friendly_name() for op in ov.Core().read_model(str(xml)).get_ordered_ops()
                  if op.get_type_name() in WEIGHTED
                  and fx_modules.get(op.get_friendly_name().split("/")[0]) in wanted)


def _constant_ops(model) -> dict[str, bool]:
    """Op name -> whether its value is a constant (a Constant, or computed from constants only)."""
    const: dict[str, bool] = {}
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        const[op.get_friendly_name()] = t == "Constant" or (
            t not in ("Parameter", "ReadValue", "Result", "Assign") and op.get_input_size() > 0
            and all(const[i.get_source_output().get_node().get_friendly_name()] for i in op.inputs()))
    return const


def activation_matmuls(xml: Path) -> list[str]:
    """MatMuls none of whose inputs is constant: attention's Q.K^T and P.V (activation x activation)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    const = _constant_ops(model)
    return [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
            and not any(const[i.get_source_output().get_node().get_friendly_name()] for i in op.inputs())]


def op_macs(xml: Path, names) -> dict[str, int]:
    """Multiply-accumulates of the MatMul / convolution ops among ``names`` (0 for any other op), from
    the IR's static shapes."""
    import math

    import openvino as ov

    wanted, out = set(names), {}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        name = op.get_friendly_name()
        if name not in wanted:
            continue
        out[name] = 0
        t = op.get_type_name()
        if t not in WEIGHTED or not op.get_output_partial_shape(0).is_static or \
                not op.input(1).get_partial_shape().is_static:
            continue
        y, w = list(op.get_output_shape(0)), list(op.input(1).get_shape())
        if t == "MatMul":
            a = list(op.input(0).get_shape()) if op.input(0).get_partial_shape().is_static else []
            k = (a[-2] if op.get_attributes().get("transpose_a") else a[-1]) if a else 0
        elif t == "GroupConvolution":
            k = math.prod(w[2:])
        else:
            k = math.prod(w[1:])
        out[name] = math.prod(y) * k
    return out
