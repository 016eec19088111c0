"""The command line: exit codes, messages, and no output left behind by a bad run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgekit.cli import main


def test_help_teaches_the_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("[model]", "source =", "calibration =", "metric =", "[gates]", "Exit codes"):
        assert key in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_bad_recipe_exits_2_and_writes_nothing(write_recipe, workdir, capsys):
    p = write_recipe(extra="oops = 1")
    out = workdir / "out"
    assert main(["run", str(p), "--out", str(out)]) == 2
    assert "data.oops: unknown key" in capsys.readouterr().err
    assert not out.exists() and not (workdir / "out.partial").exists()


def test_bad_data_exits_2_and_writes_nothing(write_recipe, workdir, capsys):
    out = workdir / "out"
    assert main(["run", str(write_recipe(metric="top1")), "--out", str(out)]) == 2
    assert "needs a 'labels' array" in capsys.readouterr().err
    assert not out.exists()


def test_output_dir_not_writable(write_recipe, workdir, capsys):
    (workdir / "afile").write_text("x")
    assert main(["run", str(write_recipe()), "--out", str(workdir / "afile" / "out")]) == 2
    assert "output directory" in capsys.readouterr().err


def test_output_dir_that_is_not_ours_is_not_overwritten(write_recipe, workdir, capsys):
    (workdir / "mine").mkdir()
    (workdir / "mine" / "thesis.tex").write_text("precious")
    assert main(["run", str(write_recipe()), "--out", str(workdir / "mine")]) == 2
    assert "not an earlier edgekit output; refusing to overwrite" in capsys.readouterr().err
    assert (workdir / "mine" / "thesis.tex").read_text() == "precious"


def test_bench_corrupt_artifact(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    assert main(["bench", str(bad)]) == 2
    assert "onnxruntime cannot load" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: file not found" in capsys.readouterr().err


def test_doctor_and_targets():
    out = subprocess.run([sys.executable, "-m", "edgekit", "doctor"], capture_output=True, text=True, check=True).stdout
    assert "onnxruntime" in out and "CPUExecutionProvider" in out and "ort-cpu" in out
    out = subprocess.run([sys.executable, "-m", "edgekit", "targets"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ort-cpu") and "onnxruntime" in out
