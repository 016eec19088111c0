"""The backend contract: everything edgekit asks of a toolchain. One package per toolchain implements it.

The pipeline calls, per target and in worker processes, ``export_fp32`` (torch model -> fp32 artifact),
``quantize`` (fp32 artifact + calibration set -> optimized artifact) and ``load`` (artifact -> ``Runner``,
used to verify and to benchmark). State that ``quantize`` needs from ``export_fp32`` (LiteRT: the torch
model the .tflite came from) travels on the returned ``Artifact`` (``state``), never in the instance.

The accuracy-aware search (``edgekit.quantize.search``) owns the policy; a backend only answers
questions about its own graph: which cheap fixes it offers (``quality_fixes``), which of its units
belong to given torch modules (``units_of_modules``), how much each activation loses to int8
(``rank_activations``), and how to build with a set of units kept in float (``keep_in_float`` +
``quantize``). A backend imports its toolchain inside its methods, so edgekit imports and validates
profiles without it.
"""
from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from edgekit.errors import InputError, TargetError


def first_lines(e: BaseException, n: int = 6) -> str:
    """The head of a toolchain's (often very long) error message."""
    return "\n".join(str(e).strip().splitlines()[:n])


def named_in(message: str, names: dict[str, str]) -> list[str]:
    """The units whose names (``names``: a name the toolchain may print -> the unit it belongs to) occur
    in ``message`` as whole names (not as part of a longer name), longest names first."""
    import re

    found, text = set(), message
    for name in sorted((n for n in names if len(n) >= 2), key=len, reverse=True):
        pattern = re.compile(r"(?<![\w/.:-])" + re.escape(name) + r"(?![\w/-]|[.:]\w)")  # "name:" or "name." ends it
        if pattern.search(text):
            found.add(names[name])
            text = pattern.sub(" ", text)
    return sorted(found)


def synthetic_array(shape: Sequence[int], dtype, rng: np.random.Generator) -> np.ndarray:
    """A stand-in input for `edgekit bench` without data: floats ~ N(0, 1), integers 1 (a valid token
    id and an all-ones mask)."""
    dtype = np.dtype(dtype)
    return rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype)


class Options(BaseModel):
    """Base for a backend's option tables: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class BackendInfo:
    """One registry entry (``edgekit.backends.REGISTRY``): what the rest of edgekit may know of a backend
    without importing its toolchain."""

    name: str
    entry: str
    """``module:Class`` implementing ``Backend``."""
    suffix: str
    """The artifact's main file suffix (``edgekit bench`` picks the backend by it)."""
    packages: tuple[str, ...]
    """Distributions whose versions go into the report and the build cache key."""
    imports: tuple[tuple[str, str, str], ...]
    """(import name, distribution, what it is for): what ``edgekit doctor`` checks."""
    install_hint: str
    remote: bool = False
    """Its artifacts can be timed on a Linux board over ssh (``Backend.remote_runner``)."""


@dataclass
class Artifact:
    path: Path
    precision: str  # e.g. "fp32", "int8 (QDQ, U8S8, per-channel)"
    files: list[Path] = field(default_factory=list)  # path + sidecars (external data, .bin)
    details: dict[str, Any] = field(default_factory=dict)
    state: Any = field(default=None, repr=False, compare=False)
    """In-process only, never written anywhere: what later steps of the same build need from this
    artifact (the torch model a .tflite came from, a converted graph the search ranks, cached
    calibration ranges)."""

    def __post_init__(self) -> None:
        if not self.files:
            self.files = [self.path]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


class Runner(Protocol):
    """A loaded artifact. Feeds are the recipe's inputs (numpy, batch axis 1) by name."""

    device: Optional[str]
    """What runs it inside the runtime (an execution provider, a plugin device), for the report."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs as float arrays (quantized outputs dequantized)."""

    def signature(self) -> dict:
        """``{"inputs": [...], "outputs": [...]}``: name, dtype, shape (and scale / zero point for
        quantized tensors) as the runtime sees them: what an app developer feeds."""

    def synthetic_feed(self) -> dict[str, np.ndarray]:
        """A feed built from the signature alone (``edgekit bench`` without ``--data``)."""


@dataclass
class Fix:
    """A cheap quantization fix a backend offers (no layer leaves int8): option updates and a label."""

    label: str
    update: dict[str, Any]


class Backend(ABC):
    ExportOptions: type[Options] = Options
    QuantizeOptions: type[Options] = Options
    RuntimeOptions: type[Options] = Options

    def __init__(self, info: BackendInfo):
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def suffix(self) -> str:
        return self.info.suffix

    def files(self, path: Path) -> list[Path]:
        """The files an artifact consists of (itself and its sidecars, e.g. OpenVINO's .bin)."""
        return [path]

    def validate_options(self, profile) -> None:
        for table, schema in (("export", self.ExportOptions), ("quantize", self.QuantizeOptions),
                              ("runtime", self.RuntimeOptions)):
            try:
                schema(**getattr(profile, table))
            except ValidationError as e:
                errs = "; ".join(f"[{table}].{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise InputError(f"target profile {profile.path}: {errs}") from None

    def options(self, profile):
        return (self.ExportOptions(**profile.export), self.QuantizeOptions(**profile.quantize),
                self.RuntimeOptions(**profile.runtime))

    def versions(self) -> dict[str, Optional[str]]:
        out = {}
        for p in self.info.packages:
            try:
                out[p] = importlib.metadata.version(p)
            except importlib.metadata.PackageNotFoundError:
                out[p] = None
        return out

    def require(self, module: str):
        """Import the toolchain or fail the target with the install command that fixes it."""
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise TargetError(f"{module} is not importable ({e}); install it with: {self.info.install_hint}") from None

    # -- where it runs ----------------------------------------------------------------------------
    def unmeasurable_reason(self, runtime: Options) -> Optional[str]:
        """Why latency cannot be measured on this machine (e.g. no GPU), or None if it can."""
        return None

    def remote_runner(self) -> Path:
        """The self-contained script that times this backend's artifacts on a board over ssh
        (``info.remote``; see ``edgekit.measure.remote``): standard library, numpy and the runtime only."""
        raise TargetError(f"backend {self.name} artifacts cannot be timed over ssh")

    def remote_settings(self, runtime: Options) -> dict:
        """The runtime settings ``remote_runner()`` takes in its job (providers, threads, ...)."""
        raise TargetError(f"backend {self.name} artifacts cannot be timed over ssh")

    def doctor_lines(self) -> list[str]:
        """What ``edgekit doctor`` says about this toolchain's devices / providers here."""
        return []

    # -- the build --------------------------------------------------------------------------------
    def variants(self, fp32: Artifact, out: Path, opts: Options) -> dict[str, Artifact]:
        """Extra artifacts a profile asks for besides the quantized one (e.g. an fp16 model for a GPU);
        verified and timed like the others."""
        return {}

    @abstractmethod
    def export_fp32(self, model, args: tuple, inputs, out: Path, opts: Options) -> Artifact: ...

    @abstractmethod
    def quantize(self, fp32: Artifact, calibration, out: Path, opts: Options) -> Artifact: ...

    RUNTIME_MODULES: tuple[str, ...] = ()
    """What ``load`` imports. The timing worker imports them before it pins itself to a core
    (``import_runtime``): a runtime sizes its kernels from the cores it sees at import."""

    def import_runtime(self) -> None:
        import importlib

        for mod in self.RUNTIME_MODULES:
            importlib.import_module(mod)

    @abstractmethod
    def load(self, path: Path, runtime: Options) -> Runner: ...

    # -- questions the accuracy-aware search asks (edgekit.quantize.search); default: none -----------
    def weights_per_channel(self, opts: Options) -> bool:
        """Whether ``opts`` quantizes Conv/Linear weights per output channel."""
        return True

    def smoothing(self, opts: Options) -> Optional[float]:
        """SmoothQuant alpha for edgekit's torch-level scale migration (``edgekit.quantize.rewrite.smooth``)
        where this toolchain gains from it; None where it does its own or gains nothing."""
        return None

    def quality_fixes(self, fp32: Artifact, opts: Options) -> list[Fix]:
        """Cheap fixes for ``opts`` that keep every layer in int8 (fusions, calibration choices)."""
        return []

    def units_of_modules(self, fp32: Artifact, modules: list[str]) -> list[str]:
        """This backend's float-fallback units (graph node / op / module names, as ``keep_in_float`` takes
        them) that come from the torch ``modules`` of the model ``fp32`` was exported from."""
        return []

    def rank_activations(self, art: Artifact, calibration, samples: int) -> list[tuple[list[str], float]]:
        """Each quantized activation of ``art`` as (the units that read or write it, median per-channel
        SQNR in dB of int8 vs float on ``samples`` calibration samples), worst first."""
        return []

    def unit_macs(self, art: Artifact, units: Sequence[str]) -> dict[str, int]:
        """Multiply-accumulates per call of each unit of ``art`` (what keeping it in float costs; 0 for
        elementwise units). Units it cannot tell are left out (the search then treats them alike)."""
        return {}

    def float_units(self, opts: Options) -> list[str]:
        """The units ``opts`` keeps out of int8."""
        return []

    def units_of_error(self, fp32: Artifact, opts: Options, message: str) -> list[str]:
        """The units a failed ``quantize``'s message names (a node, a tensor, a source line), as
        ``keep_in_float`` takes them: the conversion-error rescue (``edgekit.quantize.rescue``) keeps
        them in float and retries. [] when the message names none."""
        return []

    def keep_in_float(self, opts: Options, units: Sequence[str]) -> Options:
        """``opts`` with ``units`` kept out of int8 (and nothing else changed)."""
        raise TargetError(f"backend {self.name} cannot keep layers in float")
