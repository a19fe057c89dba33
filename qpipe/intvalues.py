"""What a value of the integer-only model is, shared by the PyTorch integer model (``qpipe.pipeline.intmodel``)
and the ONNX stage that writes the same computation (``qpipe.export.intgraph``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qpipe.errors import QpipeError
from qpipe.reference.intops import MASKED


@dataclass(frozen=True)
class Grid:
    """int64 values on a b-bit grid: real value = (q - z) * s."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


MASK_FILL_MAGNITUDE = 1e4
"""A masked_fill whose constant is at least this far below zero (-inf, ``torch.finfo(dtype).min``) masks
attention scores out of a softmax."""


def masked_below(scale: float, zero_point: int, qmin: int) -> float:
    """Softmax input values below this (half a step under the grid's lowest point, in float32) are off the grid:
    scores a ``masked_fill(mask, -inf)`` masked between their quantizer and the softmax."""
    return float(np.float32((qmin - zero_point - 0.5) * scale))


@dataclass(frozen=True)
class MaskedGrid:
    """A grid's integers with the positions ``masked_fill(mask, -inf)`` masked set to
    ``qpipe.reference.intops.MASKED``: attention scores, read only by an IntSoftmax (which gives them no weight)."""

    grid: Grid


def masked_fill_value(grid: Grid, value: float) -> tuple[int, Grid | MaskedGrid]:
    """The integer ``masked_fill(mask, value)`` writes on ``grid``'s values, and what the result is: a masking
    fill (-inf, ``torch.finfo(dtype).min``) gives ``MASKED`` (for the IntSoftmax); another negative fill the
    grid's lowest value, a positive one its highest."""
    if value <= -MASK_FILL_MAGNITUDE:
        return MASKED, MaskedGrid(grid)
    return (grid.qmin if value < 0 else grid.qmax), grid


@dataclass(frozen=True)
class Acc:
    """An integer accumulator (zero point 0, unbounded): real value = acc * scale, ``scale`` a float or a
    per-channel tuple along ``axis``; ``bounds``: a ReLU / ReLU6 / clamp to (lo, hi) is pending (folded into the next
    requantisation)."""

    scale: float | tuple[float, ...]
    axis: int = -1
    bounds: tuple[float, float] | None = None


RELU = (0.0, math.inf)


def merge_bounds(a: tuple[float, float] | None, b: tuple[float, float]) -> tuple[float, float]:
    """Two clamps in a row: the intersection of their ranges."""
    return b if a is None else (max(a[0], b[0]), min(a[1], b[1]))


def clip_range(grid: Grid, bounds: tuple[float, float] | None) -> tuple[int, int]:
    """The grid's [qmin, qmax] narrowed to a folded activation's float bounds: ``round(b / s) + z`` (half to even,
    as the fake quantisation of the clamped value rounds); a ReLU gives [max(qmin, z), qmax]."""
    lo, hi = grid.qmin, grid.qmax
    if bounds is None:
        return lo, hi
    if bounds[0] > -math.inf:
        lo = max(lo, round(bounds[0] / grid.scale) + grid.zero_point)
    if bounds[1] < math.inf:
        hi = min(hi, round(bounds[1] / grid.scale) + grid.zero_point)
    return lo, max(lo, hi)


def broadcast_shape(n: int, axis: int, ndim: int) -> tuple[int, ...]:
    """Broadcast shape of a per-channel vector of length n along ``axis`` of an ndim tensor (``()`` for one)."""
    if n == 1:
        return ()
    shape = [1] * ndim
    shape[axis] = n
    return tuple(shape)


def require_8bit(grid: Grid, what: str) -> None:
    """The integer kernels (ConvInteger, MatMulInteger, MaxPool on int8) take 8-bit containers."""
    if grid.qmax - grid.qmin > 255:
        raise QpipeError(f"the integer-only graph needs 8-bit inputs to {what}, got {grid}")


def scales(v) -> tuple[float, ...]:
    """A scale (a number or per-channel values) as a tuple of floats."""
    return tuple(float(s) for s in np.asarray(v, dtype=np.float64).reshape(-1).tolist())


def onto(value: Grid | Acc, grid: Grid, ndim: int, what: str) -> tuple[float | list[float], tuple[int, ...], int]:
    """(multiplier, its broadcast shape, zero point to subtract first) that requantise ``value`` -- a grid or an
    accumulator of an ndim tensor -- onto ``grid``."""
    if isinstance(value, Grid):
        return value.scale / grid.scale, (), value.zero_point
    if value.bounds is not None:
        raise QpipeError(f"{what}: a ReLU on an accumulator that feeds an add is not supported")
    s = scales(value.scale)
    return [v / grid.scale for v in s], broadcast_shape(len(s), value.axis, ndim), 0
