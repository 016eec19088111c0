"""Where latency is measured. ``host`` is this machine. ``ssh:[user@]host`` is a Linux board timed
over ssh (``edgekit.measure.remote``). ``adb:SERIAL`` is an Android phone: edgekit checks that it is attached;
timing on it (Google's ``benchmark_model`` over adb) is not automated yet, so its latency is reported
as not measured, never replaced by a host number."""
from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Optional

from edgekit.measure.machine import host_device


def label(device: str) -> str:
    return host_device() if device == "host" else device


_ARCH = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


def _arch(name: str) -> str:
    return _ARCH.get(name.lower(), name.lower())


def unmeasurable_reason(device: str, arch: Optional[str] = None) -> Optional[str]:
    """None if latency can be measured on ``device`` from here, else the reason for the report.
    ``arch``: the CPU architecture the target's latency stands for (a profile's ``arch``)."""
    if device == "host":
        here = _arch(platform.machine())
        if arch and _arch(arch) != here:
            return (f"not measured: no {arch} device (this host is {here}; point the target at one with "
                    f"device = \"ssh:user@board\" in its profile or `--device ssh:user@board`)")
        return None
    kind, _, where = device.partition(":")
    if kind == "ssh":
        return None  # measured there; an unreachable host fails the target with ssh's reason
    if kind == "adb":
        adb = shutil.which("adb")
        if adb is None:
            return f"not measured: no device (adb is not installed; wanted {device})"
        try:
            state = subprocess.run([adb, "-s", where, "get-state"], capture_output=True, text=True,
                                   timeout=15).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            state = ""
        if state != "device":
            return f"not measured: no device (adb serial {where!r} is not attached)"
        return (f"not measured: {device} is attached, but edgekit does not run benchmark_model over adb yet; "
                f"see README 'Timing on a phone'")
    return f"not measured: unknown device kind {device!r} (expected host, ssh:HOST or adb:SERIAL)"
