"""Learned-clipping quantizers for quantization-aware training (the NumPy twin and the definitions are in
``qpipe.reference.apot``): values ``alpha * code / D`` on a level set, projection to the nearest level, a learnable
clipping ``alpha`` with the paper's clipping-function gradient and a straight-through estimator for the input.

Two level sets share that machinery:

- ``apot``: additive powers-of-two levels (Li, Dong & Wang, ICLR 2020), codes up to D = 4, 10, 48, 100;
- ``uniform``: the comparison, codes ``-D..D`` (signed, D = 2^(b-1) - 1) or ``0..D`` (unsigned, D = 2^b - 1) for
  weights; activations use the full integer range of ``QuantSpec`` (signed ``-D-1..D``), so a frozen uniform
  quantizer is exactly ``QuantizeLinear -> DequantizeLinear`` at scale ``alpha / D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpipe.reference import apot as ref

KINDS = ("apot", "uniform")


@dataclass(frozen=True)
class Levels:
    """A b-bit level set: ``signed`` = symmetric about 0 (weights, signed activations)."""

    kind: str
    bits: int
    signed: bool
    weight: bool = False   # weights: uniform codes are narrow (-D..D), activations take the full range

    @property
    def denominator(self) -> int:
        if self.kind == "apot":
            return ref.denominator(self.bits, self.signed)
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        if self.kind == "apot":
            return int(ref.level_codes(self.bits, self.signed)[0])
        if not self.signed:
            return 0
        return -self.denominator - (0 if self.weight else 1)

    @property
    def qmax(self) -> int:
        return self.denominator

    def codes(self, device=None) -> torch.Tensor:
        """All codes, ascending (int64)."""
        if self.kind == "apot":
            return torch.as_tensor(ref.level_codes(self.bits, self.signed), device=device)
        return torch.arange(self.qmin, self.qmax + 1, device=device)


def APoTSpec(bits: int, signed: bool) -> Levels:
    """b-bit APoT levels: ``signed`` = weights (the (b-1)-bit set mirrored by sign, ternary at 2 bits)."""
    return Levels("apot", bits, signed, weight=signed)


def _nearest(v: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (ascending) for values ``v`` in code units; ties to the lower code."""
    c = codes.to(v.dtype)
    mids = (c[1:] + c[:-1]) / 2
    return torch.searchsorted(mids, v.contiguous(), right=False)


def act_step(alpha: torch.Tensor | float, levels: Levels) -> torch.Tensor:
    """float32 step of an activation grid: APoT's fine cell alpha / (F D) or the uniform step alpha / D."""
    a = torch.as_tensor(alpha, dtype=torch.float32).detach()
    div = ref.FINE * levels.denominator if levels.kind == "apot" else levels.denominator
    return a / torch.tensor(float(div), dtype=torch.float32)


def codes_of(x: torch.Tensor, alpha: torch.Tensor, spec: Levels) -> torch.Tensor:
    """Integer level codes (int64) of ``x`` at clipping ``alpha``.

    Weights: the nearest level of clip(x / alpha, -1, 1) (float64; APoT ties to the lower level, uniform half to
    even). Activations: APoT takes the fine cell floor(x / step) in float32, then the nearest-level table
    (reference.apot); uniform is QuantizeLinear's clamp(round(x / step), qmin, qmax) in float32."""
    d = spec.denominator
    if spec.weight:
        v = torch.clamp(x.double() / alpha.double(), -1.0, 1.0) * d
        if spec.kind == "uniform":
            return torch.round(v).long()
        codes = spec.codes(x.device)
        return codes[_nearest(v, codes)]
    step = act_step(alpha, spec).to(x.device)
    if spec.kind == "uniform":
        return torch.clamp(torch.round(x.float() / step), spec.qmin, spec.qmax).long()
    if spec.signed:
        raise ValueError("APoT activations are unsigned (inputs after a ReLU)")
    f = torch.nan_to_num(torch.clamp(torch.floor(x.float() / step), 0, ref.FINE * d - 1), nan=0.0).long()
    table = torch.as_tensor(ref.fine_table(spec.bits), device=x.device)
    return table[f]


def code_scale(alpha: torch.Tensor, spec: Levels) -> torch.Tensor:
    """Value of one code, alpha / D in alpha's dtype (float32 alphas: DequantizeLinear's scale, exactly)."""
    return alpha / torch.tensor(float(spec.denominator), dtype=alpha.dtype, device=alpha.device)


class _ClipQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, spec: Levels):
        code = codes_of(x, alpha, spec)
        y = code.to(x.dtype) * code_scale(alpha, spec).to(x.dtype)
        y = torch.where(torch.isnan(x), x, y)   # NaN stays NaN, so a diverged run shows in the loss
        v = x / alpha
        ctx.save_for_backward(v, code.to(x.dtype) / spec.denominator)
        ctx.lo, ctx.hi = spec.qmin / spec.denominator, spec.qmax / spec.denominator
        return y

    @staticmethod
    def backward(ctx, g):
        v, q = ctx.saved_tensors
        inside = (v >= ctx.lo) & (v <= ctx.hi)
        grad_x = g * inside.to(g.dtype)                    # straight through inside the range, 0 outside
        d_alpha = torch.where(inside, q - v, q)            # outside: the clipped level (1, -1 / lo, or 0)
        return grad_x, (g * d_alpha).sum().reshape(()).to(g.dtype), None


def clip_quantize(x: torch.Tensor, alpha: torch.Tensor, spec: Levels) -> torch.Tensor:
    """code(x) * alpha / D: the nearest level of x / alpha, clipped to the range; gradients to x (STE inside the
    range) and to alpha (inside: level - x / alpha; outside: the clipped level, i.e. sign(x) for weights)."""
    return _ClipQuant.apply(x, alpha, spec)


def apot_quantize(x: torch.Tensor, alpha: torch.Tensor, spec: Levels) -> torch.Tensor:
    """alpha * (nearest APoT level of x / alpha, clipped to the range); gradients to x (STE) and to alpha."""
    return clip_quantize(x, alpha, spec)


def normalize_weights(w: torch.Tensor) -> torch.Tensor:
    """(w - mean) / std over the layer (population std), differentiable."""
    return (w - w.mean()) / w.std(unbiased=False)
