"""Signal-to-quantization-noise ratios, the one yardstick every sensitivity ranking uses."""
from __future__ import annotations

import math

import numpy as np


def channel_sqnr(pre: list, post: list) -> float:
    """SQNR (dB) of a quantized activation, per channel, median over channels; channels along axis 1
    (NCHW) and along the last axis (tokens x features), the worse of the two. Per channel, because an
    outlier channel that eats a per-tensor scale leaves the tensor's total SQNR high while every other
    channel is rounded to zero. ``pre``/``post``: the float and the quantized values, one array per sample."""
    x = np.concatenate([np.asarray(a, np.float64).reshape(-1, *np.shape(a)[1:]) for a in pre])
    y = np.concatenate([np.asarray(b, np.float64).reshape(-1, *np.shape(b)[1:]) for b in post])
    if x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return -math.inf
    worst = math.inf
    for axis in sorted({1 % x.ndim, x.ndim - 1}):
        other = tuple(i for i in range(x.ndim) if i != axis)
        sig = (x ** 2).sum(axis=other) if other else x ** 2
        noise = ((x - y) ** 2).sum(axis=other) if other else (x - y) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            db = np.where(noise > 0, 10 * np.log10(np.maximum(sig, 1e-30) / np.maximum(noise, 1e-30)), 200.0)
        worst = min(worst, float(np.median(db)))
    return worst
