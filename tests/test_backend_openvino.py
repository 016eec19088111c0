"""The OpenVINO backend with the real toolchain: torch.export -> IR, NNCF int8, true-f32 compile."""
from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from edgekit.cli import main
from edgekit.errors import TargetError
from edgekit.config.recipe import InputSpec
from edgekit.measure.verify import cosine
from tests.conftest import EXAMPLE, Built, build_target


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_target("openvino-x86", tmp_path_factory.mktemp("ov"), 32, 30)


def test_fp32_ir_has_recipe_names_static_shapes_and_fp32_weights(built):
    ir = ov.Core().read_model(str(built.fp32.path))
    assert [(p.get_any_name(), p.get_partial_shape().to_shape()) for p in ir.inputs] == [
        ("image", [1, 3, 32, 32]), ("input_ids", [1, 32]), ("attention_mask", [1, 32])]
    weights = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_data().size > 1000]
    assert weights and {str(op.get_element_type()) for op in weights} == {"<Type: 'float32'>"}  # not fp16
    assert sum(op.get_data().size for op in weights) > 0.95 * sum(p.numel() for p in built.model.parameters())
    # compiled with INFERENCE_PRECISION_HINT=f32 the IR reproduces torch (bf16 would not, on bf16 CPUs)
    np.testing.assert_allclose(built.outputs(built.fp32.path), built.reference, atol=1e-4)


def test_int8_ir_op_names_are_unique_and_keep_the_fp32_irs(built):
    """stable_names numbers NNCF's new ops after the fp32 IR's: no repeats (NNCF's graph builder refuses
    repeated names), and every op of the fp32 IR keeps its name in the int8 IR (ignored_scope names from
    one are valid in the other)."""
    from collections import Counter

    names = [op.get_friendly_name() for op in ov.Core().read_model(str(built.optimized.path)).get_ordered_ops()]
    assert [n for n, c in Counter(names).items() if c > 1] == []
    weighted = [op.get_friendly_name() for op in ov.Core().read_model(str(built.fp32.path)).get_ordered_ops()
                if op.get_type_name() in ("MatMul", "Convolution", "GroupConvolution")]
    assert weighted and set(weighted) <= set(names)


def test_int8_ir_is_quantized_and_faithful_at_every_thread_count(built):
    fp32, int8, ref = built.fp32, built.optimized, built.reference
    assert int8.details["fake_quantize_nodes"] > 10
    assert int8.precision == "int8 (NNCF performance, transformer)"
    assert int8.size_bytes < fp32.size_bytes / 2
    one = built.outputs(int8.path)
    two = built.outputs(int8.path, built.runtime.model_copy(update={"threads": 2}))
    assert cosine(one, ref) > 0.97 and cosine(two, ref) > 0.97


def test_conversion_failure_names_the_op(built, tmp_path):
    import torch

    backend = built.backend

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
