"""``edgekit doctor``: which toolchains are importable here, their versions, execution providers and devices.
What to check comes from the backend registry (``edgekit.backends.REGISTRY``); no toolchain is named here."""
from __future__ import annotations

import importlib
import importlib.metadata

from edgekit.backends import REGISTRY, get_backend
from edgekit.measure.machine import machine

TORCH = ("torch", "torch", "model loading, torch.export, ONNX export", "pip install torch==2.13.0")


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _status(mod: str, dist: str, install: str) -> tuple[str, bool]:
    ver = _version(dist)
    if ver is None:
        return f"missing: {install}", False
    try:
        importlib.import_module(mod)
        return f"ok {ver}", True
    except Exception as e:  # noqa: BLE001 - a broken install is exactly what doctor is for
        return f"BROKEN {ver}: {type(e).__name__}: {e}", False


def report() -> str:
    m = machine()
    lines = [f"machine: {m['cpu']} ({m['arch']}, {m['cores']} cores, ISA: {', '.join(m['isa']) or '?'})",
             f"os: {m['os']}, python {m['python']}", "", "toolchains:"]
    status, _ = _status(*TORCH[:2], TORCH[3])
    lines.append(f"  {TORCH[1]:16} {status:40} {TORCH[2]}")
    seen, usable = set(), []
    for info in REGISTRY.values():
        ok_all = True
        for mod, dist, what in info.imports:
            status, ok = _status(mod, dist, info.install_hint)
            ok_all &= ok
            if dist not in seen:
                seen.add(dist)
                lines.append(f"  {dist:16} {status:40} {what}")
        if ok_all:
            usable.append(info.name)
    lines.append("")
    for name in usable:
        try:
            lines += get_backend(name).doctor_lines()
        except Exception as e:  # noqa: BLE001
            lines.append(f"{name}: cannot list devices: {type(e).__name__}: {e}")
    from edgekit.config.profiles import available

    lines += ["", f"target profiles: {', '.join(available()) or 'none found'}"]
    return "\n".join(lines)
