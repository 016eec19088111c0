"""The emulated aarch64 Python (edgekit.measure.aarch64): its preconditions, cpu validation, and a real run."""
from __future__ import annotations

from importlib.metadata import version

import pytest

from edgekit.errors import InputError, TargetError
from edgekit.measure import aarch64


def test_availability_names_the_missing_qemu(monkeypatch):
    monkeypatch.setattr(aarch64.shutil, "which", lambda name, *a, **k: None)
    assert aarch64.qemu_binary() is None
    ok, why = aarch64.availability()
    assert not ok
    assert "qemu-aarch64-static is not installed" in why and "apt-get install qemu-user-static" in why
    with pytest.raises(TargetError, match="qemu-user-static"):
        aarch64.prepare()


def test_python_argv_rejects_an_unknown_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(aarch64, "qemu_binary", lambda: "/usr/bin/qemu-aarch64-static")
    monkeypatch.setattr(aarch64, "_qemu_info", lambda qemu: ("7.2.22", ("cortex-a53", "cortex-a72", "max")))
    for bad in ("cortex-z99", "cortex-z99,sve=off", "max;reboot"):
        with pytest.raises(InputError) as e:
            aarch64.python_argv(tmp_path, bad)
        assert repr(bad) in str(e.value) and "cortex-a53, cortex-a72, max" in str(e.value)
    with pytest.raises(TargetError, match="not a prepared aarch64 sysroot"):  # a valid cpu gets past the check
        aarch64.python_argv(tmp_path, "max,sme=off")


@pytest.mark.slow
@pytest.mark.skipif(aarch64.qemu_binary() is None,
                    reason="qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
def test_smoke_under_qemu():
    """Cold: ~61 MB of .deb and wheels, then ~10 s of emulation (the session's private cache is empty)."""
    ok, why = aarch64.availability()
    if not ok:
        pytest.skip(why)
    lines: list[str] = []
    try:
        root = aarch64.prepare(progress=lines.append)
    except TargetError as e:
        if "unreachable" in str(e):
            pytest.skip(f"no network to download the sysroot: {e}")
        raise
    assert (root / aarch64.MANIFEST).is_file()  # built now (progress lines) or earlier in this session's cache
    assert not lines or lines[-1].startswith("aarch64: sysroot ready")
    assert aarch64.prepare() == root  # warm: the same folder, nothing rebuilt
    info = aarch64.smoke(root, "neoverse-n1")
    assert info["machine"] == "aarch64" and info["python"].startswith("3.11")
    assert info["onnxruntime"] == version("onnxruntime") and info["numpy"] == version("numpy")
    assert info["ai_edge_litert"] == version("ai-edge-litert")
    assert "asimddp" in info["features"]  # the per-cpu /proc/cpuinfo: neoverse-n1 has dot product
    assert "asimddp" not in aarch64.smoke(root, "cortex-a72")["features"]
