"""The multimodal fusions users write (tests/fusion_zoo.py), each through fp32 export and int8 on every CPU
target, by the build worker's own code path (quality methods, conversion-error rescue, accuracy search),
checked against the fp32 torch model: ``ok`` with cosine >= 0.99.

The issue's own fusion (``gated_product``: squeezes between quantized ops) runs in the default suite; the
rest of the zoo is ``slow`` (about 3 minutes, LiteRT's conversions most of it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.backends import get_backend
from edgekit.config.profiles import load_profile
from edgekit.config.recipe import load_recipe
from edgekit.errors import TargetError
from edgekit.inputs.data import load_evaluation
from edgekit.inputs.model import load_model, reference_outputs
from edgekit.measure.verify import fidelity
from edgekit.orchestrate.jobs import BuildJob, SearchSpec
from edgekit.orchestrate.worker import build
from tests import fusion_zoo

ZOO_FILE = Path(fusion_zoo.__file__)
ROOT_TARGETS = ZOO_FILE.parents[1] / "targets"
TARGETS = ["ort-cpu", "openvino-x86", "tflite-mobile"]
FAST = {"gated_product"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zoo-data")
    np.savez(d / "calib.npz", **fusion_zoo.data(32, 1))
    np.savez(d / "eval.npz", **fusion_zoo.data(32, 2))
    return d


def write_recipe(folder: Path, data: Path, name: str) -> Path:
    rec = folder / f"{name}.toml"
    rec.write_text(f'''targets = {TARGETS}
[model]
source = "{ZOO_FILE}:{name}"
inputs = [
  {{ name = "image", shape = [1, 3, {fusion_zoo.IMG}, {fusion_zoo.IMG}], dtype = "float32" }},
  {{ name = "input_ids", shape = [1, {fusion_zoo.SEQ}], dtype = "int64" }},
  {{ name = "attention_mask", shape = [1, {fusion_zoo.SEQ}], dtype = "int64" }},
]
[data]
calibration = "{data / 'calib.npz'}"
evaluation = "{data / 'eval.npz'}"
metric = "cosine"
''')
    return rec


def build_and_check(tmp: Path, data: Path, name: str, target: str):
    """The worker's build of one zoo model for one target; returns (result, fidelity of its int8 artifact)."""
    rec = write_recipe(tmp, data, name)
    r = load_recipe(rec)
    evals = list(load_evaluation(r))
    ref = reference_outputs(load_model(r), r.model.inputs, evals)
    np.save(tmp / "ref.npy", ref)
    res = build(BuildJob(recipe=str(rec), target=target, out=str(tmp / "out"),
                         search=SearchSpec(reference=str(tmp / "ref.npy"), max_drop=0.01, time_budget_s=120,
                                           eval_samples=len(evals), max_steps=6)))
    assert res.optimized is not None, f"{name} on {target}: {res.optimized_error}"
    prof = load_profile(target)
    backend = get_backend(prof.backend)
    runner = backend.load(Path(res.optimized.path), backend.options(prof)[2])
    outs = np.stack([runner.run(s)[0].reshape(-1) for s in evals])
    return res, fidelity(outs, ref)


CASES = [pytest.param(name, target, marks=() if name in FAST else pytest.mark.slow)
         for name in fusion_zoo.ZOO for target in TARGETS]


@pytest.mark.parametrize("name,target", CASES)
def test_every_fusion_quantizes_on_every_target(name, target, data_dir, tmp_path):
    res, fid = build_and_check(tmp_path, data_dir, name, target)
    assert res.quantize_search is not None and res.quantize_search.status == "ok", res.quantize_search
    assert fid["cosine"] >= 0.99, (name, target, fid)
    assert "int8" in res.optimized.precision


def test_zoo_models_are_seeded_and_run():
    for name, cls in fusion_zoo.ZOO.items():
        a, b = getattr(fusion_zoo, name)(), getattr(fusion_zoo, name)()
        x = [torch.from_numpy(v) for v in fusion_zoo.data(2, 0).values()]
        out = a(*(t[:1] for t in x))
        assert out.shape == (1, 10) and torch.equal(out, b(*(t[:1] for t in x))), name


# -- the conversion-error rescue: what each toolchain's message names, as units to keep in float -------

@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    """gated_product's fp32 artifacts on the three backends, and the recipe they came from."""
    from edgekit.inputs.data import load_calibration
    from edgekit.inputs.model import example_inputs

    tmp = tmp_path_factory.mktemp("zoo-export")
    r = load_recipe(write_recipe(tmp, data_dir, "gated_product"))
    model, calib = load_model(r), load_calibration(r)
    args = example_inputs(r.model.inputs, calib.sample(0))
    out = {}
    for target in TARGETS:
        prof = load_profile(target)
        backend = get_backend(prof.backend)
        ex, qo, _ = backend.options(prof)
        (tmp / target).mkdir()
        out[target] = (backend, backend.export_fp32(model, args, r.model.inputs, tmp / target, ex), qo)
    return out


def test_onnxruntime_error_naming_a_tensor_keeps_its_readers_in_float(exported):
    import onnx

    backend, fp32, qo = exported["ort-cpu"]
    graph = onnx.load(str(fp32.path), load_external_data=False).graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm" and "gate.weight" in n.input)
    weight = gemm.input[1]
    # ONNX Runtime's own wording (onnxruntime/quantization/operators/conv.py)
    units = backend.units_of_error(fp32, qo, f"quantize_static failed: ValueError: Expected {weight} to be an initializer")
    assert gemm.name in units and all(u in {n.name for n in graph.node} for u in units)
    assert backend.units_of_error(fp32, qo, "quantize_static failed: MemoryError") == []
    kept = backend.keep_in_float(qo, units)
    assert set(units) <= set(backend.float_units(kept))


def test_openvino_error_naming_an_operation_keeps_it_in_float(exported):
    import openvino as ov

    backend, fp32, qo = exported["openvino-x86"]
    op = next(o for o in ov.Core().read_model(str(fp32.path)).get_ops() if o.get_type_name() == "MatMul")
    name = op.get_friendly_name()
    assert backend.units_of_error(fp32, qo, f"nncf.quantize failed: RuntimeError: cannot quantize node {name}: "
                                            "unsupported") == [name]
    assert backend.units_of_error(fp32, qo, "nncf.quantize failed: RuntimeError: out of memory") == []


def test_litert_error_naming_a_source_line_keeps_that_line_in_float(exported):
    from edgekit.backends.litert.pt2e import nodes_at_lines

    backend, fp32, qo = exported["tflite-mobile"]
    line = next(i for i, text in enumerate(ZOO_FILE.read_text().splitlines(), 1) if "a, q = a.squeeze(1)" in text)
    message = (f"litert PT2E int8 failed: ValueError: Failed to run converter passes: {ZOO_FILE}:{line}:0: error: "
               f"'tfl.reshape' op quantization parameters violate the same scale constraint")
    units = backend.units_of_error(fp32, qo, message)
    assert units == [f"fusion_zoo.py:{line}:tfl.reshape"]  # that line's reshapes, and what feeds and reads them
    kept = backend.keep_in_float(qo, units)
    assert kept.float_lines == units and kept.float_modules == qo.float_modules
    gm = torch.export.export(fp32.state.model, (), fp32.state.kwargs).module()
    hit = nodes_at_lines(gm, units)
    kinds = {str(n.target).split(".")[-2] for n in hit}
    assert {"squeeze", "cat", "unsqueeze", "transpose"} <= kinds  # the squeezes, what reads them, what feeds them
    everything = nodes_at_lines(gm, [f"fusion_zoo.py:{line}"])  # no op named: the whole line
    assert hit <= everything


def test_a_converter_error_is_rescued_by_keeping_the_named_op_in_float(data_dir, tmp_path):
    """litert-torch's own annotation (share_same_scale = false) on shared_view: the converter rejects the
    int8 graph naming a source line; the build keeps that line's reshape and its neighbours in float and
    retries, and the report says what and why."""
    prof = tmp_path / "tflite-vendor-annotation.toml"
    prof.write_text((ROOT_TARGETS / "tflite-mobile.toml").read_text().replace(
        "[quantize]\n", "[quantize]\nshare_same_scale = false\n", 1).replace('name = "tflite-mobile"',
                                                                            'name = "tflite-vendor-annotation"'))
    backend = get_backend("litert")
    rec = write_recipe(tmp_path, data_dir, "shared_view")
    from edgekit.inputs.data import load_calibration
    from edgekit.inputs.model import example_inputs

    r = load_recipe(rec)
    model, calib = load_model(r), load_calibration(r)
    fp32 = backend.export_fp32(model, example_inputs(r.model.inputs, calib.sample(0)), r.model.inputs, tmp_path,
                               backend.ExportOptions())
    with pytest.raises(TargetError, match=r"fusion_zoo\.py:\d+:0: error: 'tfl\.reshape' op quantization parameters "
                                          r"violate the same scale constraint"):
        backend.quantize(fp32, calib, tmp_path / "plain", backend.QuantizeOptions(share_same_scale=False))

    res, fid = build_and_check(tmp_path, data_dir, "shared_view", str(prof))
    rescues = res.optimized.details["conversion_rescues"]
    assert len(rescues) == 1 and rescues[0]["kept_float"][0].startswith("fusion_zoo.py:")
    assert rescues[0]["kept_float"][0].endswith(":tfl.reshape")
    assert "violate the same scale constraint" in rescues[0]["because"]
    assert res.optimized.details["float_lines"] == rescues[0]["kept_float"]
    assert fid["cosine"] >= 0.99 and res.quantize_search.status == "ok"
    from edgekit.report.markdown import rescues_md

    assert "kept in float after a conversion error: `fusion_zoo.py:" in rescues_md(res.optimized.details)[0]
