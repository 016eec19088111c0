"""The Python API (edgekit.api): run a recipe file or dict, bench an artifact, re-render a report, the
recipe's JSON schema; and their command-line forms `edgekit report DIR` and `edgekit schema`."""
from __future__ import annotations

import json
import tomllib

import pytest

import edgekit
from edgekit.api import to_toml
from edgekit.cli import main
from edgekit.errors import InputError
from tests.conftest import EXAMPLE, INPUTS


def _recipe_dict() -> dict:
    inputs = tomllib.loads(INPUTS)["inputs"]
    return {"targets": ["ort-cpu"], "model": {"source": "model.py:build", "inputs": inputs},
            "data": {"calibration": "calib.npz", "evaluation": "eval.npz", "metric": "cosine",
                     "max_evaluation_samples": 50}}


def test_a_recipe_dict_becomes_toml_that_reads_back_the_same():
    d = {**_recipe_dict(), "gates": {"max_metric_drop": 0.01, "targets": {"ort-cpu": {"min_speedup": 1.5}}},
         "quantize": {"search": False}}
    assert tomllib.loads(to_toml(d)) == d


def test_run_a_recipe_dict_returns_the_typed_report(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)  # relative paths in a dict resolve against the current directory
    doc = edgekit.run(_recipe_dict(), out=tmp_path / "out")
    assert doc.model.name == workdir.name and [t.name for t in doc.targets] == ["ort-cpu"]
    assert doc.targets[0].status == "ok" and doc.targets[0].optimized.metric > 0.99
    assert (tmp_path / "out" / "report.json").is_file() and doc.eval.n == 50

    # render: report.md and report.html again from report.json
    (tmp_path / "out" / "report.md").unlink()
    (tmp_path / "out" / "report.html").unlink()
    again = edgekit.render(tmp_path / "out")
    assert again.targets[0].optimized.metric == doc.targets[0].optimized.metric
    assert "| ort-cpu | ✅ ok |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "out")]) == 0

    stats = edgekit.bench(tmp_path / "out" / doc.targets[0].optimized.artifact, runs=5, warmup=1)
    assert stats["latency_ms"]["n"] == 5 and stats["target"] == "ort-cpu"


def test_a_bad_recipe_dict_is_an_input_error_naming_the_field(workdir, monkeypatch, tmp_path):
    monkeypatch.chdir(workdir)
    bad = _recipe_dict()
    bad["data"]["metric"] = "f1"
    with pytest.raises(InputError, match="data.metric"):
        edgekit.run(bad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (None, "no report.json here"),
    ("{oops", "not a readable report.json"),
    ('{"schema": "other/1"}', "not an edgekit.report/1 report"),
    ('{"schema": "edgekit.report/1", "targets": 3}', "not a valid edgekit.report/1 report"),
])
def test_report_of_a_folder_without_a_good_report_json_is_exit_2(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    assert main(["report", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_schema_prints_the_recipes_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].startswith("https://json-schema.org/") and "path" not in schema["properties"]
    assert {"targets", "model", "data", "gates", "quantize", "prune"} <= set(schema["properties"])
    shipped = tomllib.loads((EXAMPLE / "edgekit.toml").read_text())
    assert set(shipped) <= set(schema["properties"])  # every section of the shipped recipe is in it


def test_import_edgekit_loads_no_toolchain():
    import subprocess
    import sys

    code = ("import sys, edgekit; edgekit.__all__; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'nncf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
