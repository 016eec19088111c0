"""The backend interface: what a toolchain must do for edgekit. One file per toolchain implements it.

The pipeline calls, per target and in worker processes:
``export_fp32`` (torch model -> fp32 artifact), ``quantize`` (fp32 artifact + calibration set ->
optimized artifact), and ``load`` (artifact -> Runner, used to verify and to benchmark). A backend
imports its toolchain inside these methods, so edgekit imports and validates profiles without it.
"""
from __future__ import annotations

import importlib.metadata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from edgekit.errors import InputError, TargetError


def first_lines(e: BaseException, n: int = 6) -> str:
    """The head of a toolchain's (often very long) error message."""
    return "\n".join(str(e).strip().splitlines()[:n])


def synthetic_array(shape: Sequence[int], dtype, rng: np.random.Generator) -> np.ndarray:
    """A stand-in input for `edgekit bench` without data: floats ~ N(0, 1), integers 1 (a valid token
    id and an all-ones mask)."""
    dtype = np.dtype(dtype)
    return rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.ones(shape, dtype)


class Options(BaseModel):
    """Base for a backend's option tables: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Artifact:
    path: Path
    precision: str  # e.g. "fp32", "int8 (QDQ, U8S8, per-channel)"
    files: list[Path] = field(default_factory=list)  # path + sidecars (external data, .bin)
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.files:
            self.files = [self.path]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


class Runner(Protocol):
    """A loaded artifact: feeds are the recipe's inputs (numpy, batch axis 1); returns the outputs."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(ABC):
    name: ClassVar[str]
    suffix: ClassVar[str]  # artifact file suffix
    packages: ClassVar[Sequence[str]]  # distributions whose versions go into the report
    install_hint: ClassVar[str]
    ExportOptions: ClassVar[type[Options]] = Options
    QuantizeOptions: ClassVar[type[Options]] = Options
    RuntimeOptions: ClassVar[type[Options]] = Options

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
        for p in self.packages:
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
            raise TargetError(f"{module} is not importable ({e}); install it with: {self.install_hint}") from None

    def unmeasurable_reason(self, runtime: Options) -> Optional[str]:
        """Why latency cannot be measured on this machine (e.g. no GPU), or None if it can."""
        return None

    def variants(self, fp32: Artifact, out: Path, opts: Options) -> dict[str, Artifact]:
        """Extra artifacts a profile asks for besides the quantized one (e.g. an fp16 model for a GPU);
        verified and timed like the others."""
        return {}

    def search_candidates(self, fp32: Artifact, opts: Options, ctx) -> Iterator:
        """Accuracy-aware quantization (``edgekit.quantize_search``): yield ``Candidate``s one at a time,
        least fallback first, after the profile's quantization (``opts``) missed the accuracy budget.
        ``ctx`` (a ``SearchContext``) holds the calibration set, the scoring subset, the history of
        scored steps and the time left. The default: no search means for this toolchain."""
        return iter(())

    @abstractmethod
    def export_fp32(self, model, args: tuple, inputs, out: Path, opts: Options) -> Artifact: ...

    @abstractmethod
    def quantize(self, fp32: Artifact, calibration, out: Path, opts: Options) -> Artifact: ...

    @abstractmethod
    def load(self, path: Path, runtime: Options) -> Runner: ...
