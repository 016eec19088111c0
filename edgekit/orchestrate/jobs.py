"""What the pipeline asks of its worker processes and what they answer, as typed models (JSON on disk).

A job's ``identity()`` is what its result depends on (the build cache's key); the rest of it only says
where to put things (``LOCATIONS``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Optional

from pydantic import BaseModel, ConfigDict

from edgekit.report.schema import Latency, PruneFacts, SearchOutcome


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")
    LOCATIONS: ClassVar[frozenset[str]] = frozenset()
    """Fields that say where files go, not what is computed: left out of ``identity()``."""

    def identity(self) -> dict:
        return self.model_dump(mode="json", exclude=set(self.LOCATIONS))


class SearchSpec(_Job):
    """The accuracy-aware search's settings for one target (``edgekit.quantize.search``)."""

    reference: str
    """.npy of the fp32 torch outputs on the evaluation set."""
    max_drop: float
    time_budget_s: float
    eval_samples: int
    max_steps: int
    distill_steps: int = 0
    distill_lr: float = 1e-5


class PruneEval(_Job):
    """Where the pruning step scores the pruned torch model (against the fp32 reference)."""

    LOCATIONS = frozenset({"cache"})
    eval: str
    reference: str
    limit: int
    cache: Optional[str] = None
    """This run's folder of pruned models, shared by targets with the same round_to (not an input)."""


class BuildJob(_Job):
    """Export fp32 + quantize (+ prune, + search) one target."""

    LOCATIONS = frozenset({"out", "recipe", "relocated"})  # the recipe's content is in the cache key on its own
    recipe: str
    target: str
    out: str
    search: Optional[SearchSpec] = None
    prune_eval: Optional[PruneEval] = None
    relocated: dict[str, str] = {}
    """On a cluster node: where the recipe's absolute ``calibration`` / ``evaluation`` / ``model`` paths
    were copied (``edgekit.orchestrate.executor``); relative ones resolve as written."""

    def identity(self) -> dict:
        d = super().identity()
        if self.prune_eval is not None:
            d["prune_eval"] = self.prune_eval.identity()
        return d


class BuiltArtifact(BaseModel):
    path: str
    files: list[str]
    precision: str
    details: dict[str, Any] = {}

    @classmethod
    def of(cls, a) -> "BuiltArtifact":
        return cls(path=str(a.path), files=[str(f) for f in a.files], precision=a.precision, details=a.details)


class BuildResult(BaseModel):
    timings: dict[str, float] = {}
    fp32: Optional[BuiltArtifact] = None
    optimized: Optional[BuiltArtifact] = None
    extras: dict[str, BuiltArtifact] = {}
    quantize_search: Optional[SearchOutcome] = None
    quantize_search_error: Optional[str] = None
    prune: Optional[PruneFacts] = None
    optimized_error: Optional[str] = None
    """The fp32 artifact was built but quantization failed: fp32 is still verified and timed."""

    def artifacts(self) -> Iterator[tuple[str, BuiltArtifact]]:
        for kind, art in (("fp32", self.fp32), ("optimized", self.optimized), *sorted(self.extras.items())):
            if art is not None:
                yield kind, art


class MeasureJob(_Job):
    """Load one artifact, run the evaluation set (outputs saved), time one sample."""

    LOCATIONS = frozenset({"artifact", "outputs"})  # the artifact's bytes are in the build's key
    backend: str
    artifact: str
    runtime: dict[str, Any]
    eval: str
    inputs: list[str]
    limit: int
    warmup: int
    runs: int
    bench: bool = True
    verify: bool = True
    """Run every evaluation sample and save the outputs; False when they are known (cached): only
    the first sample runs before timing."""
    outputs: str
    arch: Optional[str] = None
    """The CPU architecture the target's latency stands for (the profile's ``arch``): where the worker
    runs on another one, its result says latency cannot be measured there."""

    def identity_of_outputs(self) -> dict:
        """What the outputs depend on (not the timing settings)."""
        return self.model_dump(mode="json", include={"backend", "runtime", "eval", "inputs", "limit"})


class MeasureResult(BaseModel):
    load_ms: float
    unmeasurable: Optional[str] = None
    """Why latency cannot be taken where this job ran (another architecture, a missing provider)."""
    runtime_device: Optional[str] = None
    io: Optional[dict[str, Any]] = None
    latency_ms: Optional[Latency] = None
    peak_rss_mb: Optional[float] = None


class TimeJob(_Job):
    """Time every artifact of a target interleaved in one process (``edgekit.measure.timing``)."""

    LOCATIONS = frozenset({"artifacts"})  # the artifacts' bytes are in the build's key
    backend: str
    runtime: dict[str, Any]
    artifacts: dict[str, str]
    """kind (fp32, optimized, extras) -> main file; fp32 first when present (the speed-ups' base)."""
    eval: str
    inputs: list[str]
    warmup: int
    per_round: int
    min_rounds: int
    max_seconds: float
    interval: float
    pin: bool = True


class TimeResult(BaseModel):
    latency: dict[str, Latency]
    """Per artifact: stats over all timed calls, its per-round p50s and their interval."""
    blocks: dict[str, list[list[float]]] = {}
    """Per artifact, the seconds of every call, one list per round (to pool several processes' rounds)."""
    rounds: int
    stopped: str
    stable: bool
    seconds: float
    warmup_calls: dict[str, int] = {}
    conditions: dict[str, Any] = {}


class ABJob(_Job):
    """Time a baseline's and the current artifact interleaved (release CI's re-measurement)."""

    backend: str
    runtime: dict[str, Any]
    eval: str
    inputs: list[str]
    warmup: int
    baseline: str
    current: str
    rounds: int
    per_round: int


class ABResult(BaseModel):
    a: Latency
    b: Latency
    ratio_p50: float
