"""Range estimators in plain NumPy, one channel (row) at a time.

Every function takes ``x2d`` of shape [C, N] (C = 1 for per-tensor) and returns ``(scale[C], zero_point[C])``
as float64 / int64 arrays. Grid: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b - 1].
"""

from __future__ import annotations

import numpy as np

from .quant import fake_quantize, grid


def qparams_from_range(lo: float, hi: float, bits: int, signed: bool, symmetric: bool) -> tuple[float, int]:
    """Scale and zero point covering [lo, hi]; zero is always exactly representable."""
    qmin, qmax = grid(bits, signed)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(abs(lo), abs(hi)) if signed else hi
        s = a / qmax
        z = 0
    else:
        s = (hi - lo) / (qmax - qmin)
        z = 0 if s == 0 else int(np.clip(qmin - np.round(lo / s), qmin, qmax))
    if not s > 0:
        s = 1.0
    return s, z


def _rows(fn, x2d, *args):
    out = [fn(np.asarray(row, dtype=np.float64), *args) for row in np.atleast_2d(x2d)]
    return np.array([o[0] for o in out], dtype=np.float64), np.array([o[1] for o in out], dtype=np.int64)


def absmax(x2d, bits, signed, symmetric):
    def one(r, *a):
        m = np.abs(r).max() if r.size else 0.0
        return qparams_from_range(-m, m, *a)
    return _rows(one, x2d, bits, signed, symmetric)


def minmax(x2d, bits, signed, symmetric):
    def one(r, *a):
        return qparams_from_range(r.min() if r.size else 0.0, r.max() if r.size else 0.0, *a)
    return _rows(one, x2d, bits, signed, symmetric)


def percentile(x2d, bits, signed, symmetric, pct: float):
    def one(r, *a):
        if symmetric:
            m = np.percentile(np.abs(r), pct)
            return qparams_from_range(-m, m, *a)
        return qparams_from_range(np.percentile(r, 100 - pct), np.percentile(r, pct), *a)
    return _rows(one, x2d, bits, signed, symmetric)


def _err(r, s, z, qmin, qmax, p, mean=False):
    e = np.abs(fake_quantize(r, s, z, qmin, qmax) - r) ** p
    return e.mean() if mean else e.sum()


LP_CANDIDATES = 32          # k = 0..31 extreme values dropped at both ends (MyAdaRound's search)
LP_PERCENTILE_ABOVE = 3_200_000  # beyond this many values the k-th candidate is the k/100000 quantile


def lp_norm(x2d, bits, signed, symmetric, p: float):
    """Lp-norm search: drop the k most extreme values at both ends, k = 0..31, minimise ||Q(x) - x||_p."""
    qmin, qmax = grid(bits, signed)

    def one(r, *a):
        srt = np.sort(r)
        n = srt.size
        best = None
        for k in range(LP_CANDIDATES):
            i = k if n <= LP_PERCENTILE_ABOVE else int(round(k * n / 100_000))
            if i >= n - 1 - i:
                break
            s, z = qparams_from_range(srt[i], srt[n - 1 - i], *a)
            e = _err(r, s, z, qmin, qmax, p)
            if best is None or e < best[0]:
                best = (e, s, z)
        return best[1], best[2]
    return _rows(one, x2d, bits, signed, symmetric)


MSE_CANDIDATES = 100  # range fractions i/100, i = 1..100 (BRECQ/QDrop-style search)


def mse(x2d, bits, signed, symmetric, p: float = 2.0):
    """Shrink the observed range by i/100 (i = 1..100) and keep the one with the least mean |Q(x) - x|^p."""
    qmin, qmax = grid(bits, signed)

    def one(r, *a):
        lo, hi = r.min(), r.max()
        if symmetric:
            m = max(abs(lo), abs(hi))
            lo, hi = -m, m
        best = None
        for i in range(1, MSE_CANDIDATES + 1):
            s, z = qparams_from_range(lo * i / MSE_CANDIDATES, hi * i / MSE_CANDIDATES, *a)
            e = _err(r, s, z, qmin, qmax, p, mean=True)
            if best is None or e < best[0]:
                best = (e, s, z)
        return best[1], best[2]
    return _rows(one, x2d, bits, signed, symmetric)


SQNR_BINS = 2048    # AIMET v2 histogram
SQNR_GAMMA = 3.0    # weight of clipping noise (AIMET TF-enhanced); 1.0 is the histogram MSE
SQNR_MIN_WIDTH = 0.01


def sqnr_candidates(lo, hi, bits, signed, symmetric):
    """AIMET TF-enhanced candidates as (scale, zero_point) pairs in qpipe's convention."""
    qmin, qmax = grid(bits, signed)
    levels = qmax - qmin  # 2^b - 1
    if symmetric:
        dmax = 2 * max(abs(lo), abs(hi)) / levels
        return [(dmax * k / 100, 0) for k in range(1, 102)]
    dobs = (hi - lo) / levels
    cands = []
    for k in range(1, 18):
        d = dobs * k / 16
        for o in np.linspace(-levels, 0, 21):
            cands.append((d, int(qmin - np.round(o))))  # x_hat = (q + o) * d for q in [0, levels]
    cands.append((dobs, int(np.clip(qmin - np.round(lo / dobs), qmin, qmax))))
    return cands


def sqnr_noise(counts, mids, s, z, qmin, qmax, gamma=SQNR_GAMMA):
    xq = fake_quantize(mids, s, z, qmin, qmax)
    lo_edge, hi_edge = (qmin - z) * s, (qmax - z) * s
    w = np.where((mids < lo_edge) | (mids > hi_edge), gamma, 1.0)
    return float(np.sum(counts * w * (xq - mids) ** 2))


def sqnr(x2d, bits, signed, symmetric, gamma: float = SQNR_GAMMA):
    """AIMET's TF-enhanced (SQNR) estimator on a histogram of each row."""
    qmin, qmax = grid(bits, signed)

    def one(r, *a):
        lo, hi = min(r.min(), 0.0), max(r.max(), 0.0)
        if hi - lo < SQNR_MIN_WIDTH:
            hi = lo + SQNR_MIN_WIDTH
        counts, edges = np.histogram(r, bins=SQNR_BINS, range=(lo, hi))
        mids = (edges[:-1] + edges[1:]) / 2
        best = None
        for s, z in sqnr_candidates(lo, hi, *a):
            if not s > 0:
                continue
            e = sqnr_noise(counts, mids, s, z, qmin, qmax, gamma)
            if best is None or e < best[0]:
                best = (e, s, z)
        return best[1], best[2]
    return _rows(one, x2d, bits, signed, symmetric)


def ema(values, momentum: float = 0.95) -> float:
    """Exponential moving average: the first value initialises, then m <- momentum*m + (1-momentum)*v."""
    m = None
    for v in values:
        m = float(v) if m is None else momentum * m + (1 - momentum) * float(v)
    return m


CLIP_FRACTIONS = tuple(k / 20 for k in range(10, 21))
"""The clippings the output-error search tries: the channel's largest |w| times 0.50, 0.55, ..., 1.00."""


def output_clip(w2d, x2d, bits: int, base_scale, floor: float = 0.0):
    """Per output channel of a linear map y = x @ w.T (``w2d`` [C_out, C_in], ``x2d`` [R, C_in]: the layer's
    inputs, one row per token or patch), the symmetric scale whose nearest-rounded weights give the least summed
    squared output error ``sum_r (x_r . (w_c - Q(w_c)))^2``: ``base_scale[c]`` (the weight estimator's) or the
    channel's largest |w| times each of ``CLIP_FRACTIONS`` over qmax, at least ``floor``. A tie keeps the first:
    the base scale, then the smaller clipping. A weight-error estimator clips a channel's few large weights; when
    they meet large inputs (a transformer's outlier features) the output pays for it, which this search sees."""
    w2d, x2d = np.asarray(w2d, np.float64), np.asarray(x2d, np.float64)
    qmin, qmax = grid(bits, True)
    out = np.empty(len(w2d), np.float64)
    for c, row in enumerate(w2d):
        amax = np.abs(row).max()
        best = None
        for s in [float(base_scale[c])] + [max(amax * f / qmax, floor) for f in CLIP_FRACTIONS]:
            if not s > 0:
                continue
            d = row - fake_quantize(row, s, 0, qmin, qmax)
            e = float(((x2d @ d) ** 2).sum())
            if best is None or e < best[0]:
                best = (e, s)
        out[c] = best[1] if best is not None else float(base_scale[c])
    return out
