"""ort-arm / ort-gpu on this host (built and verified, latency honestly not measured) and timing on a
Linux board over ssh, against a real OpenSSH server on 127.0.0.1 (tests/sshd.py)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.cli import main
from edgekit.measure import aarch64
from tests import sshd
from tests.conftest import DATA, EXAMPLE, ROOT, recipe_text

CAPS = "max_calibration_samples = 16\nmax_evaluation_samples = 24"


def recipe(folder: Path, targets: list[str]) -> Path:
    p = folder / "edgekit.toml"
    p.write_text(recipe_text(f"{EXAMPLE}/model.py:build", f"{DATA}/calib.npz", f"{DATA}/eval.npz",
                             extra=CAPS, targets=json.dumps(targets)))
    return p


def edgekit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env)


@pytest.mark.slow
def test_arm_and_gpu_targets_build_and_verify_here_without_faking_latency(tmp_path):
    out = tmp_path / "run"
    p = edgekit("run", recipe(tmp_path, ["ort-arm", "ort-gpu"]), "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "report.json").read_text())
    arm, gpu = doc["targets"]
    for t in (arm, gpu):
        assert t["status"] == "ok", t["reason"]
        sides = [t["fp32"], t["optimized"], *(t.get("extras") or {}).values()]
        for a in sides:
            assert a["latency_ms"] is None and a["measured_on"] is None  # never host numbers in their place
            host = f"host-{platform.machine()} (CPUExecutionProvider)"
            if t is arm and aarch64.qemu_binary():  # ARM kernels too, on an emulated Cortex-A72 (edgekit.measure.arm)
                assert a["verified_on"].startswith("aarch64 (qemu cortex-a72) on ") and a["verified_on"].endswith(
                    f"; {host} on all"), a["verified_on"]
                c = a["arm"]
                assert c["status"] == "ok" and 1 <= c["samples"] <= c["of"] == 24 and c["runtime"].startswith("onnxruntime")
                assert (c["noise_ratio"] <= c["tolerance"] or c["relative_diff"] <= c["floor"]) and \
                    abs(c["metric"] - c["host_metric"]) < 0.01
            else:
                assert a["verified_on"] == host
            assert a["fidelity"]["cosine"] > 0.97
        assert t["speedup_p50"] is None
    assert arm["fp32"]["latency_reason"].startswith("not measured: no aarch64 device")
    assert arm["optimized"]["details"]["activation_type"] == "qint8" and not arm["optimized"]["details"]["reduce_range"]
    assert gpu["optimized"]["latency_reason"].startswith("not measured: no CUDA execution provider")
    d = gpu["optimized"]["details"]
    assert (d["activation_type"], d["weight_type"], d["symmetric_activations"], d["symmetric_weights"]) == \
        ("qint8", "qint8", True, True)
    fp16 = gpu["extras"]["fp16"]
    assert fp16["precision"].startswith("fp16") and fp16["fidelity"]["cosine"] > 0.999
    assert gpu["optimized"]["size_bytes"] < fp16["size_bytes"] < gpu["fp32"]["size_bytes"]
    md = (out / "report.md").read_text()
    assert "no CUDA execution provider" in md and "**fp16**" in md and "verified on host-" in md


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv, proc = sshd.start(tmp_path_factory.mktemp("sshd"))
    yield srv
    proc.terminate()  # `timeout` passes SIGTERM on to sshd
    proc.wait(timeout=20)


def board(folder: Path, name: str, device: str, python: str) -> Path:
    """A user's board profile: the ort-arm recipe, timed over ssh with the given remote interpreter."""
    text = (ROOT / "targets/ort-arm.toml").read_text()
    text = text.replace('name = "ort-arm"', f'name = "{name}"').replace('device = "host"', f'device = "{device}"')
    text = text.replace('arch = "aarch64"', f'arch = "{platform.machine()}"')  # the loopback "board" is this host
    text = text.replace('remote_python = "python3"', f"remote_python = {json.dumps(python)}")
    text = text.replace("runs = 200", "runs = 30")
    p = folder / f"{name}.toml"
    p.write_text(text)
    return p


@pytest.mark.slow
def test_ssh_board_is_timed_remotely_and_bad_boards_fail_alone(server, tmp_path):
    # A remote Python that has numpy but no onnxruntime: numpy alone on its path, site-packages off.
    site = tmp_path / "numpy_only"
    site.mkdir()
    (site / "numpy").symlink_to(Path(np.__file__).parent)
    no_ort = f"env PYTHONPATH={site} {sys.executable} -S"
    good = board(tmp_path, "board", f"ssh:{server.alias}", sys.executable)
    bare = board(tmp_path, "bare-board", f"ssh:{server.alias}", no_ort)
    down = board(tmp_path, "down-board", f"ssh:127.0.0.1:{sshd.free_port()}", sys.executable)
    out = tmp_path / "run"
    env = {**__import__("os").environ, "EDGEKIT_SSH_CONFIG": str(server.config)}
    p = edgekit("run", recipe(tmp_path, [str(good), str(bare), str(down)]), "--out", out, env=env)
    assert p.returncode == 3, p.stderr[-3000:]  # a target failed; the run still finished
    doc = json.loads((out / "report.json").read_text())
    ok, no_runtime, unreachable = doc["targets"]

    assert ok["status"] == "ok", ok["reason"]
    assert ok["device"] == f"ssh:{server.alias}"
    for side in ("fp32", "optimized"):
        a = ok[side]
        assert a["latency_ms"]["n"] == 30 and a["latency_ms"]["p50"] > 0
        assert a["measured_on"] == f"ssh:{server.alias} (CPUExecutionProvider)"
        assert "host-" in a["verified_on"]  # (and on an emulated Cortex-A72 first, where qemu is installed)
    assert ok["device_info"]["arch"] == platform.machine() and ok["device_info"]["cpu"]
    assert ok["speedup_p50"] > 0
    assert ok["timing"]["method"] == f"interleaved rounds in one process on ssh:{server.alias}"
    assert ok["speedup_ci"][0] <= ok["speedup_p50"] <= ok["speedup_ci"][1]

    assert no_runtime["status"] == "failed"
    assert "cannot import onnxruntime" in no_runtime["reason"] and f"ssh:{server.alias}" in no_runtime["reason"]
    assert unreachable["status"] == "failed"
    assert "cannot reach the host over ssh" in unreachable["reason"] and "Connection refused" in unreachable["reason"]
    assert "target failed: bare-board" in p.stdout and "target failed: down-board" in p.stdout
    assert f"ssh:{server.alias}" in (out / "report.md").read_text()

    # `edgekit bench` times one artifact on the board too
    b = edgekit("bench", out / "artifacts/board/model_int8.onnx", "--device", f"ssh:{server.alias}",
                "--remote-python", sys.executable, "--data", DATA / "eval.npz", "--runs", "20", "--json", env=env)
    assert b.returncode == 0, b.stderr[-2000:]
    stats = json.loads(b.stdout)
    assert stats["device"] == f"ssh:{server.alias}" and stats["latency_ms"]["n"] == 20
    assert stats["machine"]["arch"] == platform.machine()


def test_device_option_is_checked_before_anything_runs(write_recipe, workdir, capsys):
    out = workdir / "out"
    assert main(["run", str(write_recipe()), "--out", str(out), "--device", "board.local"]) == 2
    assert "--device: device 'board.local': expected host, ssh:[user@]host[:port]" in capsys.readouterr().err
    assert not out.exists()


def test_ssh_device_for_a_backend_the_remote_runner_cannot_run(write_recipe, workdir, capsys):
    p = write_recipe(targets='["tflite-mobile"]')
    assert main(["run", str(p), "--out", str(workdir / "out"), "--device", "ssh:pi@board"]) == 2
    assert "ssh devices run onnxruntime artifacts; backend 'litert'" in capsys.readouterr().err
