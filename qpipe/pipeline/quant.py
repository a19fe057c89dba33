"""Stateless quantization primitives in PyTorch (the NumPy twins live in ``qpipe.reference.quant``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpipe.record import grid_range

ROUNDING_MODES = ("nearest", "floor", "ceil", "stochastic")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: ``bits`` wide, signed or unsigned grid, symmetric (z = 0) or not,
    per tensor (``axis=None``) or per channel along ``axis``."""

    bits: int
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return grid_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return grid_range(self.bits, self.signed)[1]


def round_values(v: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round to integers: nearest = half to even; stochastic rounds up iff u < frac(v), u ~ U[0, 1)."""
    if mode == "nearest":
        return torch.round(v)
    if mode == "floor":
        return torch.floor(v)
    if mode == "ceil":
        return torch.ceil(v)
    if mode == "stochastic":
        lo = torch.floor(v)
        u = torch.rand(v.shape, generator=generator, dtype=v.dtype, device="cpu").to(v.device)
        return lo + (u < (v - lo)).to(v.dtype)
    raise ValueError(f"unknown rounding mode {mode!r}; use one of {ROUNDING_MODES}")


def _bcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * x.ndim
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None, mode: str = "nearest",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer codes of ``x`` (same float dtype as ``x``, integral values in [qmin, qmax])."""
    s = _bcast(scale.to(x.dtype), x, axis)
    z = _bcast(zero_point.to(x.dtype), x, axis)
    return torch.clamp(round_values(x / s, mode, generator) + z, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int | None = None) -> torch.Tensor:
    s = _bcast(scale.to(torch.float32), q, axis)
    z = _bcast(zero_point.to(torch.float32), q, axis)
    return (q.to(torch.float32) - z) * s


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> torch.Tensor:
    """Quantize then dequantize in float32, exactly as ONNX QuantizeLinear -> DequantizeLinear."""
    return dequantize(quantize(x.float(), scale.float(), zero_point, qmin, qmax, axis), scale, zero_point, axis)


def fake_quantize_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: int, qmax: int) -> torch.Tensor:
    """Fake quantization with straight-through rounding (gradient 1 inside the grid): for reconstruction."""
    v = x / scale
    v = (torch.round(v) - v).detach() + v
    return (torch.clamp(v + zero_point, qmin, qmax) - zero_point) * scale


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: float, qmin: int, qmax: int) -> torch.Tensor:
    """LSQ (Esser et al. 2020): straight-through rounding and a learnable step whose gradient is
    round(x/s) - x/s inside the grid and qmin - z / qmax - z outside, scaled by g = 1/sqrt(N * Q_P)."""
    g = 1.0 / math.sqrt(x[0].numel() * max(qmax - zero_point, 1))
    s = scale * g + (scale - scale * g).detach()
    return fake_quantize_ste(x, s, zero_point, qmin, qmax)
