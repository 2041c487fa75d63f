"""Isotonic regression by pool-adjacent-violators: a noisy series made monotone, unbiased.

Used where a measured series must not go the wrong way: the calibration's CPU-expert curves
(non-decreasing in tokens, calibration/reference.py and profiler.py) and the CPU stream's
share of host memory beside copies (non-rising in the copies' rate, `aptmoe.profile`).
"""

from __future__ import annotations

import numpy as np


def pava(y, w=None) -> np.ndarray:
    """Isotonic (non-decreasing) least-squares regression, pool-adjacent-violators: each run
    of neighbours out of order is replaced by its (weighted) mean."""
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=float)
    means: list[float] = []
    weights: list[float] = []
    lengths: list[int] = []
    for yi, wi in zip(y, w):
        means.append(float(yi)); weights.append(float(wi)); lengths.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, n2 = means.pop(), weights.pop(), lengths.pop()
            m1, w1, n1 = means.pop(), weights.pop(), lengths.pop()
            means.append((m1 * w1 + m2 * w2) / (w1 + w2)); weights.append(w1 + w2); lengths.append(n1 + n2)
    return np.repeat(means, lengths)
