"""ARM kernels without a board (edgekit.measure.arm): ort-arm and tflite-mobile artifacts run under qemu-user
on an emulated aarch64 core, compared with the host's outputs. Real qemu, real aarch64 Python and wheels
(edgekit.measure.aarch64); skipped, with the reason, on a machine without qemu-user-static."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit import api
from edgekit.backends import get_backend
from edgekit.backends.onnxruntime import OnnxRuntimeBackend
from edgekit.config.profiles import load_profile
from edgekit.errors import InputError
from edgekit.measure import aarch64, arm
from tests.test_remote_and_gpu_arm import recipe

needs_qemu = pytest.mark.skipif(aarch64.qemu_binary() is None,
                                reason="qemu-user-static is not installed (.ci/run installs it)")


def test_verify_device_must_be_host_or_qemu_cpu(tmp_path):
    prof = tmp_path / "board.toml"
    prof.write_text('name = "board"\nbackend = "onnxruntime"\n[verify]\ndevice = "ssh:pi@board"\n')
    with pytest.raises(InputError) as e:
        load_profile(str(prof))
    assert str(prof) in str(e.value) and "verify.device" in str(e.value) and "qemu:<cpu>" in str(e.value)


@needs_qemu
def test_an_unknown_qemu_cpu_is_the_profiles_error_before_anything_runs(tmp_path):
    prof = tmp_path / "board.toml"
    prof.write_text('name = "board"\nbackend = "onnxruntime"\n[verify]\ndevice = "qemu:cortex-z99"\n')
    with pytest.raises(InputError) as e:
        load_profile(str(prof))
    assert str(prof) in str(e.value) and "'cortex-z99'" in str(e.value) and "cortex-a72" in str(e.value)


def test_arm_targets_ask_for_the_emulated_check():
    assert load_profile("ort-arm").verify.device == "qemu:cortex-a72"
    assert load_profile("tflite-mobile").verify.device == "qemu:cortex-a76"
    assert load_profile("ort-cpu").verify.device == "host"


def test_compare_applies_the_stated_rule():
    ref = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, 0.3]])
    host = ref + np.array([[0.1, -0.1, 0.1], [-0.1, 0.1, -0.1]])  # the artifact's own error: rms 0.1
    small = arm.compare(host + 0.04, host, ref)    # rms 0.4 of it: rounding
    big = arm.compare(host + 0.06, host, ref)      # rms 0.6 of it, 3 % of the range: fails
    fp32 = arm.compare(ref + 1e-7, ref + 1e-9, ref)  # float round-off: never fails, whatever the ratio
    assert small["within_tolerance"] and not big["within_tolerance"] and fp32["within_tolerance"]
    assert small["noise_ratio"] == pytest.approx(0.4) and small["relative_diff"] == pytest.approx(0.04 / 2.1, abs=1e-5)
    assert small["top1_agreement"] == 1.0


@pytest.mark.slow
def test_without_qemu_the_check_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(aarch64, "qemu_binary", lambda: None)
    doc = api.run(recipe(tmp_path, ["ort-arm"]), out=tmp_path / "run")
    t = doc.targets[0]
    assert t.status == "ok", t.reason
    for a in (t.fp32, t.optimized):
        assert a.arm.status == "skipped" and "qemu-aarch64-static is not installed" in a.arm.reason
        assert a.verified_on.startswith("host-")
    assert "aarch64 check (qemu:cortex-a72) skipped: qemu-aarch64-static is not installed" in \
        (tmp_path / "run" / "report.md").read_text()


def _planted_runner(folder: Path) -> Path:
    """ONNX Runtime's runner with an ARM-only fault: on aarch64 the first output of every sample is shifted
    by half its range. On x86 it is the real runner, byte for byte in what it computes."""
    src = OnnxRuntimeBackend.remote_runner(None).read_text()
    anchor = '        np.save(job["outputs"], np.stack(outs))\n'
    assert src.count(anchor) == 1
    fault = ('        if platform.machine() == "aarch64":  # planted: an ARM-only wrong result\n'
             '            outs = [o + 0.5 * float(np.abs(o).max()) for o in outs]\n')
    planted = folder / "planted_runner.py"
    planted.write_text(src.replace(anchor, fault + anchor))
    return planted


@pytest.mark.slow
@needs_qemu
def test_an_arm_only_fault_fails_the_target_and_the_same_graph_on_x86_does_not(tmp_path, monkeypatch):
    planted = _planted_runner(tmp_path)
    monkeypatch.setattr(OnnxRuntimeBackend, "remote_runner", lambda self: planted)
    doc = api.run(recipe(tmp_path, ["ort-arm"]), out=tmp_path / "run")
    t = doc.targets[0]
    assert t.status == "failed"
    assert "on aarch64 (qemu cortex-a72)" in t.reason and "ARM and x86 disagree" in t.reason, t.reason
    assert t.fp32.arm.status == "failed" and t.fp32.arm.relative_diff > 0.4 and t.fp32.arm.noise_ratio > 1

    # The same runner and graph on x86: agrees with the host's outputs, so the check read ARM's.
    art = tmp_path / "run" / t.fp32.artifact
    backend = get_backend("onnxruntime")
    _, _, runtime = backend.options(load_profile("ort-arm"))
    from edgekit.config.recipe import load_recipe
    from edgekit.inputs.data import load_evaluation

    samples = list(load_evaluation(load_recipe(tmp_path / "edgekit.toml")))[:4]
    host = np.stack([backend.load(art, runtime).run(s)[0].reshape(-1) for s in samples])
    work = tmp_path / "x86"
    work.mkdir()
    shutil.copy2(art, work / art.name)
    shutil.copy2(planted, work / "remote_runner.py")
    np.savez(work / "samples.npz", **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    (work / "job.json").write_text(json.dumps({"artifact": art.name, **backend.remote_settings(runtime),
                                               "verify": "samples.npz", "outputs": "outputs.npy", "budget_s": 60}))
    r = subprocess.run([sys.executable, "remote_runner.py", "job.json"], cwd=work, capture_output=True, text=True)
    assert json.loads(r.stdout.splitlines()[-1])["ok"], r.stdout + r.stderr
    assert arm.compare(np.load(work / "outputs.npy"), host, host)["max_abs_diff"] == 0.0
