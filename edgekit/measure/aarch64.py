"""An emulated aarch64 Python (numpy, onnxruntime, ai-edge-litert) under qemu-user, to run ARM kernels here.

What it is: a *sysroot* folder holding Debian bookworm's real arm64 CPython 3.11 and the few shared
libraries it and the wheels load (``DEBS``), plus PyPI's aarch64 manylinux wheels of numpy, onnxruntime
and ai-edge-litert unpacked into its ``usr/lib/python3/dist-packages`` (the Debian interpreter's own
site dir, so no ``PYTHONPATH`` is needed). ``qemu-aarch64-static -L <prefix> -cpu <cpu>`` runs it
(``apt-get install qemu-user-static``; no binfmt registration, no ``dpkg --add-architecture``).

How it is built (``prepare``), without touching the host's apt/dpkg state: ``apt-get update`` and
``apt-get download`` through a private ``APT_CONFIG`` (its own sources list with ``[arch=arm64]``,
state, cache and empty ``apt.conf.d``, so no host hook runs) in a temporary folder; ``dpkg -x`` of each
.deb into the new sysroot; ``pip download --platform manylinux_2_XX_aarch64 ... --only-binary=:all:
--no-deps`` of the wheels, unzipped with ``zipfile``. The wheels are pinned to the versions installed
in the running Python (so x86 and arm runs compare the same release), else to ``DEFAULT_WHEELS``.
numpy >= 2.3 ships only ``manylinux_2_27/2_28`` aarch64 wheels, so every tag up to bookworm's glibc
2.36 is offered, not just ``manylinux2014``. Neither ``import onnxruntime`` + ``InferenceSession.run``
nor ``Interpreter(...).invoke()`` needs the wheels' declared dependencies (flatbuffers, packaging,
protobuf, sympy, ml_dtypes, tqdm, ...: measured with those imports blocked), so they are left out.
The .deb versions are whatever bookworm(-updates, -security) holds when first downloaded (Debian keeps
only the newest in its pool, so exact pins would rot); they are recorded with their sha256 in the
sysroot's ``edgekit-aarch64.json``. The cache key hashes the package *names*, the suite and the wheel
versions. Downloads are kept in ``<cache>/aarch64/downloads`` (a rebuild re-downloads nothing and needs
no network while every package has a file there). The sysroot is built in ``<cache>/aarch64/tmp-*``,
checked by running Python under qemu (which also fills its ``__pycache__``), then renamed into
``<cache>/aarch64/<key>`` (atomic on one file system); a ``flock`` makes a concurrent second caller
wait and then reuse it. Absolute symlinks in the .debs are made relative, and an empty
``etc/ld.so.cache`` stops the guest's ld.so from reading the host's (x86) cache.

The /proc/cpuinfo trap: qemu 7.2 (bookworm) fakes ``/proc/cpuinfo`` only for a few guest
architectures, not aarch64, so the guest reads the host's x86 file; onnxruntime's cpuinfo library finds
no ARM core in it (no ``CPU implementer``/``CPU part`` lines) and ``import onnxruntime`` dies with
SIGSEGV. The fix uses qemu's own prefix redirection: in linux-user every absolute path the guest opens
is first looked up as ``<prefix>/<path>`` (``-L`` / ``QEMU_LD_PREFIX``), ``/proc`` included (only
``/proc/self/{maps,exe,auxv,cmdline,stat}`` are intercepted before that). So a ``proc/cpuinfo`` in the
prefix is what the guest reads. A file with ``processor`` lines only still crashes; one with the
aarch64 fields works. Since the file should describe the emulated core, each cpu gets its own small
prefix ``cpus/qemu-<version>/<cpu>/`` (symlinks to the sysroot's ``etc``, ``lib``, ``usr`` plus its own
``proc/cpuinfo``), whose MIDR fields and ``Features`` line come from probing that cpu under qemu once
(``MRS MIDR_EL1`` and ``getauxval(AT_HWCAP/AT_HWCAP2)``): onnxruntime's and XNNPACK's kernel choice
follows HWCAP (e.g. dotprod on neoverse-n1, SVE/i8mm on max) and MIDR (e.g. Cortex-A53 "narrow load"
GEMM kernels). qemu 8.1+ fakes an aarch64 /proc/cpuinfo itself (ahead of the prefix lookup); the
file is then simply unused.

Which cpu: cortex-a53/a72 (NEON only), cortex-a76/neoverse-n1 (+ dotprod, fp16) are fast enough
(kernels ~25-400x slower than native x86, plus ~4 s to start Python and import). a64fx (SVE-512) is
~10x slower again. Do not trust ``max`` on qemu 7.2: with it (SVE2, SME, i8mm, ...) XNNPACK's int8
output of a real model was off by up to 119 LSB while every named core and ``max,sme=off`` matched
x86 exactly; qemu's first SME emulation or an SME kernel is wrong. A cpu may carry qemu properties
(``max,sme=off``, ``max,sve=off``).

Use::

    root = prepare()
    argv, env = python_argv(root, "cortex-a72")
    subprocess.run(argv + ["script.py"], env=env)

``python -m edgekit.measure.aarch64 prepare|smoke [cpu]`` does the same from a shell (e.g. to prepare
the sysroot on a machine with network access and copy ``<cache>/aarch64/<key>`` here).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Optional

from edgekit.errors import InputError, TargetError
from edgekit.report.manifest import sha256

SUITE = "bookworm"
PYTHON = "3.11"
MIRRORS = (("http://deb.debian.org/debian", ("bookworm", "bookworm-updates")),
           ("http://deb.debian.org/debian-security", ("bookworm-security",)))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
        "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8",
        "libssl3", "libbz2-1.0", "liblzma5")
"""python3.11 links libz and libexpat; the wheels' .so files need libc6/libgcc-s1/libstdc++6; ctypes
(used by onnxruntime and ai_edge_litert) needs libffi8. libssl3, libbz2-1.0 and liblzma5 (2 MB) keep
hashlib/ssl/bz2/lzma working; sqlite3, readline, curses, dbm, nis, crypt and uuid's C helper are left out."""
DEFAULT_WHEELS = {"numpy": "2.4.6", "onnxruntime": "1.32.0", "ai-edge-litert": "2.3.0"}
LAYOUT = 1
"""Bumped when the sysroot's layout changes, so that an old one is not reused."""
MANIFEST = "edgekit-aarch64.json"
QEMU_NAMES = ("qemu-aarch64-static", "qemu-aarch64")
_GLIBC_MAX = 36  # bookworm's glibc 2.36: the newest manylinux tag its Python accepts
_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
          "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
           "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 "
           "smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 sme2p1 smei16i32 "
           "smebi32i32 smeb16b16 smef16f16 mops hbc").split()  # Linux arch/arm64/kernel/cpuinfo.c order
_PROBE = """
import ctypes, mmap, struct
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
libc.getauxval.argtypes = [ctypes.c_ulong]
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(struct.pack("<II", 0xd5380000, 0xd65f03c0))  # mrs x0, midr_el1; ret
midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
print(midr, libc.getauxval(16), libc.getauxval(26))
"""
_SMOKE = """
import json, platform, sys
import numpy, onnxruntime, ai_edge_litert
from ai_edge_litert.interpreter import Interpreter
from importlib.metadata import version
feats = [l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("Features")]
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
                  "ai_edge_litert": version("ai-edge-litert"),
                  "providers": onnxruntime.get_available_providers(),
                  "features": feats[0] if feats else []}))
"""


def qemu_binary() -> str | None:
    """Path of ``qemu-aarch64-static`` (or a dynamic ``qemu-aarch64``) on PATH, None when absent."""
    for name in QEMU_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _qemu_info(qemu: str) -> tuple[str, tuple[str, ...]]:
    """(version, cpu names) of a qemu binary."""
    ver = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\S+)", ver)
    out = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=30).stdout
    cpus = tuple(line.strip() for line in out.splitlines()[1:] if line.strip() and " " not in line.strip())
    return (m.group(1) if m else "unknown"), cpus


def cpus() -> list[str]:
    """The ``-cpu`` names the installed qemu knows (qemu 7.2: a64fx, cortex-a35/a53/a57/a72/a76, max,
    neoverse-n1); empty without qemu."""
    qemu = qemu_binary()
    return list(_qemu_info(qemu)[1]) if qemu else []


def default_cache_root() -> Path:
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit").expanduser()


def wheel_pins() -> dict[str, str]:
    """Wheel versions: the ones installed in this Python (same release on x86 and arm), else the defaults."""
    from importlib.metadata import PackageNotFoundError, version

    pins = {}
    for name, default in DEFAULT_WHEELS.items():
        try:
            pins[name] = version(name)
        except PackageNotFoundError:
            pins[name] = default
    return pins


def sysroot_key(wheels: Optional[dict[str, str]] = None) -> str:
    spec = {"layout": LAYOUT, "suite": SUITE, "python": PYTHON, "debs": sorted(DEBS),
            "wheels": wheels or wheel_pins()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def sysroot_path(cache_root: Optional[Path] = None) -> Path:
    """Where ``prepare`` puts (or has put) the sysroot for the current pins."""
    return Path(cache_root or default_cache_root()) / "aarch64" / sysroot_key()


def availability(cache_root: Path | None = None) -> tuple[bool, str]:
    """Whether emulated aarch64 runs can happen here and, if not, why. Cheap: no download, no emulation."""
    if sys.platform != "linux":
        return False, f"qemu-user emulation needs Linux (this is {sys.platform})"
    qemu = qemu_binary()
    if qemu is None:
        return False, "qemu-aarch64-static is not installed (apt-get install qemu-user-static)"
    root = sysroot_path(cache_root)
    if (root / MANIFEST).is_file():
        return True, f"{qemu}; aarch64 sysroot ready in {root}"
    missing = [t for t in ("apt-get", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        return False, (f"the aarch64 sysroot is not prepared ({root}) and {' and '.join(missing)} "
                       "(Debian/Ubuntu tools) are missing here to build it: prepare it on a Debian-like "
                       "machine (python -m edgekit.measure.aarch64 prepare) and copy it there")
    if not Path(KEYRING).is_file():
        return False, f"{KEYRING} is missing (apt-get install debian-archive-keyring)"
    return True, (f"{qemu}; the aarch64 sysroot is downloaded on first use (~65 MB from deb.debian.org "
                  f"and PyPI) into {root}")


# --------------------------------------------------------------------------------------------- prepare

def prepare(cache_root: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """The sysroot folder, built once (see the module docstring); later calls return it at once.

    Raises TargetError when qemu is missing, a download fails (the message names the package) or the
    built interpreter does not start under qemu."""
    say = progress or (lambda line: None)
    qemu = qemu_binary()
    if qemu is None:
        raise TargetError("aarch64 emulation unavailable: qemu-aarch64-static is not installed "
                          "(apt-get install qemu-user-static)")
    pins = wheel_pins()
    base = Path(cache_root or default_cache_root()) / "aarch64"
    final = base / sysroot_key(pins)
    if (final / MANIFEST).is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{final.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("aarch64: another process is preparing the same sysroot; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():
            return final
        for stale in base.glob(f"tmp-{final.name}-*"):  # left by a build that crashed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no manifest: not ours, or damaged
            shutil.rmtree(final)
        if shutil.which("dpkg-deb") is None:
            raise TargetError(f"cannot build the aarch64 sysroot here: dpkg-deb is missing (a Debian/Ubuntu "
                              f"tool). {_elsewhere(base)}")
        tmp = base / f"tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            started = time.time()
            debs = _debs(base / "downloads" / "debs", say)
            wheels = _wheels(base / "downloads" / "wheels", pins, say)
            say(f"aarch64: unpacking {len(debs)} .deb and {len(wheels)} wheels into {tmp.name}")
            for deb in debs.values():
                _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}")
            _tidy(tmp)
            site = tmp / "usr" / "lib" / "python3" / "dist-packages"
            for whl in wheels.values():
                _unzip_wheel(whl, site)
            cpu = next((c for c in ("cortex-a72", "max") if c in _qemu_info(qemu)[1]), None)
            if cpu is None:
                raise TargetError(f"{qemu} knows none of the cpus cortex-a72, max: {_qemu_info(qemu)[1]}")
            say(f"aarch64: checking python{PYTHON} + numpy, onnxruntime, ai-edge-litert under qemu ({cpu})")
            info = smoke(tmp, cpu)
            manifest = {"layout": LAYOUT, "suite": SUITE, "qemu": _qemu_info(qemu)[0], "check": info,
                        "debs": {n: {"file": p.name, "sha256": sha256(p)} for n, p in debs.items()},
                        "wheels": {n: {"file": p.name, "sha256": sha256(p)} for n, p in wheels.items()},
                        "built_s": round(time.time() - started, 1)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file() and not f.is_symlink())
    say(f"aarch64: sysroot ready in {final} ({size / 1e6:.0f} MB)")
    return final


def _elsewhere(base: Path) -> str:
    return (f"To prepare it elsewhere: run `python -m edgekit.measure.aarch64 prepare` on a machine that "
            f"reaches deb.debian.org and PyPI, then copy its $EDGEKIT_CACHE/aarch64/ folder (the sysroot, or "
            f"only downloads/) to {base}/")


def _apt_config(d: Path) -> dict[str, str]:
    """A private apt: its own sources/state/cache, arm64 only, no host apt.conf.d (no hooks run)."""
    for sub in ("etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "state/lists/partial",
                "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "state" / "status").touch()
    (d / "etc" / "sources.list").write_text("".join(
        f"deb [arch=arm64 signed-by={KEYRING}] {uri} {suite} main\n" for uri, suites in MIRRORS for suite in suites))
    conf = d / "apt.conf"
    conf.write_text(f"""Dir::Etc "{d}/etc";
Dir::Etc::Parts "{d}/etc/apt.conf.d";
Dir::State "{d}/state";
Dir::State::status "{d}/state/status";
Dir::Cache "{d}/cache";
APT::Architecture "arm64";
APT::Architectures {{ "arm64"; }};
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::Retries "2";
""" + ('APT::Sandbox::User "root";\n' if os.geteuid() == 0 else ""))
    env = dict(os.environ, APT_CONFIG=str(conf), LC_ALL="C")
    return env


def _debs(store: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """One .deb per name in DEBS: the newest cached one when every name has one (no network), else the
    current bookworm versions, downloading those not cached."""
    store.mkdir(parents=True, exist_ok=True)
    cached = {n: sorted(store.glob(f"{n}_*_arm64.deb"), key=lambda p: p.stat().st_mtime) for n in DEBS}
    if all(cached.values()):
        say(f"aarch64: {len(DEBS)} .deb already downloaded ({store})")
        return {n: files[-1] for n, files in cached.items()}
    if shutil.which("apt-get") is None:
        raise TargetError(f"cannot download the arm64 Debian packages here: apt-get is missing. "
                          f"{_elsewhere(store.parent.parent)}")
    with tempfile.TemporaryDirectory(prefix="edgekit-apt-") as t:
        env = _apt_config(Path(t))
        say(f"aarch64: apt-get update (Debian {SUITE} arm64 index, private APT_CONFIG)")
        upd = subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=900)
        update_log = _tail(upd.stdout + upd.stderr)
        uris = subprocess.run(["apt-get", "download", "--print-uris", *DEBS], env=env, cwd=t,
                              capture_output=True, text=True, timeout=300)
        files = {}
        for line in uris.stdout.splitlines():
            m = re.match(r"'([^']+)' (\S+) (\d+) (\S+)", line)
            if m:
                files[m.group(2).split("_", 1)[0]] = m.group(2)
        for name in DEBS:
            if name not in files:
                raise TargetError(
                    f"could not download the arm64 Debian package {name}: it is not in the {SUITE} index, "
                    f"so deb.debian.org was probably unreachable (apt-get update: {update_log}; "
                    f"apt-get download: {_tail(uris.stderr)}). {_elsewhere(store.parent.parent)}")
        todo = [n for n in DEBS if not (store / files[n]).is_file()]
        if todo:
            say(f"aarch64: downloading {len(todo)} .deb: {' '.join(todo)}")
            dl = Path(t) / "dl"
            dl.mkdir()
            for name in todo:
                version = files[name].split("_")[1].replace("%3a", ":")
                r = subprocess.run(["apt-get", "download", f"{name}={version}"], env=env, cwd=dl,
                                   capture_output=True, text=True, timeout=900)
                got = dl / files[name]
                if r.returncode != 0 or not got.is_file():
                    raise TargetError(f"could not download the arm64 Debian package {name} {version}: "
                                      f"the network or deb.debian.org was unreachable "
                                      f"({_tail(r.stdout + r.stderr)}). {_elsewhere(store.parent.parent)}")
                os.replace(got, store / files[name])
        return {n: store / files[n] for n in DEBS}


def _wheels(store: Path, pins: dict[str, str], say: Callable[[str], None]) -> dict[str, Path]:
    store.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, version in pins.items():
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-cp311-cp311-"
        found = [p for p in store.glob(f"{stem}*.whl") if "aarch64" in p.name]
        if not found:
            say(f"aarch64: downloading wheel {name}=={version} (manylinux aarch64, CPython {PYTHON})")
            with tempfile.TemporaryDirectory(prefix="edgekit-whl-") as t:
                plats = [a for v in range(_GLIBC_MAX, 16, -1) for a in ("--platform", f"manylinux_2_{v}_aarch64")]
                plats += ["--platform", "manylinux2014_aarch64"]
                r = subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                                    "--no-deps", "--retries", "2", "--only-binary=:all:", *plats,
                                    "--python-version", PYTHON, "--implementation", "cp", "--abi", "cp311",
                                    "-d", t, f"{name}=={version}"], capture_output=True, text=True, timeout=1800)
                got = sorted(Path(t).glob("*.whl"))
                if r.returncode != 0 or not got:
                    raise TargetError(
                        f"could not download the aarch64 wheel {name}=={version}: PyPI was unreachable or has no "
                        f"manylinux aarch64 CPython {PYTHON} wheel of it (pip: {_tail(r.stdout + r.stderr)}). "
                        f"{_elsewhere(store.parent.parent)}")
                found = [store / got[0].name]
                os.replace(got[0], found[0])
        out[name] = found[0]
    return out


def _tidy(root: Path) -> None:
    """Docs out; absolute symlinks made relative (else the host kernel resolves them on the host);
    an empty ld.so.cache so the guest ld.so does not read the host's."""
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/gdb"):
        shutil.rmtree(root / sub, ignore_errors=True)
    for link in [p for p in root.rglob("*") if p.is_symlink()]:
        target = os.readlink(link)
        if target.startswith("/"):
            link.unlink()
            link.symlink_to(os.path.relpath(root / target.lstrip("/"), link.parent))
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "ld.so.cache").write_bytes(b"")


def _unzip_wheel(whl: Path, site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import
                name = "/".join(parts[2:])
            dest = site / name
            if not dest.resolve().is_relative_to(site.resolve()):
                raise TargetError(f"{whl.name}: member {info.filename} escapes the site folder")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, mode | 0o644 if mode else 0o644)


# ------------------------------------------------------------------------------------------------- run

def python_argv(sysroot: Path, cpu: str) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)``: append a script (or ``-c code``) and its arguments to argv and run it with env.

    argv is ``qemu-aarch64-static -L <cpu prefix> -cpu <cpu> <sysroot>/usr/bin/python3.11 -E -s``
    (``-E``/``-s``: the host's PYTHON* variables and user site, holding x86 packages, are ignored; the
    script's folder stays on sys.path). env is this process's minus the PYTHON*, LD_PRELOAD,
    LD_LIBRARY_PATH and QEMU_* variables that would mislead the guest. The first call for a cpu creates
    its prefix with a matching /proc/cpuinfo (about a second of emulation). InputError for a cpu qemu
    does not know, TargetError when qemu is missing or the sysroot is not prepared."""
    qemu = qemu_binary()
    if qemu is None:
        raise TargetError("qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
    version, known = _qemu_info(qemu)
    if cpu.split(",")[0] not in known or not re.fullmatch(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_-]+=[A-Za-z0-9_]+)*", cpu):
        raise InputError(f"unknown aarch64 cpu {cpu!r} for {Path(qemu).name} {version}: "
                         f"valid ones are {', '.join(known)} (optionally with qemu properties, e.g. max,sve=off)")
    sysroot = Path(sysroot).resolve()
    python = sysroot / "usr" / "bin" / f"python{PYTHON}"
    if not python.is_file():
        raise TargetError(f"{sysroot} is not a prepared aarch64 sysroot (no usr/bin/python{PYTHON})")
    prefix = _cpu_prefix(qemu, sysroot, cpu)
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("PYTHON", "QEMU_")) or k in ("LD_PRELOAD", "LD_LIBRARY_PATH"))}
    return [qemu, "-L", str(prefix), "-cpu", cpu, str(python), "-E", "-s"], env


def _cpu_prefix(qemu: str, sysroot: Path, cpu: str) -> Path:
    """``cpus/qemu-<version>/<cpu>/``: symlinks to the sysroot's top folders and this cpu's proc/cpuinfo."""
    version = _qemu_info(qemu)[0]
    prefix = sysroot / "cpus" / f"qemu-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}" / cpu.replace(",", "+")
    if (prefix / "proc" / "cpuinfo").is_file():
        return prefix
    r = subprocess.run([qemu, "-L", str(sysroot), "-cpu", cpu, str(sysroot / "usr" / "bin" / f"python{PYTHON}"),
                        "-E", "-s", "-S", "-c", _PROBE], capture_output=True, text=True, timeout=300)
    try:
        midr, hwcap, hwcap2 = (int(v) for v in r.stdout.split())
    except ValueError:
        raise TargetError(f"probing cpu {cpu} under qemu failed (rc {r.returncode}): "
                          f"{_tail(r.stdout + r.stderr)}") from None
    feats = [n for i, n in enumerate(_HWCAP) if hwcap >> i & 1] + \
            [n for i, n in enumerate(_HWCAP2) if hwcap2 >> i & 1]
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(feats)}\nCPU implementer\t: 0x{midr >> 24 & 0xff:02x}\n"
             f"CPU architecture: 8\nCPU variant\t: 0x{midr >> 20 & 0xf:x}\nCPU part\t: 0x{midr >> 4 & 0xfff:03x}\n"
             f"CPU revision\t: {midr & 0xf}\n\n")
    n = os.cpu_count() or 1
    tmp = prefix.parent / f".tmp-{prefix.name}-{uuid.uuid4().hex[:8]}"
    (tmp / "proc").mkdir(parents=True)
    try:
        (tmp / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n{block}" for i in range(n)))
        for top in sorted(sysroot.iterdir()):
            if top.is_dir() and top.name not in ("cpus", "proc"):
                (tmp / top.name).symlink_to(os.path.relpath(top, tmp))
        try:
            os.rename(tmp, prefix)
        except OSError:  # another process made it first
            if not (prefix / "proc" / "cpuinfo").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prefix


def smoke(sysroot: Path, cpu: str) -> dict:
    """Imports numpy, onnxruntime and ai_edge_litert's Interpreter under qemu on ``cpu``; returns
    ``{"machine": "aarch64", "python", "numpy", "onnxruntime", "ai_edge_litert", "providers",
    "features"}`` (features: the emulated core's /proc/cpuinfo flags). TargetError when it fails."""
    argv, env = python_argv(sysroot, cpu)
    try:
        r = subprocess.run(argv + ["-c", _SMOKE], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise TargetError(f"aarch64 python under qemu ({cpu}) did not finish in 900 s") from None
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise TargetError(f"aarch64 python under qemu ({cpu}) failed (rc {r.returncode}): "
                          f"{_tail(r.stdout + r.stderr)}")
    return {**json.loads(lines[-1]), "cpu": cpu}


# ------------------------------------------------------------------------------------------------ util

def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise TargetError(f"{what} failed: {_tail(r.stdout + r.stderr)}")


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "no output"


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("prepare", "smoke", "check"):
        print("usage: python -m edgekit.measure.aarch64 prepare | smoke [cpu] | check", file=sys.stderr)
        return 2
    if args[0] == "check":
        ok, why = availability()
        print(why)
        return 0 if ok else 1
    root = prepare(progress=print)
    print(root)
    if args[0] == "smoke":
        print(json.dumps(smoke(root, args[1] if len(args) > 1 else "cortex-a72")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
