"""The ONNX Runtime backend with the real toolchain: export, calibrated QDQ int8, load and run."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgekit.backends import get_backend
from edgekit.bench import has_vnni
from edgekit.data import load_calibration, load_evaluation
from edgekit.errors import InputError, TargetError
from edgekit.model import example_inputs, load_model, reference_outputs
from edgekit.profiles import load_profile
from edgekit.recipe import load_recipe
from edgekit.verify import cosine


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tests.conftest import DATA, EXAMPLE, recipe_text

    d = tmp_path_factory.mktemp("ort")
    (d / "edgekit.toml").write_text(recipe_text(f"{EXAMPLE}/model.py:build", f"{DATA}/calib.npz", f"{DATA}/eval.npz",
                                                extra="max_calibration_samples = 16\nmax_evaluation_samples = 20"))
    r = load_recipe(d / "edgekit.toml")
    prof = load_profile("ort-cpu")
    backend = get_backend(prof.backend)
    ex, qo, rt = backend.options(prof)
    model = load_model(r)
    calib, evals = load_calibration(r), load_evaluation(r)
    fp32 = backend.export_fp32(model, example_inputs(r.model.inputs, calib.sample(0)), r.model.inputs, d, ex)
    int8 = backend.quantize(fp32, calib, d, qo)
    ref = reference_outputs(model, r.model.inputs, evals)
    return backend, rt, fp32, int8, evals, ref


def _outputs(backend, rt, artifact, evals):
    runner = backend.load(artifact.path, rt)
    return np.stack([runner.run(s)[0].reshape(-1) for s in evals])


def test_fp32_export_matches_torch(built):
    backend, rt, fp32, _, evals, ref = built
    assert [i.name for i in onnx.load(str(fp32.path)).graph.input] == ["image", "input_ids", "attention_mask"]
    np.testing.assert_allclose(_outputs(backend, rt, fp32, evals), ref, atol=1e-4)


def test_int8_is_qdq_smaller_and_faithful(built):
    backend, rt, fp32, int8, evals, ref = built
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.size_bytes < fp32.size_bytes / 2
    assert int8.precision.startswith("int8 (QDQ, U8S8, per-channel")
    assert int8.details["reduce_range"] == (not has_vnni())
    assert int8.details["calibration_samples"] == 16
    assert cosine(_outputs(backend, rt, int8, evals), ref) > 0.95
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
