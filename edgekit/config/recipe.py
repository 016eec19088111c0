"""The recipe (``edgekit.toml``): what model, which inputs, which data, which targets, which gates.

Validated up front by pydantic; every error names the file and the field. Relative paths resolve
against the recipe's folder. Example::

    targets = ["ort-cpu"]

    [model]
    source = "model.py:build"          # file.py:callable returning an nn.Module, or a torch.export .pt2
    inputs = [
      { name = "image", shape = [1, 3, 64, 64], dtype = "float32", modality = "image" },
      { name = "input_ids", shape = [1, 32], dtype = "int64", modality = "text" },
      { name = "attention_mask", shape = [1, 32], dtype = "int64", modality = "text" },
    ]

    [data]
    calibration = "calib.npz"          # one array per input name, axis 0 = sample, no batch axis
    evaluation = "eval.npz"            # same keys + optional "labels"
    metric = "top1"                    # top1 (needs labels) | cosine (fidelity to fp32 torch)

    [gates]
    max_metric_drop = 0.01
    min_speedup = 1.5

    [quantize]                         # optional: the accuracy-aware search (QuantizeSpec)
    time_budget_s = 300
"""
from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit.errors import InputError

DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
    shape: list[int] = Field(min_length=1)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    modality: str = "other"

    @field_validator("shape")
    @classmethod
    def _batch_one(cls, shape: list[int]) -> list[int]:
        if shape[0] != 1:
            raise ValueError(f"the first (batch) axis must be 1, got {shape}")
        if any(d <= 0 for d in shape):
            raise ValueError(f"every axis must be positive, got {shape}")
        return shape


class ModelSpec(_Strict):
    source: str
    inputs: list[InputSpec] = Field(min_length=1)
    name: Optional[str] = None

    @field_validator("inputs")
    @classmethod
    def _unique(cls, inputs: list[InputSpec]) -> list[InputSpec]:
        names = [i.name for i in inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"input names must be unique, repeated: {', '.join(dup)}")
        if "labels" in names:
            raise ValueError("'labels' is reserved for the evaluation set's labels; rename that input")
        return inputs


class DataSpec(_Strict):
    calibration: str
    evaluation: str
    metric: Literal["top1", "cosine"] = "cosine"
    max_calibration_samples: Optional[int] = Field(default=None, ge=1)
    max_evaluation_samples: Optional[int] = Field(default=None, ge=1)


class LowRankSpec(_Strict):
    """``[prune.low_rank]``: low-rank factorization after pruning (edgekit.prune.lowrank)."""
    energy: Optional[float] = Field(default=None, gt=0, le=1)
    """Fraction of each weight's squared singular values to keep, for layers of every tower and fusion
    layers; absent = only the towers in ``energies``."""
    energies: dict[str, float] = {}
    """Per tower, by input modality (``{ text = 0.9 }``)."""
    layers: list[Literal["Linear", "Conv1x1"]] = ["Linear"]
    include: list[str] = []
    """Module-name patterns (fnmatch, e.g. ``*.intermediate.dense``); empty = every layer of ``layers``."""
    min_size: int = Field(default=16384, ge=0)
    """Layers with fewer weights are left alone (two small GEMMs cost more than one)."""

    @field_validator("energies")
    @classmethod
    def _energy_range(cls, energies: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in energies.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"each energy must be > 0 and <= 1, got {bad}")
        return energies


class PruneSpec(_Strict):
    """``[prune]``: structured pruning before export (edgekit.prune); absent = no pruning."""
    ratio: float = Field(default=0.0, ge=0, lt=1)
    """Global fraction of channels / FFN neurons / attention heads to remove."""
    ratios: dict[str, float] = {}
    """Per tower, by input modality (``{ image = 0.4, text = 0.2 }``); layers fed by several modalities
    (fusion) use ``ratio``."""
    macs_budget: Optional[float] = Field(default=None, gt=0, lt=1)
    """Keep at most this fraction of the unpruned MACs: ``ratio`` and ``ratios`` (all 1 when none is set)
    are scaled by one factor, found by bisection, until the pruned model fits. Absent = use the ratios."""
    recover_steps: int = Field(default=0, ge=0)
    """Label-free distillation steps from the unpruned fp32 model on the calibration inputs; 0 = none."""
    recover_lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    low_rank: Optional[LowRankSpec] = None
    """Factorize Linear / 1x1 Conv layers to a lower rank after pruning (``[prune.low_rank]``)."""

    @field_validator("ratios")
    @classmethod
    def _ratio_range(cls, ratios: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in ratios.items() if not 0 <= v < 1}
        if bad:
            raise ValueError(f"each ratio must be >= 0 and < 1, got {bad}")
        return ratios


class GateSpec(_Strict):
    max_metric_drop: Optional[float] = Field(default=None, ge=0)
    min_speedup: Optional[float] = Field(default=None, gt=0)
    max_latency_ms: Optional[float] = Field(default=None, gt=0)
    max_size_bytes: Optional[int] = Field(default=None, gt=0)
    # Regressions vs `edgekit ci --baseline` (edgekit.release.baseline; defaults there: 0.10, 0.005, 0.05).
    max_latency_regression: Optional[float] = Field(default=None, ge=0)  # relative p50 floor
    max_metric_regression: Optional[float] = Field(default=None, ge=0)  # absolute
    max_size_growth: Optional[float] = Field(default=None, ge=0)  # relative


class Gates(GateSpec):
    targets: dict[str, GateSpec] = {}
    """Per-target overrides, e.g. ``[gates.targets.ort-cpu] min_speedup = 2.0``."""

    def for_target(self, name: str) -> GateSpec:
        base = self.model_dump(exclude={"targets"})
        over = self.targets.get(name)
        if over is not None:
            base.update({k: v for k, v in over.model_dump().items() if v is not None})
        return GateSpec(**base)


DEFAULT_SEARCH_BUDGET_S = 600.0


class QuantizeSpec(_Strict):
    """``[quantize]``: the accuracy-aware search run after a target's first quantization (README,
    "Accuracy-aware quantization"). When the first int8 artifact drops the metric by more than the
    target's ``max_metric_drop``, edgekit finds the sensitive layers with the toolchain's own means and
    falls them back step by step (better calibration, then float), re-measuring each step."""

    search: Optional[bool] = None
    """None (default): search only where the target has a max_metric_drop gate; False: never."""
    time_budget_s: float = Field(default=DEFAULT_SEARCH_BUDGET_S, gt=0)
    """Wall-clock budget per target for the search (not counting the first quantization); a step is
    started only if the time left covers the mean cost of the steps so far."""
    eval_samples: int = Field(default=200, ge=1)
    """Evaluation samples each candidate is scored on (the first N of the evaluation set); the final
    artifact is then verified on the whole set by the measure step."""
    max_steps: int = Field(default=12, ge=1)
    distill_steps: int = Field(default=100, ge=0)
    """Quantization-aware distillation (the rung before float fallback): fine-tuning steps against the
    fp32 outputs with int8 rounding in the loop, on the calibration inputs; 0 = skip the rung."""
    distill_lr: float = Field(default=1e-5, gt=0)


class RunSpec(_Strict):
    """``[run]``: where the jobs run (``edgekit run --cluster`` overrides it)."""

    cluster: Optional[str] = None
    """None: worker processes on this machine. ``auto`` | ``local`` | ``HOST:PORT`` | ``ray://HOST:PORT``: Ray
    tasks on that cluster (README, "Running on a cluster")."""

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from edgekit.orchestrate.executor import check_address

            try:
                check_address(v)
            except InputError as e:
                raise ValueError(str(e).removeprefix("--cluster ")) from None
        return v


class Recipe(_Strict):
    targets: list[str] = Field(min_length=1)
    model: ModelSpec
    data: DataSpec
    gates: Gates = Gates()
    quantize: QuantizeSpec = QuantizeSpec()
    prune: Optional[PruneSpec] = None
    run: RunSpec = RunSpec()

    # Filled in by load_recipe, not by the user.
    path: Path = Field(default=Path("edgekit.toml"), exclude=True)

    @model_validator(mode="after")
    def _targets_unique(self) -> "Recipe":
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets are listed twice: {self.targets}")
        if self.prune is not None:
            known = {i.modality for i in self.model.inputs}
            for what, keys in (("prune.ratios", self.prune.ratios),
                               ("prune.low_rank.energies", self.prune.low_rank.energies if self.prune.low_rank else {})):
                unknown = sorted(set(keys) - known)
                if unknown:
                    raise ValueError(f"{what}: {', '.join(unknown)} is not a modality of [model] inputs "
                                     f"(modalities: {', '.join(sorted(known))})")
        return self

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def name(self) -> str:
        return self.model.name or self.root.name

    def digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `edgekit run --help` lists the recipe's keys)"
        elif e["type"] == "missing":
            msg = "missing required field"
        lines.append(f"  {loc}: {msg}")
    return f"{path}: invalid recipe\n" + "\n".join(lines)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; raise InputError naming the file and field on any problem."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "edgekit.toml"
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    if "path" in raw:
        raise InputError(f"{path}: path: unknown key")
    try:
        return Recipe(**raw, path=path.resolve())
    except ValidationError as e:
        raise InputError(_format_errors(path, e)) from None
