"""The LiteRT backend with the real toolchain: litert-torch conversion, PT2E int8, ai-edge-litert runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit.cli import main
from edgekit.errors import TargetError
from edgekit.config.recipe import InputSpec
from edgekit.measure.verify import cosine
from tests.conftest import Built, build_target


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return build_target("tflite-mobile", tmp_path_factory.mktemp("litert"), 16, 30)


def _io(artifact, side):
    return {t["name"]: t for t in artifact.details["io"][side]}


def test_fp32_tflite_keeps_input_names_and_matches_torch(built):
    ins = _io(built.fp32, "inputs")
    assert set(ins) == {"image", "input_ids", "attention_mask"}
    assert ins["input_ids"]["dtype"] == "int32" and ins["image"]["dtype"] == "float32"  # int64 -> int32
    np.testing.assert_allclose(built.outputs(built.fp32.path), built.reference, atol=1e-4)


def test_int8_tflite_has_integer_io_that_the_runner_handles(built):
    fp32, int8 = built.fp32, built.optimized
    img, out = _io(int8, "inputs")["image"], _io(int8, "outputs")["output_0"]
    assert img["dtype"] == "int8" and img["scale"] > 0
    assert out["dtype"] == "int8" and out["scale"] > 0
    assert int8.size_bytes < fp32.size_bytes / 2
    assert int8.precision == "int8 (PT2E static, per-channel)"
    outs = built.outputs(int8.path)
    assert outs.dtype == np.float32 and cosine(outs, built.reference) > 0.99  # dequantized, not raw int8 codes


def test_xnnpack_off_and_threads_give_the_same_answers(built):
    path, first = built.optimized.path, built.evals[:5]
    a = built.outputs(path, samples=first)
    b = built.outputs(path, built.runtime.model_copy(update={"xnnpack": False, "threads": 2}), first)
    assert cosine(a, b) > 0.99


def test_unlowerable_op_names_the_op(built, tmp_path):
    backend = built.backend

    class Svd(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[0]

    spec = [InputSpec(name="x", shape=[1, 4, 4], dtype="float32")]
    with pytest.raises(TargetError, match=r"litert_torch\.convert failed: .*aten\._linalg_svd"):
        backend.export_fp32(Svd(), (torch.randn(1, 4, 4),), spec, tmp_path, backend.ExportOptions())


def test_corrupt_tflite_to_bench_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"TFL3 but not really")
    assert main(["bench", str(bad)]) == 2
    assert "ai_edge_litert cannot load" in capsys.readouterr().err
