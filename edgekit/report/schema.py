"""report.json as typed models: the contract release pipelines read (schema ``edgekit.report/1``).

One ``Report`` per run; one ``TargetRow`` per target, whose artifacts (fp32, optimized, then extras such
as an fp16 variant or the unpruned int8 reference) are walked with ``TargetRow.artifacts()`` wherever a
consumer needs all of them (report.md, report.html, manifest.json). ``Report.to_json()`` gives the
exact JSON document; ``Report.read(path)`` reads one back (a baseline). Unknown keys are kept, so a
report written by a newer edgekit of the same schema reads and round-trips.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_serializer

SCHEMA = "edgekit.report/1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()
    """Keys that are absent from the JSON (not null) when unset, as report.json always had them."""

    @model_serializer(mode="wrap")
    def _drop_unset_optionals(self, handler):
        data = handler(self)
        for k in self.OMIT_IF_NONE:
            if data.get(k) is None:
                data.pop(k, None)
        return data


class Latency(_Model):
    """Statistics of the timed runs of one artifact, in milliseconds (``edgekit.measure.bench.latency_stats``).
    Timed in interleaved rounds (``edgekit.measure.timing``): also each round's p50 and the 95 %
    interval of the p50 over rounds."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("ci", "rounds_p50")

    p50: float
    p90: float
    p99: float
    mean: float
    n: int
    min: Optional[float] = None
    std: Optional[float] = None
    mad: Optional[float] = None
    q1: Optional[float] = None
    q3: Optional[float] = None
    ci: Optional[list[float]] = None
    rounds_p50: Optional[list[float]] = None


class Fidelity(_Model):
    cosine: float
    top1_agreement: float
    max_abs_error: float


class ArmCheck(_Model):
    """The artifact run on an emulated aarch64 core (``edgekit.measure.arm``) against the host's outputs."""

    status: Literal["ok", "failed", "skipped"]
    device: str
    """``qemu:<cpu>``."""
    reason: Optional[str] = None
    """Why it was skipped or failed."""
    samples: int = 0
    """Evaluation samples run there (in order, until the time budget was spent)."""
    of: int = 0
    metric: Optional[float] = None
    """The task metric on ARM, on those samples."""
    host_metric: Optional[float] = None
    """The host's metric on the same samples."""
    max_abs_diff: Optional[float] = None
    relative_diff: Optional[float] = None
    """``max_abs_diff`` over the largest host output (the check passes when it is within ``floor``)."""
    noise_ratio: Optional[float] = None
    """rms(ARM - host) / rms(host - fp32 torch reference): what ``tolerance`` applies to."""
    floor: Optional[float] = None
    top1_agreement: Optional[float] = None
    tolerance: float
    runtime: Optional[str] = None
    seconds: Optional[float] = None


class ArtifactResult(_Model):
    """One artifact of a target as built, verified and timed."""

    artifact: str
    """Path of the main file, relative to the output directory."""
    files: list[str]
    size_bytes: int
    precision: str
    details: dict[str, Any] = {}
    metric: Optional[float] = None
    fidelity: Optional[Fidelity] = None
    latency_ms: Optional[Latency] = None
    latency_reason: Optional[str] = None
    """Why ``latency_ms`` is null (e.g. "not measured: no aarch64 device")."""
    load_ms: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    io: Optional[dict[str, Any]] = None
    verified_on: Optional[str] = None
    measured_on: Optional[str] = None
    arm: Optional[ArmCheck] = None
    """The check on an emulated aarch64 core, for a profile with ``[verify] device = "qemu:<cpu>"``."""

    @property
    def p50(self) -> Optional[float]:
        return self.latency_ms.p50 if self.latency_ms else None


class SearchStep(_Model):
    step: str
    metric: float
    drop: float
    latency_ms: Optional[float] = None
    kept_float: list[str] = []
    seconds: float = 0.0
    scored_on: Optional[int] = None
    """Evaluation samples ``drop`` was measured on: the search's subset, or all of them for a step that
    was within budget on the subset."""


class SearchOutcome(_Model):
    """What the accuracy-aware quantization search did for one target (``edgekit.quantize.search``)."""

    status: Literal["ok", "failed"]
    reason: Optional[str] = None
    max_metric_drop: float
    metric: str
    eval_samples: int
    fp32_metric_on_subset: float
    time_budget_s: float
    search_s: float
    stopped: str
    steps: list[SearchStep]
    chosen: int
    kept_float: list[str] = []
    before: dict[str, Optional[float]]
    after: dict[str, Optional[float]]
    latency_cost_ms: Optional[float] = None


class PruneFacts(_Model):
    """What structured pruning did for one target (``edgekit.prune``); more keys as the pruner reports them."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("metric_after_prune", "metric_after_recovery", "metric_after_quantize",
                                               "int8_unpruned_metric", "latency_p50_ms", "speedup_vs_int8_unpruned",
                                               "speedup_vs_int8_unpruned_ci", "low_rank")

    ratio: float
    ratios: dict[str, float] = {}
    round_to: int
    recover_steps: int = 0
    params_before: int
    params_after: Optional[int] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    widths: list[dict[str, Any]] = []
    protected: dict[str, int] = {}
    metric_after_prune: Optional[float] = None
    metric_after_recovery: Optional[float] = None
    low_rank: Optional[dict[str, Any]] = None
    """``[prune.low_rank]`` (edgekit.prune.lowrank): per layer its shape, rank, kept energy and params
    before/after (or why it was left alone); the model's MACs and params before/after factorization;
    the metric after factorization (before recovery)."""
    # filled in by the pipeline once the artifacts are measured:
    metric_after_quantize: Optional[float] = None
    int8_unpruned_metric: Optional[float] = None
    latency_p50_ms: Optional[dict[str, float]] = None
    speedup_vs_int8_unpruned: Optional[float] = None
    speedup_vs_int8_unpruned_ci: Optional[list[float]] = None


class Timing(_Model):
    """How a target's artifacts were timed, and whether the figures can be trusted (``edgekit.measure.timing``)."""

    method: str
    rounds: int
    stopped: str
    stable: bool
    seconds: float
    noisy: bool
    noise: list[str] = []
    """Why it is flagged noisy: a wide interval at the time cap, other processes' CPU, steal, frequency."""
    speedups: dict[str, dict[str, Any]] = {}
    """Per artifact besides fp32: median of the per-round speed-ups over fp32, its 95 % interval."""
    conditions: dict[str, Any] = {}
    """threads, affinity, load average before/after, other processes' CPU (cores), steal, frequency, governor."""


class TargetRow(_Model):
    """One target of the report. ``status`` ok | failed | skipped; a failed row keeps what was measured."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("cache", "timings", "quantize_search", "prune", "extras", "device_info",
                                               "budget_missed", "speedup_ci", "timing")

    name: str
    backend: str
    description: str = ""
    device: str
    status: Literal["ok", "failed", "skipped"] = "ok"
    reason: Optional[str] = None
    threads: Optional[int] = None
    versions: dict[str, Optional[str]] = {}
    fp32: Optional[ArtifactResult] = None
    optimized: Optional[ArtifactResult] = None
    speedup_p50: Optional[float] = None
    """Median over interleaved rounds of fp32 p50 / optimized p50 (the ratio of the two p50s for reports
    timed without rounds)."""
    speedup_ci: Optional[list[float]] = None
    """95 % interval of ``speedup_p50``; speed gates and baseline comparisons use it."""
    timing: Optional[Timing] = None
    size_ratio: Optional[float] = None
    metric_drop: Optional[float] = None
    cache: Optional[dict[str, Any]] = None
    timings: Optional[dict[str, float]] = None
    quantize_search: Optional[SearchOutcome] = None
    prune: Optional[PruneFacts] = None
    extras: Optional[dict[str, ArtifactResult]] = None
    """Artifacts besides fp32 and optimized, verified and timed the same way (an fp16 variant, the
    unpruned int8 reference of a pruned target)."""
    device_info: Optional[dict[str, Any]] = None
    budget_missed: Optional[bool] = None
    """Built and measured, but the accuracy search ended over max_metric_drop: judged as a failed gate."""

    def artifacts(self) -> Iterator[tuple[str, ArtifactResult]]:
        """(kind, artifact) for fp32, optimized, then the extras in name order; absent ones skipped."""
        for kind, art in (("fp32", self.fp32), ("optimized", self.optimized), *sorted((self.extras or {}).items())):
            if art is not None:
                yield kind, art

    def add_artifact(self, kind: str, art: ArtifactResult) -> None:
        if kind in ("fp32", "optimized"):
            setattr(self, kind, art)
        else:
            self.extras = {**(self.extras or {}), kind: art}

    @property
    def judged(self) -> bool:
        """Whether its figures can be judged by gates: ok, or failed only for a missed accuracy budget."""
        return self.status == "ok" or bool(self.budget_missed)


class GateResult(_Model):
    """One target x gate verdict; ``passed`` None = not judged (``note`` says why)."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("note", "interval", "basis")

    target: str
    gate: str
    limit: float
    value: Optional[float] = None
    passed: Optional[bool] = None
    what: str
    note: Optional[str] = None
    interval: Optional[list[float]] = None
    """95 % interval of ``value`` when it was measured in interleaved rounds."""
    basis: Optional[str] = None
    """What the verdict was judged on when not ``value`` itself (an interval's bound)."""


class Machine(_Model):
    cpu: str
    arch: str
    cores: Optional[int] = None
    isa: list[str] = []
    os: str = ""
    python: str = ""


class ModelInfo(_Model):
    name: str
    source: str
    params: int
    macs: Optional[int] = None
    inputs: list[dict[str, Any]] = []


class EvalInfo(_Model):
    path: str
    metric: str
    n: int
    fp32_torch: float


class Report(_Model):
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("baseline", "previous", "cluster")

    schema_: str = Field(default=SCHEMA, alias="schema")
    edgekit_version: str
    created: str
    machine: Machine
    recipe: dict[str, Any] = {}
    model: ModelInfo
    calibration: dict[str, Any] = {}
    eval: EvalInfo
    targets: list[TargetRow] = []
    gates: list[GateResult] = []
    cache: dict[str, Any] = {}
    baseline: Optional[dict[str, Any]] = None
    previous: Optional[str] = None
    """Where the output this run replaced was kept (``<out>.prev``), if there was one."""
    cluster: Optional[str] = None
    """The Ray cluster the jobs ran on (``edgekit run --cluster``); each row's ``device`` names its node."""

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def dumps(self) -> str:
        """Strict JSON (no NaN/Infinity: a non-finite number is a bug upstream and fails loudly here)."""
        return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def read(cls, path: Path) -> "Report":
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))

    def target(self, name: str) -> Optional[TargetRow]:
        return next((t for t in self.targets if t.name == name), None)
