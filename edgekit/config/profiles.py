"""Target profiles: one declarative TOML file per hardware target in ``targets/``.

A profile names its backend and the device latency is measured on, and carries the backend's
``[export]``, ``[quantize]`` and ``[runtime]`` options (validated by the backend's own schema) and
the benchmark settings. A recipe names a target by its profile name (``ort-cpu``) or by a path to a
profile file.
"""
from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgekit.errors import InputError


class BenchSettings(BaseModel):
    """How a target's artifacts are timed (``edgekit.measure.timing``): interleaved rounds in one
    process until every speed-up's 95 % interval is within ``interval`` of its median, or ``max_seconds``."""

    model_config = ConfigDict(extra="forbid")
    warmup: int = Field(default=10, ge=0)
    """Warm-up calls at least; more until the first-call outliers are gone."""
    runs: int = Field(default=100, ge=1)
    """Timed calls per artifact at least, spread over ``min_rounds`` rounds."""
    min_rounds: int = Field(default=10, ge=2)
    max_seconds: float = Field(default=20.0, gt=0)
    """Cap on adding rounds (per target); a run that hits it with a wide interval is flagged noisy."""
    interval: float = Field(default=0.05, gt=0, lt=1)
    """Wanted half-width of each speed-up's 95 % interval, relative to its median."""
    pin: bool = True
    """Pin the timing process to the least busy core(s) when there are more cores than threads."""
    floor: float = Field(default=0.03, ge=0, lt=1)
    """The smallest relative half-width a reported interval gets. Speed-ups of one artifact pair timed
    in separate runs of this 2-core machine spread by 2-3 % (process to process; idle vs one core busy:
    LiteRT 4.42-4.59x idle, 4.50-4.57x busy, each run's own interval about ±1 %), which the rounds of
    one run cannot see."""
    noisy_floor: float = Field(default=0.06, ge=0, lt=1)
    """``floor`` for a run flagged noisy: load shifts a speed-up, not only its spread (one core kept
    busy moved the quick example's LiteRT speed-up from 4.36x to 4.38-4.52x, ORT by 2 %, OpenVINO 2 %)."""
    sessions: int = Field(default=2, ge=1)
    """Fresh timing processes whose rounds are pooled: a process's memory layout moves a speed-up by a
    few percent (measured on the quick example's LiteRT target: 4.14-4.60x between processes on one
    machine, each with an interval of about ±2 %)."""

    @property
    def per_round(self) -> int:
        return max(1, -(-self.runs // self.min_rounds))


class PruneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    round_to: int = Field(default=1, ge=1)
    """Pruned widths (channels, neurons, heads x head size) are multiples of this: the target's
    kernels' vector/tile width, so a pruned layer does not pay for a padded remainder."""


class VerifySettings(BaseModel):
    """Where a target's artifacts are verified besides this host (``edgekit.measure.arm``)."""

    model_config = ConfigDict(extra="forbid")
    device: str = "host"
    """``host``, or ``qemu:<cpu>``: also run them on an emulated aarch64 core (``cortex-a76`` for a recent
    phone's big core, ``cortex-a53`` for a small board, ``neoverse-n1`` for a Graviton) when
    qemu-user-static is installed, and fail the target if ARM and x86 disagree (``tolerance``)."""
    budget_s: float = Field(default=30.0, gt=0)
    """Seconds of emulation per target, two thirds for the optimized artifact and one third for fp32:
    evaluation samples run in order until each share is spent (at least one; Python's start under
    emulation, about 5 s, comes on top)."""
    tolerance: float = Field(default=0.5, gt=0)
    """Largest ``rms(ARM - x86) / rms(x86 - fp32 reference)`` allowed (ARM adding at most half again the
    artifact's own error), unless ``max |ARM - x86|`` is within ``floor`` of the largest host output
    (``edgekit.measure.arm``)."""
    floor: float = Field(default=0.01, ge=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "host" and not re.fullmatch(r"qemu:[A-Za-z0-9_.-]+(,[A-Za-z0-9_-]+=[A-Za-z0-9_]+)*", v):
            raise ValueError(f"{v!r} is not a verification device: expected host or qemu:<cpu> "
                             f"(e.g. qemu:cortex-a76; `qemu-aarch64-static -cpu help` lists them)")
        return v


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    backend: str
    description: str = ""
    device: str = "host"
    """Where latency is measured: ``host`` (this machine), ``ssh:[user@]host[:port]`` (a Linux board
    reached over ssh; key from ssh-agent / ~/.ssh/config) or ``adb:SERIAL`` (an Android phone)."""
    arch: Optional[str] = None
    """The CPU architecture this target's latency stands for (``aarch64``, ``x86_64``). On a host of
    another architecture latency is not measured (host numbers are never passed off as ARM numbers)."""
    resources: dict[str, float] = {}
    """What a Ray node must advertise to verify and time this target under ``edgekit run --cluster``
    (``{aarch64 = 1}``, ``{GPU = 1}``, a named board: ``ray start --resources '{"pixel8": 1}'``); builds go
    to any node. Empty: any node with a free CPU. Without a cluster it is not used."""
    remote_python: str = "python3"
    """The command that runs Python on an ``ssh:`` device (``python3``, ``/opt/venv/bin/python``, ...);
    that Python needs numpy and the runtime (onnxruntime)."""
    export: dict[str, Any] = {}
    quantize: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    bench: BenchSettings = BenchSettings()
    prune: PruneSettings = PruneSettings()
    verify: VerifySettings = VerifySettings()
    path: Optional[Path] = Field(default=None, exclude=True)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for k, n in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", k) or k == "CPU":
                raise ValueError(f"resource {k!r}: expected a Ray resource name (letters, digits, '_', '.', '-'; "
                                 f"GPU or a custom one; CPU is not a device)")
            if not n > 0:
                raise ValueError(f"resource {k!r}: amount {n:g} must be > 0")
        return v


def profile_dirs() -> list[Path]:
    """Where built-in profiles live: $EDGEKIT_TARGETS, the checkout's targets/, the installed copy."""
    dirs = []
    if os.environ.get("EDGEKIT_TARGETS"):
        dirs.append(Path(os.environ["EDGEKIT_TARGETS"]))
    dirs.append(Path(__file__).resolve().parents[2] / "targets")
    dirs.append(Path(sys.prefix) / "share" / "edgekit" / "targets")
    return [d for d in dirs if d.is_dir()]


def available() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(profile_dirs()):  # earlier dirs win
        for f in sorted(d.glob("*.toml")):
            found[f.stem] = f
    return dict(sorted(found.items()))


def load_profile(name_or_path: str, base: Optional[Path] = None) -> Profile:
    """Load a profile by name (``ort-cpu``) or by path (``./my-board.toml``, relative to ``base``)."""
    if name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            raise InputError(f"target profile {path}: file not found")
    else:
        known = available()
        if name_or_path not in known:
            raise InputError(f"unknown target {name_or_path!r}; known targets: {', '.join(known) or 'none'} "
                             f"(or give a path to a profile .toml)")
        path = known[name_or_path]
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"target profile {path}: not valid TOML: {e}") from None
    try:
        prof = Profile(**raw, path=path)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InputError(f"target profile {path}: {errs}") from None
    from edgekit.backends import get_backend

    get_backend(prof.backend).validate_options(prof)  # raises InputError naming the profile
    _check_device(prof, f"target profile {path}")
    _check_verify_cpu(prof, f"target profile {path}")
    return prof


def _check_verify_cpu(prof: Profile, where: str) -> None:
    """A ``qemu:<cpu>`` the installed qemu does not know is the profile's error, before anything is built
    (without qemu the check is skipped at run time, with the reason)."""
    if not prof.verify.device.startswith("qemu:"):
        return
    from edgekit.measure import aarch64

    known = aarch64.cpus()
    cpu = prof.verify.device.partition(":")[2]
    if known and cpu.split(",")[0] not in known:
        raise InputError(f"{where}: verify.device {prof.verify.device!r}: qemu does not know the aarch64 cpu "
                         f"{cpu.split(',')[0]!r}; valid ones: {', '.join(known)}")


_USER = r"[A-Za-z0-9._][A-Za-z0-9._-]*"
_HOST = r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])"  # a name, an IPv4, an ssh_config alias, [IPv6]
_DEVICE = re.compile(rf"host|ssh:(?:{_USER}@)?{_HOST}(?::[0-9]{{1,5}})?|adb:[A-Za-z0-9._][A-Za-z0-9._:-]*")


def check_device(v: str) -> str:
    """``host``, ``ssh:[user@]host[:port]`` or ``adb:SERIAL``; nothing that ssh or adb could read as an
    option (a leading ``-``) or a shell could read as syntax."""
    if not isinstance(v, str) or not _DEVICE.fullmatch(v):
        raise ValueError(f"device {v!r}: expected host, ssh:[user@]host[:port] (letters, digits, '.', '_', '-'; "
                         f"not starting with '-') or adb:SERIAL")
    return v


def with_device(prof: Profile, device: str) -> Profile:
    """The profile with its device replaced (``edgekit run --device``)."""
    try:
        new = Profile(**{**prof.model_dump(), "device": device}, path=prof.path)
    except ValidationError as e:
        raise InputError(f"--device: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    _check_device(new, f"--device {device} for target {prof.name}")
    return new


def _check_device(prof: Profile, where: str) -> None:
    from edgekit.backends import remote_backends

    if prof.device.startswith("ssh:") and prof.backend not in remote_backends():
        raise InputError(f"{where}: ssh devices run {', '.join(remote_backends())} artifacts; backend "
                         f"{prof.backend!r} is timed on the host or over adb")
