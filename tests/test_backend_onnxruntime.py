"""The ONNX Runtime backend with the real toolchain: export, calibrated QDQ int8, load and run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgekit.backends import get_backend
from edgekit.measure.machine import has_vnni
from edgekit.errors import InputError, TargetError
from edgekit.config.profiles import load_profile
from edgekit.measure.verify import cosine
from tests.conftest import Built, build_target


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_target("ort-cpu", tmp_path_factory.mktemp("ort"), 16, 20)


def test_fp32_export_matches_torch(built):
    assert [i.name for i in onnx.load(str(built.fp32.path)).graph.input] == ["image", "input_ids", "attention_mask"]
    np.testing.assert_allclose(built.outputs(built.fp32.path), built.reference, atol=1e-4)


def test_int8_is_qdq_smaller_and_faithful(built):
    fp32, int8 = built.fp32, built.optimized
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.size_bytes < fp32.size_bytes / 2
    assert int8.precision.startswith("int8 (QDQ, U8S8, per-channel")
    assert int8.details["reduce_range"] == (not has_vnni())
    assert int8.details["calibration_samples"] == 16
    assert cosine(built.outputs(int8.path), built.reference) > 0.95
    assert not (int8.path.parent / "model_fp32.pre.onnx").exists()  # intermediates cleaned up


def test_unknown_profile_option_names_the_table(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nbackend = "onnxruntime"\n[quantize]\nactivation_typ = "quint8"\n')
    with pytest.raises(InputError, match=r"bad\.toml: \[quantize\]\.activation_typ: Extra inputs are not permitted"):
        load_profile(str(bad))


def test_corrupt_model_cannot_load(tmp_path):
    backend = get_backend("onnxruntime")
    (tmp_path / "x.onnx").write_bytes(b"\x08garbage")
    with pytest.raises(TargetError, match=r"onnxruntime cannot load .*x\.onnx"):
        backend.load(tmp_path / "x.onnx", backend.RuntimeOptions())


def test_gemm_rewrite_is_exact_and_unread_qdq_pairs_go(built, tmp_path):
    """The quality passes (edgekit.backends.onnxruntime.passes): MatMul + bias as Gemm computes the same,
    every linear layer then quantizes to an integer Gemm, and Q/DQ pairs no int8 op reads are removed."""
    from edgekit.backends.onnxruntime import QuantizeOptions, passes

    gemm = tmp_path / "gemm.onnx"
    assert passes.matmul_add_as_gemm(built.fp32.path, gemm) > 0
    np.testing.assert_allclose(built.outputs(gemm), built.outputs(built.fp32.path), atol=1e-5)
    before = {n.name for n in onnx.load(str(built.fp32.path)).graph.node if n.op_type == "Gemm"}
    new = {n.name for n in onnx.load(str(gemm)).graph.node if n.op_type == "Gemm"} - before
    assert new and all(n.endswith("/Gemm") for n in new)   # "<matmul>/Gemm": exclusions by fp32 name reach it
    from tests.conftest import DATA
    from edgekit.inputs.data import SampleSet

    with np.load(DATA / "calib.npz") as z:
        calib = SampleSet(DATA / "calib.npz", {k: z[k][:16] for k in ("image", "input_ids", "attention_mask")}, None)
    plain = built.backend.quantize(built.fp32, calib, tmp_path, QuantizeOptions())
    (tmp_path / "q").mkdir()
    tuned = built.backend.quantize(built.fp32, calib, tmp_path / "q",
                                   QuantizeOptions(matmul_add_as_gemm=True, drop_unread_qdq=True))
    assert tuned.details["matmul_add_as_gemm"] > 0 and tuned.details["unread_qdq_dropped"] > 0
    q = lambda p: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert q(tuned.path) < q(plain.path)
    assert cosine(built.outputs(tuned.path), built.reference) >= cosine(built.outputs(plain.path), built.reference) - 0.002
