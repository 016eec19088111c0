"""Accuracy: the recipe's task metric, and fidelity of an artifact to the fp32 PyTorch model.

All functions take per-sample outputs flattened to (N, D): the model's first output.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def non_finite(outputs: np.ndarray) -> Optional[str]:
    """None when every output is finite, else how many samples are not and the first of them."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if not bad.any():
        return None
    return f"NaN or Inf in the outputs of {int(bad.sum())} of {len(outputs)} evaluation samples (first: sample {int(bad.argmax())})"


def top1(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float((outputs.argmax(axis=1) == labels.reshape(-1)).mean())


def cosine(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-sample cosine similarity to the reference (1.0 = identical direction)."""
    a = outputs.astype(np.float64)
    b = reference.astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), (num == 0) * 1.0)))


def score(metric: str, outputs: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray]) -> float:
    if metric == "top1":
        return top1(outputs, labels)
    if metric == "cosine":
        return cosine(outputs, reference)
    raise ValueError(f"unknown metric {metric!r}")


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> dict:
    """How closely an artifact follows the fp32 torch model, whatever the task metric."""
    if outputs.shape != reference.shape:
        raise ValueError(f"artifact output shape {outputs.shape[1:]} differs from the torch model's "
                         f"{reference.shape[1:]}")
    return {
        "cosine": round(cosine(outputs, reference), 6),
        "top1_agreement": round(float((outputs.argmax(1) == reference.argmax(1)).mean()), 6),
        "max_abs_error": float(np.abs(outputs.astype(np.float64) - reference).max()),
    }
