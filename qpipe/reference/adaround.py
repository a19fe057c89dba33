"""AdaRound (Nagel et al., ICML 2020) pieces in plain NumPy: the rectified sigmoid, its initialisation from the
fractional part, the rounding regulariser, the beta schedule and the hardening to integers."""

from __future__ import annotations

import numpy as np

ZETA, GAMMA = 1.1, -0.1   # stretch of the rectified sigmoid


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return np.clip(1.0 / (1.0 + np.exp(-np.asarray(v, dtype=np.float64))) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(w: np.ndarray, s) -> np.ndarray:
    """V with h(V) equal to the fractional part r = w/s - floor(w/s): V = -log((zeta - gamma)/(r - gamma) - 1)."""
    v = np.asarray(w, dtype=np.float64) / s
    r = v - np.floor(v)
    return -np.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


def regularizer(v: np.ndarray, beta: float) -> float:
    """sum(1 - |2 h(V) - 1|^beta): zero once every h(V) is 0 or 1."""
    return float(np.sum(1.0 - np.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta))


def beta_at(t: int, iters: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """beta at iteration t (0-based): None during the warm-up (regulariser off), then linear from start to end."""
    t0 = warmup * iters
    if t < t0:
        return None
    rel = (t - t0) / max(iters - t0, 1e-12)
    return end + (start - end) * max(0.0, 1.0 - rel)


def harden(w: np.ndarray, s, z, v: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integers: floor(w/s) + z, plus one where h(V) >= 0.5 (that is V >= 0), clamped to the grid."""
    base = np.floor(np.asarray(w, dtype=np.float64) / s)
    return np.clip(base + z + (np.asarray(v) >= 0), qmin, qmax).astype(np.int64)
