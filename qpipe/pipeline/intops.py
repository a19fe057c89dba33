"""Integer-only ops in PyTorch (int64 tensors; device from the input): the twins of ``qpipe.reference.intops``.

Same constants, same floor divisions, same results bit for bit (tests/export/test_intops.py). The constants come from
the reference's ``*_params`` functions, computed once when a model is calibrated.
"""

from __future__ import annotations

import torch

from qpipe.reference.intops import (
    GELU_N,
    INT32_MAX,
    MASK_DIFF,
    OUT_BITS,
    SOFTMAX_N,
    SQRT_ITERS,
    SQRT_START,
    Dyadic,
    LayerNormParams,
)


def _fdiv(a: torch.Tensor, b) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _const(v, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.int64, device=like.device)


def requantize(x: torch.Tensor, m, k, zero_point=0, qmin=None, qmax=None) -> torch.Tensor:
    """``floor((x * m + 2^(k-1)) / 2^k) + z`` clamped to [qmin, qmax]; ``m``/``k`` broadcast (int64)."""
    x = x.to(torch.int64)
    m, k = _const(m, x), _const(k, x)
    one = torch.ones((), dtype=torch.int64, device=x.device)
    y = _fdiv(x * m + torch.bitwise_left_shift(one, k - 1), torch.bitwise_left_shift(one, k))
    y = y + _const(zero_point, x)
    if qmin is not None or qmax is not None:
        y = torch.clamp(y, qmin, qmax)
    return y


def add(a: torch.Tensor, b: torch.Tensor, ra: Dyadic, rb: Dyadic, zero_point: int, qmin: int, qmax: int,
        za: int = 0, zb: int = 0) -> torch.Tensor:
    ya = requantize(a.to(torch.int64) - za, ra.m[0], ra.k[0])
    yb = requantize(b.to(torch.int64) - zb, rb.m[0], rb.k[0])
    return torch.clamp(ya + yb + zero_point, qmin, qmax)


def shift_exp(x: torch.Tensor, x0: int, n: int) -> torch.Tensor:
    x = x.to(torch.int64)
    x = x + _fdiv(x, 2) - _fdiv(x, 16)
    x = torch.clamp(x, min=n * x0)
    q = _fdiv(x, x0)
    r = x - x0 * q
    e = _fdiv(r, 2) - x0
    return e * torch.bitwise_left_shift(torch.ones_like(q), n - q)


def softmax(x: torch.Tensor, x0: int, dim: int = -1, n: int = SOFTMAX_N, bits: int = OUT_BITS) -> torch.Tensor:
    x = x.to(torch.int64)
    d = x - x.amax(dim=dim, keepdim=True)
    e = torch.where(d < MASK_DIFF, 0, shift_exp(d, x0, n))
    s = torch.clamp(e.sum(dim=dim, keepdim=True), max=INT32_MAX)
    factor = _fdiv(torch.full_like(s, INT32_MAX), s)
    return torch.clamp(_fdiv(e * factor, 2 ** (31 - bits)), max=2**bits - 1)


def gelu(x: torch.Tensor, x0: int, dim: int = -1, n: int = GELU_N, bits: int = OUT_BITS) -> torch.Tensor:
    x = x.to(torch.int64)
    m = torch.clamp(x, min=0)
    e1 = shift_exp(x - m, x0, n)
    e2 = shift_exp(-m, x0, n)
    factor = _fdiv(torch.full_like(e1, INT32_MAX), torch.clamp(e1 + e2, max=INT32_MAX))
    return x * _fdiv(e1 * factor, 2 ** (31 - bits))


def isqrt_newton(v: torch.Tensor) -> torch.Tensor:
    v = torch.clamp(v, min=1)
    k = torch.full_like(v, SQRT_START)
    for _ in range(SQRT_ITERS):
        k = _fdiv(k + _fdiv(v, k), 2)
    return k


def layernorm(x: torch.Tensor, p: LayerNormParams) -> torch.Tensor:
    x = x.to(torch.int64)
    d = x.shape[-1]
    mu = _fdiv(x.sum(dim=-1, keepdim=True) + d // 2, d)
    y = x - mu
    var = (y * y).sum(dim=-1, keepdim=True)
    factor = _fdiv(torch.full_like(var, INT32_MAX), isqrt_newton(var))
    yn = _fdiv(y * factor, 2)
    out = _fdiv(yn * _const(p.m, x) + _const(p.b, x) + (1 << (p.k - 1)), 1 << p.k) + p.zero_point
    return torch.clamp(out, p.qmin, p.qmax)
