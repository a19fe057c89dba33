"""APoT: Additive Powers-of-Two quantization (Li, Dong & Wang, ICLR 2020; yhhhli/APoT_Quantization), in NumPy.

Levels of the unsigned B-bit set: every sum of one term from each of up to three lists of powers of two (each
list also holds 0), normalised by the largest sum (ALGORITHMS.md section 5). After normalisation every level is an
exact integer multiple of 1/D with D = 4, 10, 48, 100 for B = 2, 3, 4, 5, so a level is stored exactly as an
integer code with scale alpha / D.

- b-bit activations: the unsigned b-bit set on [0, alpha];
- b-bit weights: the (b - 1)-bit set mirrored by sign (7, 15, 31 levels for b = 3, 4, 5); 2-bit weights are
  ternary {-alpha, 0, alpha}; weights are normalised to zero mean and unit variance per layer first.

Projection to the nearest level, ties to the lower level. Activations are projected in two steps that ONNX
reproduces exactly: the fine cell ``f = clamp(floor(x / (alpha / F)), 0, F - 1)`` of a grid F = 2 D (so every
midpoint between two levels is a cell boundary), then a table ``f -> level code`` of the level nearest to the
cell. That equals the continuous nearest-level projection (a value exactly on a midpoint goes up), up to the
float32 rounding of ``x / step``.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np

LISTS = {  # exponents e of the powers 2^-e in each list (each list also holds 0)
    2: [[1, 2, 3]],
    3: [[1, 2, 4], [3]],
    4: [[1, 3, 5], [2, 4, 6]],
    5: [[1, 3, 6], [2, 4, 7], [5]],
}
DENOMINATOR = {1: 1, 2: 4, 3: 10, 4: 48, 5: 100}   # levels are integer multiples of alpha / D
FINE = 2   # activation fine grid: F = FINE * D cells over [0, alpha]; midpoints of levels fall on cell boundaries
WEIGHT_INIT_ALPHA = 3.0     # the paper's initial clipping of normalised weights
ACT_INIT_ALPHA_CIFAR = 8.0


def unsigned_levels(bits: int) -> list[Fraction]:
    """The 2^B levels of the unsigned B-bit APoT set, as exact fractions of alpha, ascending."""
    if bits not in LISTS:
        raise ValueError(f"APoT levels exist for 2..5 bits, got {bits}")
    lists = [[Fraction(0)] + [Fraction(1, 2**e) for e in lst] for lst in LISTS[bits]]
    sums = sorted({sum(c) for c in itertools.product(*lists)})
    top = sums[-1]
    return [s / top for s in sums]


def level_codes(bits: int, signed: bool) -> np.ndarray:
    """Integer codes (ascending) of the b-bit set: levels * D. Signed: the (b-1)-bit set mirrored by sign."""
    if signed:
        if bits == 2:
            return np.array([-1, 0, 1], dtype=np.int64)
        pos = [int(v * DENOMINATOR[bits - 1]) for v in unsigned_levels(bits - 1)]
        return np.array(sorted({-c for c in pos} | set(pos)), dtype=np.int64)
    return np.array([int(v * DENOMINATOR[bits]) for v in unsigned_levels(bits)], dtype=np.int64)


def denominator(bits: int, signed: bool) -> int:
    return DENOMINATOR[bits - 1] if signed else DENOMINATOR[bits]


def project(v: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index of the nearest level (``levels`` ascending) for each value; ties go to the lower level."""
    mids = (levels[1:] + levels[:-1]) / 2.0
    return np.searchsorted(mids, np.asarray(v, dtype=np.float64), side="left")


def normalize_weights(w: np.ndarray) -> np.ndarray:
    """(w - mean) / std over the whole layer (population std, as torch.std(unbiased=False))."""
    w = np.asarray(w, dtype=np.float64)
    return (w - w.mean()) / w.std()


def weight_codes(w: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    """Integer codes of normalised weights: clip(w_n / alpha, -1, 1), nearest level, times D."""
    codes = level_codes(bits, signed=True)
    d = denominator(bits, signed=True)
    v = np.clip(normalize_weights(w) / alpha, -1.0, 1.0)
    return codes[project(v * d, codes.astype(np.float64))]


def fine_table(bits: int) -> np.ndarray:
    """fine cell 0..F-1 -> code of the level nearest to the cell (no ties: midpoints are cell boundaries)."""
    codes = level_codes(bits, signed=False)
    d = denominator(bits, signed=False)
    centres = (np.arange(FINE * d, dtype=np.float64) + 0.5) / FINE   # in units of alpha / D
    return codes[project(centres, codes.astype(np.float64))]


def activation_step(alpha: float, bits: int) -> np.float32:
    return np.float32(np.float32(alpha) / np.float32(FINE * denominator(bits, signed=False)))


def activation_codes(x: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    """Level codes of activations: fine cell f = clamp(floor(x / step), 0, F - 1) in float32, then the table."""
    f_max = FINE * denominator(bits, signed=False) - 1
    f = np.clip(np.floor(np.asarray(x, dtype=np.float32) / activation_step(alpha, bits)), 0, f_max)
    return fine_table(bits)[f.astype(np.int64)]


def clip_alpha_grad(x: np.ndarray, alpha: float, bits: int, signed: bool, grad_out: np.ndarray) -> float:
    """d loss / d alpha of ``alpha * proj(clip(x / alpha))`` (the paper's clipping function): outside the range
    sign(x) for weights, 1 for activations above it (0 below); inside proj(x/alpha) - x/alpha."""
    x = np.asarray(x, dtype=np.float64)
    codes = level_codes(bits, signed).astype(np.float64)
    d = denominator(bits, signed)
    v = x / alpha
    lo = -1.0 if signed else 0.0
    inside = (v >= lo) & (v <= 1.0)
    q = codes[project(np.clip(v, lo, 1.0) * d, codes)] / d
    g = np.where(inside, q - v, np.where(v > 1.0, 1.0, -1.0 if signed else 0.0))
    return float((g * grad_out).sum())
