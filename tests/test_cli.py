"""The command line: exit codes, messages, and no output left behind by a bad run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgekit.cli import main
from tests.conftest import ROOT, load


def test_help_teaches_the_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("[model]", "source =", "calibration =", "metric =", "[gates]", "Exit codes", "[run]", "--cluster",
                "matrix.json"):
        assert key in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_bad_recipe_exits_2_and_writes_nothing(write_recipe, workdir, capsys):
    p = write_recipe(extra="oops = 1")
    out = workdir / "out"
    assert main(["run", str(p), "--out", str(out)]) == 2
    assert "data.oops: unknown key" in capsys.readouterr().err
    assert not out.exists() and not list(workdir.glob(".out.partial-*"))


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
    assert "not an earlier edgekit output (no .edgekit-output in it); refusing to overwrite" in capsys.readouterr().err
    assert (workdir / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-x86", "tflite-mobile"])
def test_calibration_that_cannot_be_fed_exits_2_naming_the_input(write_recipe, workdir, capsys, target):
    arrays = load(workdir / "calib.npz")
    arrays["image"] = arrays["image"][:, :, :16]
    np.savez(workdir / "calib.npz", **arrays)
    assert main(["run", str(write_recipe(targets=f'["{target}"]')), "--out", str(workdir / "out")]) == 2
    assert "input 'image' has per-sample shape (3, 16, 32)" in capsys.readouterr().err
    assert not (workdir / "out").exists()


def test_phone_without_device_is_not_measured_never_host_numbers(write_recipe, workdir):
    (workdir / "phone.toml").write_text((ROOT / "targets" / "ort-cpu.toml").read_text()
                                        .replace('name = "ort-cpu"', 'name = "phone"')
                                        .replace('device = "host"', 'device = "adb:emulator-5554"'))
    out = workdir / "out"
    assert main(["run", str(write_recipe(targets='["phone.toml"]')), "--out", str(out)]) == 0
    (t,) = json.loads((out / "report.json").read_text())["targets"]
    assert t["status"] == "ok" and t["device"] == "adb:emulator-5554"
    for side in ("fp32", "optimized"):
        assert t[side]["latency_ms"] is None
        assert t[side]["latency_reason"].startswith("not measured: no device")
        assert t[side]["metric"] > 0.98  # still verified, on the host
    assert t["speedup_p50"] is None
    assert "not measured" in (out / "report.md").read_text()


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
    assert "no CUDA provider" in out and "edgekit-deploy[onnxruntime-gpu]" in out  # this machine has no GPU
    assert "matplotlib" in out and "torch-pruning" in out  # the extras too
    out = subprocess.run([sys.executable, "-m", "edgekit", "targets"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["openvino-x86", "ort-arm", "ort-cpu", "ort-gpu", "tflite-mobile"]


def test_doctor_is_quiet_and_names_the_fix_for_a_missing_or_broken_package(tmp_path, monkeypatch):
    from edgekit import doctor

    p = subprocess.run([sys.executable, "-m", "edgekit", "doctor"], capture_output=True, text=True, check=True)
    assert p.stderr.strip() == ""  # no absl / oneDNN / torchao banners
    monkeypatch.setattr(doctor, "EXTRAS", doctor.EXTRAS + (("no_such_mod", "no-such-dist", "a feature", "pip install x"),))
    out = doctor.report()
    assert "no-such-dist     missing: pip install x" in out and "to fix (from the edgekit checkout):" in out
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(doctor, "EXTRAS", (("broken_mod", "broken-dist", "a feature", "pip install y"),))
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda d: "1.0" if d == "broken-dist" else real(d))
    deep = doctor.report(deep=True)
    assert "broken-dist      BROKEN 1.0: RuntimeError: half installed" in deep and "  broken-dist: pip install y" in deep


def test_a_worker_reports_its_progress_in_quarters_for_the_parent_to_show(monkeypatch, capsys):
    from edgekit import progress

    monkeypatch.setenv(progress.PREFIX_ENV, "[ort-cpu] verify fp32")
    assert list(progress.bar(range(8), 8, "verify")) == list(range(8))
    progress.note("12 rounds in 0.6 s")
    assert capsys.readouterr().err.splitlines() == [
        "[ort-cpu] verify fp32: 2/8", "[ort-cpu] verify fp32: 4/8", "[ort-cpu] verify fp32: 6/8",
        "[ort-cpu] verify fp32: 8/8", "[ort-cpu] verify fp32: 12 rounds in 0.6 s"]
    monkeypatch.delenv(progress.PREFIX_ENV)
    progress.note("outside a worker: nothing")
    assert list(progress.bar(range(3), 3, "x")) == [0, 1, 2] and capsys.readouterr().err == ""
