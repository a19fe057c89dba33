"""Affine quantization and rounding rules, written plainly in NumPy.

Convention (DESIGN.md): ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``.
``round`` is half-to-even for ``nearest`` (as ONNX QuantizeLinear and ``torch.round``).
"""

from __future__ import annotations

import numpy as np

ROUNDING_MODES = ("nearest", "floor", "ceil", "stochastic")


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid [qmin, qmax] of a ``bits``-bit signed or unsigned tensor."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_values(v: np.ndarray, mode: str, u: np.ndarray | None = None) -> np.ndarray:
    """Round real values ``v`` to integers (as float64).

    stochastic (Gupta et al. 2015): round down with probability 1 - frac(v), up with probability frac(v),
    decided by the uniform samples ``u`` in [0, 1): up iff ``u < frac(v)``; exact integers never move.
    """
    v = np.asarray(v, dtype=np.float64)
    if mode == "nearest":
        return np.round(v)  # NumPy rounds half to even
    if mode == "floor":
        return np.floor(v)
    if mode == "ceil":
        return np.ceil(v)
    if mode == "stochastic":
        if u is None:
            raise ValueError("stochastic rounding needs uniform samples u")
        lo = np.floor(v)
        frac = v - lo
        return lo + (np.asarray(u, dtype=np.float64) < frac)
    raise ValueError(f"unknown rounding mode {mode!r}; use one of {ROUNDING_MODES}")


def _bcast(p, x: np.ndarray, axis: int | None) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None,
             mode: str = "nearest", u=None) -> np.ndarray:
    """Integer codes (int64) of ``x``; ``scale``/``zero_point`` are scalars or vectors along ``axis``."""
    x = np.asarray(x, dtype=np.float64)
    s = _bcast(scale, x, axis)
    z = _bcast(zero_point, x, axis)
    q = round_values(x / s, mode, u) + z
    return np.clip(q, qmin, qmax).astype(np.int64)


def dequantize(q, scale, zero_point, axis: int | None = None) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    return (q - _bcast(zero_point, q, axis)) * _bcast(scale, q, axis)


def fake_quantize(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> np.ndarray:
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)
