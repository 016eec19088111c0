"""Hostile but realistic inputs and faults (issue #18): nothing edgekit did not write is deleted, one run per
output folder, a model file cannot decide the exit code, garbage outputs and labels are refused, ssh
hosts cannot smuggle options, bugs exit 4 with a log, signals clean up. Quick example, one target."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.cli import main
from tests.conftest import ROOT, load


def _run(recipe: Path, out: Path, *extra: str) -> int:
    return main(["run", str(recipe), "--out", str(out), "--targets", "ort-cpu", *extra])


# -- the output folder ----------------------------------------------------------------------------------

def test_a_foreign_folder_holding_a_report_json_is_never_replaced(write_recipe, workdir, capsys):
    out = workdir / "coverage"
    out.mkdir()
    (out / "report.json").write_text('{"tool": "coverage"}')
    (out / "index.html").write_text("someone else's")
    assert _run(write_recipe(), out) == 2
    err = capsys.readouterr().err
    assert f"output directory {out}: not empty and not an earlier edgekit output (no .edgekit-output" in err
    assert (out / "index.html").read_text() == "someone else's" and (out / "report.json").is_file()


def test_a_foreign_folder_at_the_prev_slot_is_never_replaced(write_recipe, workdir, capsys):
    (workdir / "out.prev").mkdir()
    (workdir / "out.prev" / "notes.txt").write_text("mine")
    assert _run(write_recipe(), workdir / "out") == 2
    assert "output directory" in capsys.readouterr().err and (workdir / "out.prev" / "notes.txt").exists()


def test_an_output_path_that_is_a_symlink_is_refused(write_recipe, workdir, capsys):
    (workdir / "elsewhere").mkdir()
    (workdir / "out").symlink_to(workdir / "elsewhere")
    assert _run(write_recipe(), workdir / "out") == 2
    assert "is a symbolic link; refusing to write through it" in capsys.readouterr().err


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_lock(write_recipe, workdir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / "out.lock").write_text(f"{holder.pid}\n")
        assert _run(write_recipe(), workdir / "out") == 2
        err = capsys.readouterr().err
        assert f"another edgekit run (pid {holder.pid}) is writing it (lock {workdir / 'out.lock'})" in err
    finally:
        holder.kill()
        holder.wait()
    assert (workdir / "out.lock").read_text().strip() == str(holder.pid)  # not ours to remove


def test_a_stale_lock_is_taken_over(tmp_path):
    from edgekit.orchestrate.pipeline import _lock

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "out.lock").write_text(f"{gone.pid}\n")
    with _lock(tmp_path / "out"):
        assert (tmp_path / "out.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / "out.lock").exists()


@pytest.mark.slow
def test_a_rerun_keeps_the_previous_output_as_prev(write_recipe, workdir):
    recipe, out = write_recipe(), workdir / "out"
    assert _run(recipe, out) == 0
    first = json.loads((out / "report.json").read_text())["created"]
    assert (out / ".edgekit-output").is_file()
    assert _run(recipe, out, "--device", "ssh:127.0.0.1:1") == 3  # a target that fails: the last good one stays
    doc = json.loads((out / "report.json").read_text())
    assert doc["targets"][0]["status"] == "failed" and doc["previous"] == str(workdir / "out.prev")
    assert json.loads((workdir / "out.prev" / "report.json").read_text())["created"] == first
    assert not list(workdir.glob(".out.partial-*")) and not (workdir / "out.lock").exists()


# -- the model file ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, message", [
    ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    ("import sys\nsys.exit(3)\n", "called sys.exit(3)"),
    ("import argparse\nargparse.ArgumentParser().add_argument('--weights', required=True)\n"
     "argparse.ArgumentParser().parse_args(['--weights'])\n", "called sys.exit(2)"),
    ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt"),
])
def test_a_model_file_cannot_decide_the_exit_code(write_recipe, workdir, capsys, code, message):
    model = workdir / "model.py"
    model.write_text(model.read_text() + "\n" + code)
    out = workdir / "out"
    assert _run(write_recipe(), out) == 2
    err = capsys.readouterr().err
    assert f"importing {model}" in err and message in err
    assert not out.exists()


def test_a_model_file_sees_only_its_own_name_in_argv(write_recipe, workdir, capsys):
    model = workdir / "model.py"
    model.write_text(model.read_text() + "\nimport sys\nassert sys.argv == [__file__], sys.argv\n")
    from edgekit.config.recipe import load_recipe
    from edgekit.inputs.model import load_model

    load_model(load_recipe(write_recipe()))


# -- garbage in, garbage refused ------------------------------------------------------------------------------

NAN_MODEL = """
import torch
from torch import nn


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, image, input_ids, attention_mask):
        return self.fc(image.flatten(1)) * float("nan")


def build():
    return Broken()
"""


def test_a_model_whose_outputs_are_nan_is_refused_naming_it(write_recipe, workdir, capsys):
    (workdir / "nan_model.py").write_text(NAN_MODEL)
    assert _run(write_recipe(source="nan_model.py:build"), workdir / "out") == 2
    err = capsys.readouterr().err
    assert "model.source 'nan_model.py:build': the fp32 PyTorch model gives NaN or Inf in the outputs of 200 of " \
           "200 evaluation samples (first: sample 0)" in err


def test_non_finite_outputs_are_counted():
    from edgekit.measure.verify import non_finite

    a = np.ones((5, 3), np.float32)
    assert non_finite(a) is None
    a[3, 1] = np.inf
    assert non_finite(a) == "NaN or Inf in the outputs of 1 of 5 evaluation samples (first: sample 3)"


def _with_labels(workdir: Path, labels) -> None:
    arrays = load(workdir / "eval.npz")
    arrays["labels"] = labels(len(arrays["image"]))
    np.savez(workdir / "eval.npz", **arrays)


def test_labels_outside_the_models_classes_are_refused(write_recipe, workdir, capsys):
    _with_labels(workdir, lambda n: np.full(n, 100_000, np.int64))
    assert _run(write_recipe(metric="top1"), workdir / "out") == 2
    err = capsys.readouterr().err
    assert f"evaluation data {workdir / 'eval.npz'}: 'labels' holds class 100000 (sample 0), but the model's first " \
           "output has" in err


@pytest.mark.parametrize("labels, message", [
    (lambda n: np.eye(4, dtype=np.int64)[np.zeros(n, int)], "expected one class index per sample"),
    (lambda n: np.zeros(n, np.float32), "expected integer class indices"),
    (lambda n: np.full(n, -1, np.int64), "negative class index (-1, sample 0)"),
])
def test_malformed_labels_are_refused(write_recipe, workdir, capsys, labels, message):
    _with_labels(workdir, labels)
    assert _run(write_recipe(metric="top1"), workdir / "out") == 2
    assert message in capsys.readouterr().err


def test_a_baseline_of_another_model_is_refused_before_any_work(write_recipe, workdir, capsys):
    prev = {"schema": "edgekit.report/1", "edgekit_version": "x", "created": "x",
            "machine": {"cpu": "c", "arch": "x86_64"}, "model": {"name": "someone_else", "source": "s", "params": 1},
            "eval": {"path": "e", "metric": "cosine", "n": 1, "fp32_torch": 1.0}, "targets": []}
    (workdir / "prev.json").write_text(json.dumps(prev))
    out = workdir / "out"
    assert main(["ci", str(write_recipe()), "--out", str(out), "--baseline", str(workdir / "prev.json")]) == 2
    err = capsys.readouterr().err
    assert f"baseline {workdir / 'prev.json'}: is a report of model 'someone_else'" in err and not out.exists()


# -- devices ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["ssh:-oProxyCommand=touch /tmp/pwned", "ssh:-V", "ssh:user@-h", "ssh:a;b",
                                    "adb:-x"])
def test_an_ssh_or_adb_device_that_could_be_an_option_is_bad_input(write_recipe, workdir, capsys, device):
    assert _run(write_recipe(), workdir / "out", "--device", device) == 2
    assert f"--device: device {device!r}: expected host, ssh:[user@]host[:port]" in capsys.readouterr().err


def test_ssh_gets_the_host_after_an_end_of_options_marker():
    from edgekit.measure.remote import ssh_command

    cmd = ssh_command("ssh:pi@board:2222")
    assert cmd[-2:] == ["--", "pi@board"] and cmd[cmd.index("-p") + 1] == "2222"


# -- bugs and signals -----------------------------------------------------------------------------------------

def test_an_internal_error_exits_4_with_the_traceback_in_a_log(write_recipe, workdir, capsys, monkeypatch):
    from edgekit.orchestrate import pipeline

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "prepare", boom)
    assert _run(write_recipe(), workdir / "out") == 4
    err = capsys.readouterr().err
    assert "edgekit: internal error: RuntimeError: a bug (traceback: " in err
    log = Path(err.split("(traceback: ")[1].split(";")[0])
    assert "raise RuntimeError" in log.read_text()
    log.unlink()


def test_sigterm_cleans_up_staging_and_workers(write_recipe, workdir):
    out = workdir / "out"
    p = subprocess.Popen([sys.executable, "-m", "edgekit", "run", str(write_recipe()), "--out", str(out),
                          "--targets", "ort-cpu", "--no-cache"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(workdir.glob(".out.partial-*/work/ort-cpu/build.job.json")):
        time.sleep(0.2)
    assert list(workdir.glob(".out.partial-*")), "the run never reached its build worker"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "edgekit: SIGTERM; nothing was written" in err
    assert not out.exists() and not list(workdir.glob(".out.partial-*")) and not (workdir / "out.lock").exists()
    time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-f", f"{workdir}/.out.partial"], capture_output=True, text=True).stdout
    assert not workers.strip(), f"orphaned worker(s): {workers}"


# -- edgekit bench ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relu_onnx(tmp_path_factory) -> Path:
    """A one-op ONNX model (real ONNX Runtime loads it): x float32 [1, 4] -> Relu."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path_factory.mktemp("bench") / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("arrays, message", [
    (None, "file not found"),
    ("garbage", "not a readable .npz file"),
    ({"labels": np.zeros(3, np.int64)}, "holds no input arrays"),
    ({"x": np.zeros((0, 4), np.float32)}, "have no samples on axis 0"),
    ({"z": np.zeros((3, 4), np.float32)}, "no array for input(s) x of"),
    ({"x": np.zeros((3, 5), np.float32)}, "cannot run on its sample 0"),
    ({"x": np.zeros((3, 4), np.int64)}, "cannot run on its sample 0"),
])
def test_bench_with_bad_data_is_exit_2_naming_the_file(relu_onnx, tmp_path, capsys, arrays, message):
    data = tmp_path / "d.npz"
    if isinstance(arrays, dict):
        np.savez(data, **arrays)
    elif arrays == "garbage":
        data.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["bench", str(relu_onnx), "--data", str(data), "--runs", "3"]) == 2
    err = capsys.readouterr().err
    assert f"--data {data}: " in err and message in err


def test_bench_runs_with_good_data(relu_onnx, tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    assert main(["bench", str(relu_onnx), "--data", str(tmp_path / "d.npz"), "--runs", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_ms"]["n"] == 3


@pytest.mark.parametrize("flag, value, message", [("--runs", "0", "0 is below 1"), ("--warmup", "-1", "-1 is below 0"),
                                                  ("--runs", "many", "'many' is not a whole number")])
def test_bench_counts_are_checked_by_the_parser(relu_onnx, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", str(relu_onnx), flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err


# -- the cache is checked, never trusted blindly ---------------------------------------------------------------

def _cache(tmp_path):
    from edgekit.orchestrate.cache import Cache

    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    return Cache(tmp_path)


def _build_once(cache, out: Path, calls: list):
    def run():
        calls.append(1)
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_int8.onnx").write_bytes(b"int8" * 100)
        (out / "model_fp32.onnx").write_bytes(b"fp32" * 400)
        return {"optimized": str(out / "model_int8.onnx")}
    return cache.build("k" * 64, out, run)


@pytest.mark.parametrize("tamper, why", [
    (lambda e: (e / "files/model_int8.onnx").write_bytes((e / "files/model_fp32.onnx").read_bytes()),
     "files/model_int8.onnx: sha256 differs"),
    (lambda e: (e / "files/model_int8.onnx").write_bytes(b"int8"), "files/model_int8.onnx: sha256 differs"),
    (lambda e: (e / "files/model_int8.onnx").unlink(), "missing or unexpected"),
    (lambda e: (e / "entry.json").write_text((e / "entry.json").read_text()[:40]), "entry.json unreadable"),
    (lambda e: (e / "entry.json").write_text((e / "entry.json").read_text().replace("model_int8", "model_fp32", 1)),
     "entry.json: sha256 differs"),
])
def test_a_damaged_cache_entry_is_discarded_with_a_warning_and_rebuilt(tmp_path, capsys, tamper, why):
    cache, calls = _cache(tmp_path / "cache"), []
    _build_once(cache, tmp_path / "out1", calls)
    assert _build_once(cache, tmp_path / "out2", calls)[1] is True and len(calls) == 1  # intact: a hit
    tamper(tmp_path / "cache/builds" / ("k" * 64))
    result, hit = _build_once(cache, tmp_path / "out3", calls)
    assert hit is False and len(calls) == 2  # rebuilt, not served
    err = capsys.readouterr().err
    assert "WARNING: cache entry" in err and "is damaged (" in err and why in err
    assert _build_once(cache, tmp_path / "out4", calls)[1] is True  # the rebuilt entry is intact again


def test_a_zeroed_cached_reference_is_not_served(tmp_path):
    cache = _cache(tmp_path / "cache")
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.array("r" * 64, lambda: ref)
    entry = tmp_path / "cache/reference" / ("r" * 64)
    np.save(entry / "array.npy", np.zeros_like(ref))
    got, hit = cache.array("r" * 64, lambda: ref)
    assert hit is False and (got == ref).all()


def test_edgekit_cache_info_verify_prune_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    cache, calls = _cache(tmp_path / "cache"), []
    _build_once(cache, tmp_path / "out", calls)
    cache.value("v" * 64, lambda: 42)
    assert main(["cache", "info"]) == 0
    assert "2 entries" in capsys.readouterr().out
    (tmp_path / "cache/builds" / ("k" * 64) / "files/model_int8.onnx").write_bytes(b"x")
    assert main(["cache", "verify"]) == 0
    out = capsys.readouterr().out
    assert "removed damaged entry" in out and "1 entries intact, 1 damaged removed" in out
    assert main(["cache", "prune"]) == 2 and "give --max-size" in capsys.readouterr().err
    assert main(["cache", "prune", "--max-size", "0"]) == 0 and "removed 1 oldest" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and "removed 0 entries" in capsys.readouterr().out


# -- more inputs that once gave a traceback ----------------------------------------------------------------------

def test_a_token_id_past_the_vocabulary_in_a_later_sample_is_named(write_recipe, workdir, capsys):
    arrays = load(workdir / "eval.npz")
    arrays["input_ids"][5, 3] = 10 ** 9
    np.savez(workdir / "eval.npz", **arrays)
    assert _run(write_recipe(), workdir / "out") == 2
    assert "evaluation sample 5: the fp32 PyTorch forward failed: IndexError" in capsys.readouterr().err


def test_a_baseline_with_a_zero_p50_is_bad_input(write_recipe, workdir, capsys):
    lat = {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "n": 10}
    art = {"artifact": "a.onnx", "files": ["a.onnx"], "size_bytes": 1, "precision": "int8", "latency_ms": lat}
    prev = {"schema": "edgekit.report/1", "edgekit_version": "x", "created": "x",
            "machine": {"cpu": "c", "arch": "x86_64"}, "model": {"name": "m", "source": "s", "params": 1},
            "eval": {"path": "e", "metric": "cosine", "n": 1, "fp32_torch": 1.0},
            "targets": [{"name": "ort-cpu", "backend": "onnxruntime", "device": "host", "status": "ok",
                         "optimized": art}]}
    (workdir / "prev.json").write_text(json.dumps(prev))
    assert main(["ci", str(write_recipe()), "--out", str(workdir / "out"), "--baseline", str(workdir / "prev.json")]) == 2
    assert "target ort-cpu optimized: latency p50 0.0 ms is not a positive number" in capsys.readouterr().err


def test_an_unwritable_junit_path_is_refused_before_the_run(write_recipe, workdir, capsys):
    (workdir / "afile").write_text("x")
    assert main(["ci", str(write_recipe()), "--out", str(workdir / "out"),
                 "--junit", str(workdir / "afile" / "j.xml")]) == 2
    assert f"--junit {workdir / 'afile' / 'j.xml'}: cannot create its folder" in capsys.readouterr().err
    assert not (workdir / "out").exists()


def test_a_full_disk_is_named_not_a_traceback(write_recipe, workdir, capsys, monkeypatch):
    import errno

    from edgekit.orchestrate import pipeline

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "out"))

    monkeypatch.setattr(pipeline, "prepare", full)
    assert _run(write_recipe(), workdir / "out") == 2
    assert f"no space left on the device holding {workdir / 'out'}" in capsys.readouterr().err


def test_an_npz_whose_header_claims_a_petabyte_is_bad_input(write_recipe, workdir, capsys):
    import io
    import zipfile

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 11, 3, 32, 32)})
    buf.write(b"\0" * 64)
    with zipfile.ZipFile(workdir / "calib.npz", "w") as z:
        z.writestr("image.npy", buf.getvalue())
    assert _run(write_recipe(), workdir / "out") == 2
    err = capsys.readouterr().err
    assert f"calibration data {workdir / 'calib.npz'}: not a readable .npz file (MemoryError" in err


def test_a_baseline_with_a_malformed_row_is_bad_input(write_recipe, workdir, capsys):
    prev = {"schema": "edgekit.report/1", "edgekit_version": "x", "created": "x",
            "machine": {"cpu": "c", "arch": "x86_64"}, "model": {"name": "m", "source": "s", "params": 1},
            "eval": {"path": "e", "metric": "cosine", "n": 1, "fp32_torch": 1.0},
            "targets": [{"name": "ort-cpu", "status": "ok", "backend": "onnxruntime", "device": "host",
                         "optimized": "not an artifact"}]}
    (workdir / "prev.json").write_text(json.dumps(prev))
    assert main(["ci", str(write_recipe()), "--out", str(workdir / "out"), "--baseline", str(workdir / "prev.json")]) == 2
    assert f"baseline {workdir / 'prev.json'}: not a valid edgekit.report/1 report: targets.0.optimized" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_whatever_sits_at_the_old_staging_name_is_neither_followed_nor_touched(write_recipe, workdir):
    (workdir / "elsewhere").mkdir()
    (workdir / "out.partial").symlink_to(workdir / "elsewhere")
    (workdir / "run2.partial").write_text("a regular file")
    assert _run(write_recipe(), workdir / "out") == 0 and _run(write_recipe(), workdir / "run2") == 0
    assert (workdir / "out").is_dir() and not (workdir / "out").is_symlink()
    assert not any((workdir / "elsewhere").iterdir()) and (workdir / "run2.partial").read_text() == "a regular file"
