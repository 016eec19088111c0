"""The LiteRT backend with the real toolchain: litert-torch conversion, PT2E int8, ai-edge-litert runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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
    d = tmp_path_factory.mktemp("litert")
    (d / "edgekit.toml").write_text(recipe_text(f"{EXAMPLE}/model.py:build", f"{DATA}/calib.npz", f"{DATA}/eval.npz",
                                                extra="max_calibration_samples = 16\nmax_evaluation_samples = 30"))
    r = load_recipe(d / "edgekit.toml")
    prof = load_profile("tflite-mobile")
    backend = get_backend(prof.backend)
    ex, qo, rt = backend.options(prof)
    model = load_model(r)
    calib, evals = load_calibration(r), load_evaluation(r)
    fp32 = backend.export_fp32(model, example_inputs(r.model.inputs, calib.sample(0)), r.model.inputs, d, ex)
    int8 = backend.quantize(fp32, calib, d, qo)
    return backend, rt, fp32, int8, evals, reference_outputs(model, r.model.inputs, evals)


def _outputs(backend, rt, path, evals):
    runner = backend.load(path, rt)
    return np.stack([runner.run(s)[0].reshape(-1) for s in evals])


def _io(artifact, side):
    return {t["name"]: t for t in artifact.details["io"][side]}


def test_fp32_tflite_keeps_input_names_and_matches_torch(built):
    backend, rt, fp32, _, evals, ref = built
    ins = _io(fp32, "inputs")
    assert set(ins) == {"image", "input_ids", "attention_mask"}
    assert ins["input_ids"]["dtype"] == "int32" and ins["image"]["dtype"] == "float32"  # int64 -> int32
    np.testing.assert_allclose(_outputs(backend, rt, fp32.path, evals), ref, atol=1e-4)


def test_int8_tflite_has_integer_io_that_the_runner_handles(built):
    backend, rt, fp32, int8, evals, ref = built
    img, out = _io(int8, "inputs")["image"], _io(int8, "outputs")["output_0"]
    assert img["dtype"] == "int8" and img["scale"] > 0
    assert out["dtype"] == "int8" and out["scale"] > 0
    assert int8.size_bytes < fp32.size_bytes / 2
    assert int8.precision == "int8 (PT2E static, per-channel)"
    outs = _outputs(backend, rt, int8.path, evals)
    assert outs.dtype == np.float32 and cosine(outs, ref) > 0.99  # dequantized, not raw int8 codes


def test_xnnpack_off_and_threads_give_the_same_answers(built):
    backend, rt, _, int8, evals, _ = built
    a = _outputs(backend, rt, int8.path, list(evals)[:5])
    b = _outputs(backend, rt.model_copy(update={"xnnpack": False, "threads": 2}), int8.path, list(evals)[:5])
    assert cosine(a, b) > 0.99


def test_unlowerable_op_names_the_op(built, tmp_path):
    backend, *_ = built

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
