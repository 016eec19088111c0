"""Calibration and evaluation sets: one ``.npz`` each, checked against the recipe's inputs.

Contract: one array per model input, keyed by the input name; axis 0 = sample index, the rest = that
input's shape without the batch axis; dtype = the input's dtype. The evaluation set may carry a
``labels`` array (axis 0 = sample). Calibration and evaluation must be different files.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from edgekit.errors import InputError
from edgekit.config.recipe import InputSpec, Recipe


@dataclass
class SampleSet:
    """Arrays of one set, keyed by input name, each (N, *shape[1:]); ``labels`` optional (N,)."""

    path: Path
    arrays: dict[str, np.ndarray]
    labels: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as model feeds, batch axis of 1 restored."""
        return {k: v[i : i + 1] for k, v in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.sample(i) for i in range(len(self)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_set(path: Path, inputs: Sequence[InputSpec], *, role: str, limit: Optional[int] = None) -> SampleSet:
    """Load one ``.npz`` and check it against ``inputs``. ``role`` is 'calibration' or 'evaluation'."""
    if not path.is_file():
        raise InputError(f"{role} data {path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, MemoryError) as e:
        raise InputError(f"{role} data {path}: not a readable .npz file ({type(e).__name__}: {e})") from None

    labels = raw.pop("labels", None)
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in raw]
    if missing:
        raise InputError(
            f"{role} data {path}: no array for model input(s) {', '.join(repr(m) for m in missing)} "
            f"(the file has: {', '.join(sorted(raw)) or 'nothing'})")
    extra = sorted(set(raw) - set(names))
    if extra:
        raise InputError(
            f"{role} data {path}: array(s) {', '.join(repr(e) for e in extra)} match no model input "
            f"(inputs: {', '.join(names)}; the only other key allowed is 'labels')")

    counts = set()
    for spec in inputs:
        a = raw[spec.name]
        want = tuple(spec.shape[1:])
        if a.ndim == 0 or tuple(a.shape[1:]) != want:
            raise InputError(
                f"{role} data {path}: input '{spec.name}' has per-sample shape {tuple(a.shape[1:])} "
                f"(array shape {a.shape}); the recipe says {want} (axis 0 is the sample index)")
        if a.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"{role} data {path}: input '{spec.name}' has dtype {a.dtype}; the recipe says {spec.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).reshape(len(a), -1).any(axis=1).argmax())
            raise InputError(f"{role} data {path}: input '{spec.name}' has NaN or Inf (first in sample {bad})")
        counts.add(len(a))
    if len(counts) != 1:
        sizes = ", ".join(f"{s.name}={len(raw[s.name])}" for s in inputs)
        raise InputError(f"{role} data {path}: inputs have different sample counts ({sizes})")
    n = counts.pop()
    if n < 1:
        raise InputError(f"{role} data {path}: has no samples (need at least 1)")
    if labels is not None:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise InputError(f"{role} data {path}: 'labels' has shape {labels.shape}; expected one class index "
                             f"per sample, shape ({n},) (one-hot labels: store labels.argmax(1))")
        if labels.dtype.kind not in "iu":
            raise InputError(f"{role} data {path}: 'labels' has dtype {labels.dtype}; expected integer class "
                             f"indices")
        if len(labels) != n:
            raise InputError(f"{role} data {path}: 'labels' has {len(labels)} entries for {n} samples")
        if n and labels.min() < 0:
            raise InputError(f"{role} data {path}: 'labels' holds a negative class index ({int(labels.min())}, "
                             f"sample {int(labels.argmin())})")

    if limit is not None and n > limit:
        raw = {k: v[:limit] for k, v in raw.items()}
        labels = labels[:limit] if labels is not None else None
    arrays = {spec.name: np.ascontiguousarray(raw[spec.name]) for spec in inputs}
    return SampleSet(path=path, arrays=arrays, labels=labels)


def load_calibration(recipe: Recipe) -> SampleSet:
    d = recipe.data
    return load_set(recipe.resolve(d.calibration), recipe.model.inputs, role="calibration",
                    limit=d.max_calibration_samples)


def load_evaluation(recipe: Recipe) -> SampleSet:
    d = recipe.data
    s = load_set(recipe.resolve(d.evaluation), recipe.model.inputs, role="evaluation",
                 limit=d.max_evaluation_samples)
    if d.metric == "top1" and s.labels is None:
        raise InputError(f"evaluation data {s.path}: metric 'top1' needs a 'labels' array "
                         f"(or use metric = \"cosine\", which needs no labels)")
    return s


def check_disjoint(calib: SampleSet, evals: SampleSet) -> None:
    """Calibration and evaluation must not be the same file (a metric measured on the calibration
    samples flatters the quantized model)."""
    if calib.path.resolve() == evals.path.resolve() or _sha256(calib.path) == _sha256(evals.path):
        raise InputError(f"calibration data {calib.path} and evaluation data {evals.path} are the same file; "
                         f"evaluate on held-out samples")
