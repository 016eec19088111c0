"""Accuracy-aware quantization (edgekit.quantize.search) on a deliberately fragile model
(examples/fragile_attention: a -inf attention mask and an outlier channel), with the real ONNX Runtime."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import InputError
from edgekit.config.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FRAGILE = ROOT / "examples" / "fragile_attention"


@pytest.fixture
def fragile(tmp_path: Path) -> Path:
    """A copy of the fragile example with its data (32 calibration, 48 evaluation samples)."""
    import importlib.util

    for f in ("model.py", "edgekit.toml"):
        shutil.copy(FRAGILE / f, tmp_path / f)
    spec = importlib.util.spec_from_file_location("fragile_model", FRAGILE / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    np.savez(tmp_path / "calib.npz", **mod.make_data(32, seed=1))
    np.savez(tmp_path / "eval.npz", **mod.make_data(48, seed=2))
    return tmp_path


def _set_quantize(folder: Path, table: str) -> None:
    text = (folder / "edgekit.toml").read_text()
    text = text[: text.index("[quantize]")] + table
    (folder / "edgekit.toml").write_text(text)


def test_quantize_table_is_validated(fragile: Path):
    _set_quantize(fragile, "[quantize]\ntime_budget_s = 10\nbudget = 3\n")
    with pytest.raises(InputError, match=r"quantize\.budget: unknown key"):
        load_recipe(fragile)
    _set_quantize(fragile, "[quantize]\ntime_budget_s = 0\n")
    with pytest.raises(InputError, match=r"quantize\.time_budget_s: .*greater than 0"):
        load_recipe(fragile)


def test_search_is_on_only_with_an_accuracy_gate(fragile: Path, tmp_path: Path):
    from edgekit.orchestrate.pipeline import _search_spec
    from edgekit.config.profiles import load_profile

    prof, ref = load_profile("ort-cpu"), tmp_path / "reference.npy"
    np.save(ref, np.zeros((2, 10), np.float32))
    job = _search_spec(prof, load_recipe(fragile), ref)
    assert job.max_drop == 0.01 and job.time_budget_s == 120 and Path(job.reference).is_file()
    _set_quantize(fragile, "[quantize]\nsearch = false\n")
    assert _search_spec(prof, load_recipe(fragile), ref) is None
    text = (fragile / "edgekit.toml").read_text().replace("max_metric_drop = 0.01", "min_speedup = 0.1")
    (fragile / "edgekit.toml").write_text(text.replace("search = false", ""))
    assert _search_spec(prof, load_recipe(fragile), ref) is None  # no max_metric_drop: no search


@pytest.mark.slow
def test_search_repairs_the_collapsed_int8(fragile: Path):
    from edgekit.orchestrate.pipeline import run

    doc = run(fragile, out=fragile / "out").to_json()
    row = doc["targets"][0]
    qs = row["quantize_search"]
    assert qs["steps"][0]["drop"] > 0.3           # the default int8 collapses (outlier channel)
    assert qs["status"] == "ok" and qs["after"]["drop"] <= 0.01
    assert qs["kept_float"] and len(qs["steps"]) >= 2
    assert row["status"] == "ok" and row["metric_drop"] <= 0.01  # the full evaluation set agrees
    md = (fragile / "out" / "report.md").read_text()
    assert "quantize search" in md and "← chosen" in md
    assert json.loads((fragile / "out" / "report.json").read_text())["targets"][0]["quantize_search"] == qs
    assert not (fragile / "out" / "artifacts" / "ort-cpu" / "search").exists()  # losing candidates removed


@pytest.mark.slow
def test_time_budget_is_respected_and_the_failure_is_honest(fragile: Path):
    from edgekit.orchestrate.pipeline import run

    _set_quantize(fragile, "[quantize]\ntime_budget_s = 0.01\neval_samples = 16\n")  # less than any step
    doc = run(fragile, out=fragile / "out").to_json()
    row = doc["targets"][0]
    qs = row["quantize_search"]
    # A missed budget is a failed max_metric_drop gate (ci exit 1), judged on the measured figures
    assert row["budget_missed"] and [g["passed"] for g in doc["gates"] if g["gate"] == "max_metric_drop"] == [False]
    # One step may start (no cost estimate yet); none starts once the budget is spent.
    assert len(qs["steps"]) <= 2 and "time budget" in qs["stopped"]
    assert qs["status"] == "failed"
    assert row["status"] == "failed"
    assert row["reason"].startswith("accuracy budget not met (best drop ")
    assert " ms; max_metric_drop 0.01;" in row["reason"]
    assert row["optimized"]["metric"] is not None  # the best artifact is still verified and timed


def test_calibration_guard_excludes_nonfinite_tensors(fragile: Path, capsys):
    """Quantizing Add/Softmax too puts the -inf mask path into calibration: the guard keeps it float."""
    from edgekit.backends import get_backend
    from edgekit.backends.onnxruntime import QuantizeOptions
    from edgekit.inputs.data import load_calibration
    from edgekit.inputs.model import example_inputs, load_model

    r = load_recipe(fragile)
    backend = get_backend("onnxruntime")
    calib = load_calibration(r)
    ex, _, _ = backend.options(__import__("edgekit.config.profiles", fromlist=["x"]).load_profile("ort-cpu"))
    fp32 = backend.export_fp32(load_model(r), example_inputs(r.model.inputs, calib.sample(0)), r.model.inputs,
                               fragile, ex)
    capsys.readouterr()
    art = backend.quantize(fp32, calib, fragile, QuantizeOptions(op_types=["MatMul", "Gemm", "Add", "Softmax"]))
    err = capsys.readouterr().err
    assert "calibration guard" in err and "masked_fill" in err and "node_add" in err
    assert "node_add" in art.details["excluded_nonfinite_nodes"]
    assert "masked_fill" in art.details["nonfinite_tensors"]
