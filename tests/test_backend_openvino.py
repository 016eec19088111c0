"""The OpenVINO backend with the real toolchain: torch.export -> IR, NNCF int8, true-f32 compile."""
from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from edgekit.backends import get_backend
from edgekit.cli import main
from edgekit.data import load_calibration, load_evaluation
from edgekit.errors import TargetError
from edgekit.model import example_inputs, load_model, reference_outputs
from edgekit.profiles import load_profile
from edgekit.recipe import InputSpec, load_recipe
from edgekit.verify import cosine
from tests.conftest import DATA, EXAMPLE, recipe_text


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("ov")
    (d / "edgekit.toml").write_text(recipe_text(f"{EXAMPLE}/model.py:build", f"{DATA}/calib.npz", f"{DATA}/eval.npz",
                                                extra="max_calibration_samples = 32\nmax_evaluation_samples = 30"))
    r = load_recipe(d / "edgekit.toml")
    prof = load_profile("openvino-x86")
    backend = get_backend(prof.backend)
    ex, qo, rt = backend.options(prof)
    model = load_model(r)
    calib, evals = load_calibration(r), load_evaluation(r)
    fp32 = backend.export_fp32(model, example_inputs(r.model.inputs, calib.sample(0)), r.model.inputs, d, ex)
    int8 = backend.quantize(fp32, calib, d, qo)
    return backend, rt, fp32, int8, evals, reference_outputs(model, r.model.inputs, evals), model


def _outputs(backend, rt, path, evals):
    runner = backend.load(path, rt)
    return np.stack([runner.run(s)[0].reshape(-1) for s in evals])


def test_fp32_ir_has_recipe_names_static_shapes_and_fp32_weights(built):
    backend, rt, fp32, _, evals, ref, model = built
    ir = ov.Core().read_model(str(fp32.path))
    assert [(p.get_any_name(), p.get_partial_shape().to_shape()) for p in ir.inputs] == [
        ("image", [1, 3, 32, 32]), ("input_ids", [1, 32]), ("attention_mask", [1, 32])]
    weights = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_data().size > 1000]
    assert weights and {str(op.get_element_type()) for op in weights} == {"<Type: 'float32'>"}  # not fp16
    assert sum(op.get_data().size for op in weights) > 0.95 * sum(p.numel() for p in model.parameters())
    # compiled with INFERENCE_PRECISION_HINT=f32 the IR reproduces torch (bf16 would not, on bf16 CPUs)
    np.testing.assert_allclose(_outputs(backend, rt, fp32.path, evals), ref, atol=1e-4)


def test_int8_ir_is_quantized_and_faithful_at_every_thread_count(built):
    backend, rt, fp32, int8, evals, ref, _ = built
    assert int8.details["fake_quantize_nodes"] > 10
    assert int8.precision == "int8 (NNCF performance, transformer)"
    assert int8.size_bytes < fp32.size_bytes / 2
    one = _outputs(backend, rt, int8.path, evals)
    two = _outputs(backend, rt.model_copy(update={"threads": 2}), int8.path, evals)
    assert cosine(one, ref) > 0.97 and cosine(two, ref) > 0.97


def test_conversion_failure_names_the_op(built, tmp_path):
    import torch

    backend, *_ = built

    class Histogram(torch.nn.Module):
        def forward(self, x):
            return torch.histc(x, 10)

    spec = [InputSpec(name="image", shape=[1, 3, 32, 32], dtype="float32")]
    with pytest.raises(TargetError, match=r"openvino convert_model failed: .*No conversion rule found for "
                                          r"operations: aten\.histc"):
        backend.export_fp32(Histogram(), (torch.randn(1, 3, 32, 32),), spec, tmp_path, backend.ExportOptions())


@pytest.mark.slow
def test_nncf_failure_fails_the_target_and_keeps_the_fp32_ir(write_recipe, workdir, capsys):
    (workdir / "bad-ov.toml").write_text(
        (EXAMPLE.parents[1] / "targets" / "openvino-x86.toml").read_text()
        .replace('name = "openvino-x86"', 'name = "ov-bad-scope"').replace("names = []", 'names = ["no_such_node"]'))
    out = workdir / "out"
    assert main(["run", str(write_recipe(targets='["bad-ov.toml"]')), "--out", str(out)]) == 3
    doc = json.loads((out / "report.json").read_text())
    (t,) = doc["targets"]
    assert t["status"] == "failed" and t["reason"].startswith("nncf.quantize failed") and "no_such_node" in t["reason"]
    assert t["optimized"] is None
    assert t["fp32"]["metric"] > 0.9999 and t["fp32"]["latency_ms"]["p50"] > 0
    assert (out / t["fp32"]["artifact"]).is_file()
