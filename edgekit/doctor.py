"""``edgekit doctor``: which toolchains are importable here, their versions, execution providers and devices.
What to check comes from the backend registry (``edgekit.backends.REGISTRY``); no toolchain is named here."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile

from edgekit.backends import REGISTRY, get_backend
from edgekit.measure.machine import machine

TORCH = ("torch", "torch", "model loading, torch.export, ONNX export", "pip install torch==2.13.0")
EXTRAS = (("matplotlib", "matplotlib", "report.html plots", "pip install -e '.[report]'"),
          ("torch_pruning", "torch-pruning", "structured pruning ([prune] in a recipe)", "pip install -e '.[prune]'"),
          ("ray", "ray", "jobs on a cluster (edgekit run --cluster)", "pip install -e '.[cluster]'"))


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _status(mod: str, dist: str, install: str, deep: bool) -> tuple[str, bool]:
    """Installed (distribution metadata and the module's spec found) and, with ``deep``, importable:
    the import runs with native stderr (absl, oneDNN banners) captured and shown only when it fails."""
    ver = _version(dist)
    if ver is None or importlib.util.find_spec(mod) is None:
        return f"missing: {install}", False
    if not deep:
        return f"ok {ver}", True
    with _captured_stderr() as err:
        try:
            importlib.import_module(mod)
            return f"ok {ver} (imports)", True
        except Exception as e:  # noqa: BLE001 - a broken install is exactly what doctor is for
            tail = " | ".join(err.read().strip().splitlines()[-2:])
            return f"BROKEN {ver}: {type(e).__name__}: {e}" + (f" [{tail}]" if tail else ""), False


@contextlib.contextmanager
def _captured_stderr():
    """File descriptor 2 into a temporary file (native libraries write there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield tmp
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)


def report(deep: bool = False) -> str:
    m = machine()
    lines = [f"machine: {m['cpu']} ({m['arch']}, {m['cores']} cores, ISA: {', '.join(m['isa']) or '?'})",
             f"os: {m['os']}, python {m['python']}", "",
             "toolchains" + (" (each imported):" if deep else " (installed; `edgekit doctor --deep` imports each, ~10 s):")]
    fixes = []

    def row(mod, dist, what, install) -> bool:
        status, ok = _status(mod, dist, install, deep)
        lines.append(f"  {dist:16} {status:40} {what}")
        if not ok:
            fixes.append(f"  {dist}: {install}")
        return ok

    row(*TORCH)
    seen, usable = set(), []
    for info in REGISTRY.values():
        ok_all = True
        for mod, dist, what in info.imports:
            if dist in seen:
                continue
            seen.add(dist)
            ok_all &= row(mod, dist, what, info.install_hint)
        if ok_all:
            usable.append(info.name)
    lines.append("extras:")
    for extra in EXTRAS:
        row(*extra)
    lines.append("")
    for name in usable:
        with _captured_stderr():
            try:
                more = get_backend(name).doctor_lines()
            except Exception as e:  # noqa: BLE001
                more = [f"{name}: cannot list devices: {type(e).__name__}: {e}"]
        lines += more
    from edgekit.config.profiles import available, load_profile
    from edgekit.measure import aarch64

    ok, why = aarch64.availability()
    arm_targets = [n for n in available() if _verify_device(load_profile, n).startswith("qemu:")]
    lines += ["", f"aarch64 check (targets with [verify] device = \"qemu:<cpu>\": {', '.join(arm_targets) or 'none'}): "
              + ("available: " if ok else "not available, those targets are verified on this host only: ") + why]
    if not ok and "qemu" in why:
        fixes.append("  aarch64 check: apt-get install qemu-user-static")
    lines += ["", f"target profiles: {', '.join(available()) or 'none found'}"]
    if fixes:
        lines += ["", "to fix (from the edgekit checkout):", *fixes]
    return "\n".join(lines)


def _verify_device(load_profile, name: str) -> str:
    try:
        return load_profile(name).verify.device
    except Exception:  # noqa: BLE001 - a broken profile is reported when it is used
        return "host"
