"""Integer-only ops (I-ViT, Li & Gu ICCV 2023; I-BERT), written plainly in NumPy: the source of truth.

Every op takes int64 arrays and integer constants and returns int64 arrays; every division is a floor
division (``np.floor_divide``), every shift a multiplication or floor division by a power of two, so the
results are defined for negative values too. The constants are derived from float scales once, at
calibration time, by the ``*_params`` functions below; the PyTorch (``qpipe.pipeline.intops``) and ONNX
(``qpipe.export.intops``) versions take the same constants and must agree with these bit for bit.

Where qpipe differs from the I-ViT reference code it says so (``differs:``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INT32_MAX = 2**31 - 1
SOFTMAX_N = 15        # ShiftExp precision of IntSoftmax (I-ViT PyTorch code; its TVM copy uses 16)
GELU_N = 17           # ShiftExp precision of IntGELU (the ViT seed; I-ViT uses 23)
OUT_BITS = 8          # IntSoftmax output / IntGELU sigmoid bits
SQRT_ITERS = 20       # Newton iterations of the integer square root, from SQRT_START (I-BERT: 10, see isqrt)
SQRT_START = 2**16
MAX_SHIFT = 62        # 2^k must fit in int64


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


# ---------------------------------------------------------------- dyadic requantisation

@dataclass(frozen=True)
class Dyadic:
    """A real multiplier as ``m / 2^k`` (``m`` int, |m| < 2^31, 1 <= k <= 62); per channel when a tuple."""

    m: tuple[int, ...]
    k: tuple[int, ...]


def dyadic(multiplier) -> Dyadic:
    """``m, e = frexp(M)``, ``m_int = round(m * 2^31)``, ``k = 31 - e`` (ALGORITHMS.md section 4), per element.

    Multipliers so small that ``k`` would pass 62 lose low bits of ``m`` instead (they round to 0 anyway)."""
    ms, ks = [], []
    for v in np.atleast_1d(np.asarray(multiplier, dtype=np.float64)).tolist():
        if not math.isfinite(v):
            raise ValueError(f"requantisation multiplier {v} is not finite")
        if v == 0.0:
            ms.append(0)
            ks.append(1)
            continue
        mant, e = math.frexp(v)
        m, k = round(mant * 2**31), 31 - e
        if abs(m) == 2**31:      # mantissa rounded up to 1.0
            m, k = m // 2, k - 1
        if k > MAX_SHIFT:
            m, k = round(m / 2 ** (k - MAX_SHIFT)), MAX_SHIFT
        if k < 1:
            raise ValueError(f"requantisation multiplier {v} is too large (>= 2^30)")
        ms.append(m)
        ks.append(k)
    return Dyadic(tuple(ms), tuple(ks))


def requantize(x, m, k, zero_point=0, qmin=None, qmax=None) -> np.ndarray:
    """``y = floor((x * m + 2^(k-1)) / 2^k) + z``, clamped to [qmin, qmax] (round half up; int64).

    ``m`` and ``k`` broadcast against ``x`` (shape them for per-channel use). Needs |x * m| < 2^62."""
    x, m, k = _i64(x), _i64(m), _i64(k)
    y = np.floor_divide(x * m + np.left_shift(np.int64(1), k - 1), np.left_shift(np.int64(1), k))
    y = y + _i64(zero_point)
    if qmin is not None or qmax is not None:
        y = np.clip(y, qmin, qmax)
    return y


def embedding_table(w_int, row_scale, out_scale: float, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """An embedding table's integer rows (``w_int`` [V, D], one scale per row) requantised once to the output
    grid: ``requantize(w, dyadic(s_row / s_out))`` per row, clamped to [qmin, qmax] (int64 [V, D]). Gathering a row
    of it equals gathering the integer row and requantising it, which the integer graph then never does at run
    time."""
    w = _i64(w_int)
    d = dyadic(np.broadcast_to(np.asarray(row_scale, np.float64), (w.shape[0],)) / out_scale)
    return requantize(w, _i64(d.m)[:, None], _i64(d.k)[:, None], zero_point, qmin, qmax)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # = 1 / (1 + e^-x), without overflow


_erf = np.vectorize(math.erf, otypes=[np.float64])


# elementwise functions a lookup table can stand for: name -> f(x, alpha) in float64 (alpha: the op's constant)
TABLE_FUNCTIONS = {
    "gelu": lambda x, a: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),   # BERT's, nn.GELU()
    "gelu_tanh": lambda x, a: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "tanh": lambda x, a: np.tanh(x),
    "sigmoid": lambda x, a: _sigmoid(x),
    "hardswish": lambda x, a: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "hardsigmoid": lambda x, a: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "elu": lambda x, a: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0.0))),
    "leaky_relu": lambda x, a: np.where(x >= 0, x, a * x),
}


def activation_table(fn: str, alpha: float, in_scale: float, in_zero_point: int, in_qmin: int, in_qmax: int,
                     out_scale: float, out_zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """An elementwise function of a b-bit input as a table over the input's codes: entry ``q - in_qmin`` is
    ``clip(rint(f((q - z_in) s_in) / s_out) + z_out, qmin, qmax)`` with f in float64 (``TABLE_FUNCTIONS``), the
    float function rounded to the output grid: at most half an output step from f (int64 [in_qmax - in_qmin + 1])."""
    q = np.arange(in_qmin, in_qmax + 1, dtype=np.int64)
    y = TABLE_FUNCTIONS[fn]((q - in_zero_point).astype(np.float64) * in_scale, alpha)
    return np.clip(np.rint(y / out_scale) + out_zero_point, qmin, qmax).astype(np.int64)


def lookup(x, table, in_qmin: int) -> np.ndarray:
    """``table[x - in_qmin]``: the integer op a table stands for."""
    return np.asarray(table, np.int64)[_i64(x) - in_qmin]


def add(a, b, ra: Dyadic, rb: Dyadic, zero_point: int, qmin: int, qmax: int, za: int = 0, zb: int = 0):
    """Integer residual addition: both operands requantised to the output scale, summed, clamped."""
    ya = requantize(_i64(a) - za, ra.m[0], ra.k[0])
    yb = requantize(_i64(b) - zb, rb.m[0], rb.k[0])
    return np.clip(ya + yb + zero_point, qmin, qmax)


# ---------------------------------------------------------------- ShiftExp, IntSoftmax, IntGELU

def shiftexp_x0(scale: float) -> int:
    """``x0 = floor(-1 / s)``: the integer that represents -1 (in log2 units) at input scale ``s``."""
    if not scale > 0:
        raise ValueError(f"ShiftExp needs a positive input scale, got {scale}")
    return math.floor(-1.0 / scale)


def shift_exp(x, x0: int, n: int) -> np.ndarray:
    """2^n * exp(x * s) for integer ``x <= 0`` at scale ``s`` (``x0 = shiftexp_x0(s)``); output scale s / 2^n.

    ``x * log2(e)`` as ``x + x/2 - x/16``; the power of two split into an integer part ``q`` (a shift) and a
    remainder ``r`` with ``2^(r s) ~= 1 + r s / 2``."""
    x = _i64(x)
    x = x + np.floor_divide(x, 2) - np.floor_divide(x, 16)
    x = np.maximum(x, n * x0)
    q = np.floor_divide(x, x0)
    r = x - x0 * q
    e = np.floor_divide(r, 2) - x0
    return e * np.left_shift(np.int64(1), n - q)   # n - q in [0, n]


MASKED = -(2**40)
"""The IntSoftmax input of a masked position (``masked_fill(mask, -inf)`` before the softmax: attention padding).
A real input lies on a grid of at most 16 bits, so it is never this low."""
MASK_DIFF = -(2**32)
"""IntSoftmax: a position at least this far below its row's maximum is masked and gets no weight (a row of masked
positions only keeps them all, uniform, as a float softmax of equal values does)."""


def softmax(x, x0: int, axis: int = -1, n: int = SOFTMAX_N, bits: int = OUT_BITS) -> np.ndarray:
    """Shiftmax: integer softmax along ``axis``; output unsigned ``bits`` wide at scale 2^-bits.

    differs: I-ViT divides by 2^(31 - bits + 1) for a signed grid with scale 2^-(bits-1); the output is
    non-negative, so qpipe keeps the extra bit (value 2^bits = probability 1 is clamped to 2^bits - 1).
    Positions at ``MASKED`` (``MASK_DIFF`` below the row's maximum) weigh 0, where I-ViT, which has no mask,
    would give them ShiftExp's floor 2^-n: the real positions get exactly the output of the row without them."""
    x = _i64(x)
    d = x - x.max(axis=axis, keepdims=True)
    e = np.where(d < MASK_DIFF, 0, shift_exp(d, x0, n))
    s = np.minimum(e.sum(axis=axis, keepdims=True), INT32_MAX)
    factor = np.floor_divide(INT32_MAX, s)
    return np.minimum(np.floor_divide(e * factor, 2 ** (31 - bits)), 2**bits - 1)


GELU_SIGMOID_K = 1.702  # GELU(x) ~= x * sigmoid(1.702 x)


def gelu_x0(scale: float) -> int:
    return shiftexp_x0(GELU_SIGMOID_K * scale)


def gelu(x, x0: int, axis: int = -1, n: int = GELU_N, bits: int = OUT_BITS) -> np.ndarray:
    """ShiftGELU: ``x * sigmoid(1.702 x)``; output (int64) at scale ``s * 2^-bits``, ``x0 = gelu_x0(s)``.

    sigmoid(t) = e^(t - m) / (e^(t - m) + e^(-m)) with ``m = max(t, 0)`` elementwise, so both ShiftExp inputs
    are <= 0 and the larger exponent is exactly 0.
    differs: I-ViT takes ``m`` as the row maximum; then for inputs far below it ShiftExp's floor at 2^-n takes
    over (GELU(-5.1) came out as -0.16 at s = 0.04, n = 17) and a wholly negative row feeds -m > 0. The sigmoid
    keeps ``bits`` fraction bits (scale 2^-bits), like ``softmax``. ``axis`` is unused (elementwise)."""
    x = _i64(x)
    m = np.maximum(x, 0)
    e1 = shift_exp(x - m, x0, n)
    e2 = shift_exp(-m, x0, n)
    factor = np.floor_divide(INT32_MAX, np.minimum(e1 + e2, INT32_MAX))
    sig = np.floor_divide(e1 * factor, 2 ** (31 - bits))
    return x * sig


# ---------------------------------------------------------------- IntLayerNorm

def isqrt_newton(v) -> np.ndarray:
    """Integer square root of ``v >= 0`` by ``SQRT_ITERS`` Newton steps ``k <- floor((k + floor(v/k)) / 2)``
    from ``k = 2^16``: floor(sqrt(v)) or one above it for 1 <= v < 2^46; v = 0 is taken as 1 (k stays >= 1).

    differs: I-BERT / I-ViT stop after 10 steps, which from 2^16 leaves k far above the root when v < 2^12
    (v = 1 gives 64): a LayerNorm row with a small spread would be scaled down by that factor."""
    v = np.maximum(_i64(v), 1)
    k = np.full_like(v, SQRT_START)
    for _ in range(SQRT_ITERS):
        k = np.floor_divide(k + np.floor_divide(v, k), 2)
    return k


@dataclass(frozen=True)
class LayerNormParams:
    """Constants of one IntLayerNorm: per-channel output multiplier ``m / 2^k`` (gamma folded in) and the
    integer bias ``b`` (beta folded in, at the pre-shift scale), output grid [qmin, qmax] with zero point z."""

    m: tuple[int, ...]
    k: int
    b: tuple[int, ...]
    zero_point: int
    qmin: int
    qmax: int


def layernorm_params(weight, bias, out_scale: float, out_zero_point: int, qmin: int, qmax: int) -> LayerNormParams:
    """Fold LayerNorm's affine and the output quantizer into one per-channel dyadic multiplier and bias.

    The normalised integer ``y * floor((2^31 - 1) / sqrt_int) / 2`` has scale ``sqrt(D) / 2^30``; channel c is
    then multiplied by ``gamma_c * sqrt(D) / 2^30 / s_out`` and shifted by ``beta_c / s_out``. One shared ``k``
    (chosen for the largest |multiplier|) keeps the per-channel arithmetic one broadcast multiply.
    differs: I-ViT adds ``floor(beta / gamma / scale)`` before multiplying by gamma (undefined for gamma = 0)."""
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    d = w.size
    mult = w * math.sqrt(d) / 2**30 / out_scale
    top = float(np.abs(mult).max())
    k = dyadic(top).k[0] if top > 0 else 31
    big = float(np.abs(b).max()) / out_scale
    if big > 0:  # keep |b| <= 2^60 so that y_n * m + b stays inside int64
        k = max(1, min(k, math.floor(math.log2(2.0**60 / big))))
    m = np.round(mult * 2.0**k).astype(np.int64)
    bi = np.round(b / out_scale * 2.0**k).astype(np.int64)
    return LayerNormParams(tuple(m.tolist()), int(k), tuple(bi.tolist()), int(out_zero_point), qmin, qmax)


def layernorm(x, p: LayerNormParams, axis: int = -1) -> np.ndarray:
    """I-BERT/I-ViT integer LayerNorm over the last axis (no epsilon), output requantised to ``p``'s grid.

    ``mu = floor((sum x + floor(D/2)) / D)`` (the rounded mean), ``y = x - mu``, ``var = sum y^2``,
    ``y_n = floor(y * floor((2^31 - 1) / isqrt(var)) / 2)``, ``out = floor((y_n m_c + b_c + 2^(k-1)) / 2^k) + z``."""
    if axis not in (-1, np.ndim(x) - 1):
        raise ValueError("IntLayerNorm normalises the last axis")
    x = _i64(x)
    d = x.shape[-1]
    mu = np.floor_divide(x.sum(axis=-1, keepdims=True) + d // 2, d)
    y = x - mu
    var = (y * y).sum(axis=-1, keepdims=True)
    k = isqrt_newton(var)
    factor = np.floor_divide(INT32_MAX, k)
    yn = np.floor_divide(y * factor, 2)
    out = np.floor_divide(yn * _i64(p.m) + _i64(p.b) + (1 << (p.k - 1)), 1 << p.k) + p.zero_point
    return np.clip(out, p.qmin, p.qmax)
