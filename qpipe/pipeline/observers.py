"""Range estimators (vectorised over channels, float64) and activation observers.

An observer has two steps: ``observe(x)`` collects statistics during calibration, ``qparams()`` concludes.
Each estimator mirrors a plain NumPy function in ``qpipe.reference.observers`` and is tested against it.
"""

from __future__ import annotations

import torch

from qpipe.reference.observers import (
    LP_CANDIDATES,
    LP_PERCENTILE_ABOVE,
    MSE_CANDIDATES,
    SQNR_BINS,
    SQNR_GAMMA,
    SQNR_MIN_WIDTH,
)

from .quant import QuantSpec, fake_quantize

WEIGHT_ESTIMATORS = ("absmax", "minmax", "lp_norm", "sqnr", "mse")
ACTIVATION_OBSERVERS = ("minmax", "ema_minmax", "ema_absmax", "percentile", "mse", "sqnr", "lp_norm")


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Scale (float64) and zero point (int64) per channel covering [lo, hi], zero kept representable."""
    lo = torch.clamp(lo.double(), max=0.0)
    hi = torch.clamp(hi.double(), min=0.0)
    if spec.symmetric:
        a = torch.maximum(lo.abs(), hi) if spec.signed else hi
        s = a / spec.qmax
        z = torch.zeros_like(s, dtype=torch.int64)
    else:
        s = (hi - lo) / (spec.qmax - spec.qmin)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(spec.qmin - torch.round(lo / safe), spec.qmin, spec.qmax).to(torch.int64)
        z = torch.where(s > 0, z, torch.zeros_like(z))
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, z


def _fq_rows(x2d, s, z, spec):
    # per-row fake quantization in float64 (search only; the frozen model uses float32 scales)
    q = torch.clamp(torch.round(x2d / s[:, None]) + z[:, None], spec.qmin, spec.qmax)
    return (q - z[:, None]) * s[:, None]


def _pick(errs: list[torch.Tensor], cands: list[tuple[torch.Tensor, torch.Tensor]]):
    e = torch.stack(errs, dim=1)          # [C, K]
    best = torch.argmin(e, dim=1)         # first minimum, like the reference's strict '<'
    s = torch.stack([c[0] for c in cands], dim=1).gather(1, best[:, None])[:, 0]
    z = torch.stack([c[1] for c in cands], dim=1).gather(1, best[:, None])[:, 0]
    return s, z


def absmax(x2d, spec):
    m = x2d.abs().amax(dim=1)
    return qparams_from_range(-m, m, spec)


def minmax(x2d, spec):
    return qparams_from_range(x2d.amin(dim=1), x2d.amax(dim=1), spec)


def percentile(x2d, spec, pct: float):
    if spec.symmetric:
        m = torch.quantile(x2d.abs(), pct / 100, dim=1)
        return qparams_from_range(-m, m, spec)
    return qparams_from_range(torch.quantile(x2d, 1 - pct / 100, dim=1), torch.quantile(x2d, pct / 100, dim=1), spec)


def lp_norm(x2d, spec, p: float):
    srt, _ = torch.sort(x2d, dim=1)
    n = srt.shape[1]
    errs, cands = [], []
    for k in range(LP_CANDIDATES):
        i = k if n <= LP_PERCENTILE_ABOVE else int(round(k * n / 100_000))
        if i >= n - 1 - i:
            break
        s, z = qparams_from_range(srt[:, i], srt[:, n - 1 - i], spec)
        errs.append((_fq_rows(x2d, s, z, spec) - x2d).abs().pow(p).sum(dim=1))
        cands.append((s, z))
    return _pick(errs, cands)


def mse(x2d, spec, p: float = 2.0):
    lo, hi = x2d.amin(dim=1), x2d.amax(dim=1)
    if spec.symmetric:
        m = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -m, m
    errs, cands = [], []
    for i in range(1, MSE_CANDIDATES + 1):
        s, z = qparams_from_range(lo * i / MSE_CANDIDATES, hi * i / MSE_CANDIDATES, spec)
        errs.append((_fq_rows(x2d, s, z, spec) - x2d).abs().pow(p).mean(dim=1))
        cands.append((s, z))
    return _pick(errs, cands)


def sqnr(x2d, spec, gamma: float = SQNR_GAMMA):
    """AIMET TF-enhanced estimator: histogram noise of each candidate, clipped bins weighted by gamma."""
    lo = torch.clamp(x2d.amin(dim=1), max=0.0)
    hi = torch.clamp(x2d.amax(dim=1), min=0.0)
    hi = torch.where(hi - lo < SQNR_MIN_WIDTH, lo + SQNR_MIN_WIDTH, hi)
    width = (hi - lo) / SQNR_BINS
    idx = torch.clamp(((x2d - lo[:, None]) / width[:, None]).floor().long(), 0, SQNR_BINS - 1)
    counts = torch.zeros(x2d.shape[0], SQNR_BINS, dtype=torch.float64, device=x2d.device)
    counts.scatter_add_(1, idx, torch.ones_like(x2d, dtype=torch.float64))
    mids = lo[:, None] + width[:, None] * (torch.arange(SQNR_BINS, device=x2d.device, dtype=torch.float64) + 0.5)
    levels = spec.qmax - spec.qmin
    cands = []
    if spec.symmetric:
        dmax = 2 * torch.maximum(lo.abs(), hi.abs()) / levels
        zero = torch.zeros_like(dmax, dtype=torch.int64)
        cands = [(dmax * k / 100, zero) for k in range(1, 102)]
    else:
        dobs = (hi - lo) / levels
        offsets = torch.linspace(-levels, 0, 21, dtype=torch.float64)
        for k in range(1, 18):
            for o in offsets:
                z = torch.full_like(dobs, spec.qmin - torch.round(o).item(), dtype=torch.int64)
                cands.append((dobs * k / 16, z))
        cands.append((dobs, torch.clamp(spec.qmin - torch.round(lo / dobs), spec.qmin, spec.qmax).long()))
    errs = []
    for s, z in cands:
        xq = _fq_rows(mids, s, z, spec)
        lo_e, hi_e = (spec.qmin - z) * s, (spec.qmax - z) * s
        clipped = (mids < lo_e[:, None]) | (mids > hi_e[:, None])
        w = torch.where(clipped, gamma, 1.0)
        e = (counts * w * (xq - mids) ** 2).sum(dim=1)
        errs.append(torch.where(s > 0, e, torch.full_like(e, float("inf"))))
    return _pick(errs, cands)


def estimate(x2d: torch.Tensor, method: str, spec: QuantSpec, *, p: float = 2.4, pct: float = 99.99,
             gamma: float = SQNR_GAMMA):
    """Scale [C] (float64) and zero point [C] (int64) of the rows of ``x2d`` [C, N] by ``method``."""
    x2d = x2d.detach().double()
    if method == "absmax":
        return absmax(x2d, spec)
    if method == "minmax":
        return minmax(x2d, spec)
    if method == "lp_norm":
        return lp_norm(x2d, spec, p)
    if method == "mse":
        return mse(x2d, spec)
    if method == "sqnr":
        return sqnr(x2d, spec, gamma)
    if method == "percentile":
        return percentile(x2d, spec, pct)
    raise ValueError(f"unknown range estimator {method!r}")


SAMPLE_CAP = 1 << 20        # values kept per activation for the search-based observers
SAMPLES_PER_BATCH = 1 << 16


class ActivationObserver:
    """Collects statistics of one activation tensor (per tensor) and concludes to (scale, zero_point).

    ``observe(x, index)`` keeps one small record per calibration batch (its min, max and, for the search-based
    observers, a subsample seeded by the batch index); ``qparams()`` replays the records in batch order. So ranks
    of a data-parallel run can each observe their batches, exchange the records (``merge``), and conclude to the
    scale a single process would have found."""

    def __init__(self, method: str, spec: QuantSpec, momentum: float = 0.95, pct: float = 99.99,
                 p: float = 2.4, seed: int = 0):
        if method not in ACTIVATION_OBSERVERS:
            raise ValueError(f"unknown activation observer {method!r}; use one of {ACTIVATION_OBSERVERS}")
        self.method, self.spec, self.momentum, self.pct, self.p = method, spec, momentum, pct, p
        self.seed = seed
        self.records: dict[int, tuple] = {}   # batch index -> (lo, hi, samples or None)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, index: int | None = None) -> None:
        index = len(self.records) if index is None else index
        x = x.detach().float()
        lo, hi = float(x.min()), float(x.max())
        samples = None
        if self.method in ("percentile", "mse", "sqnr", "lp_norm"):
            flat = x.reshape(-1).cpu()
            if flat.numel() > SAMPLES_PER_BATCH:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                flat = flat[torch.randperm(flat.numel(), generator=gen)[:SAMPLES_PER_BATCH]]
            samples = flat.double()
        self.records[index] = (lo, hi, samples)

    def merge(self, records: dict[int, tuple]) -> None:
        self.records.update(records)

    def qparams(self) -> tuple[float, int]:
        if not self.records:
            raise RuntimeError("observer saw no data; calibration data is empty")
        lo = hi = None
        samples, n = [], 0
        m = self.momentum
        for i in sorted(self.records):
            blo, bhi, bs = self.records[i]
            blo, bhi = torch.tensor(blo, dtype=torch.float64), torch.tensor(bhi, dtype=torch.float64)
            if self.method == "ema_absmax":
                a = torch.maximum(blo.abs(), bhi.abs())
                blo, bhi = -a, a
            if lo is None:
                lo, hi = blo, bhi
            elif self.method.startswith("ema_"):
                lo, hi = m * lo + (1 - m) * blo, m * hi + (1 - m) * bhi
            else:
                lo, hi = torch.minimum(lo, blo), torch.maximum(hi, bhi)
            if bs is not None and n < SAMPLE_CAP:
                samples.append(bs)
                n += bs.numel()
        if self.method in ("minmax", "ema_minmax", "ema_absmax"):
            s, z = qparams_from_range(lo[None], hi[None], self.spec)
        else:
            s, z = estimate(torch.cat(samples)[None], self.method, self.spec, p=self.p, pct=self.pct)
        return float(torch.tensor(s[0].item(), dtype=torch.float32)), int(z[0])


__all__ = ("WEIGHT_ESTIMATORS", "ACTIVATION_OBSERVERS", "estimate", "ActivationObserver", "fake_quantize")
