"""APoT quantizer in PyTorch (the NumPy twin and the definitions are in ``qpipe.reference.apot``): projection to
the additive powers-of-two levels with a learnable clipping alpha (the paper's clipping-function gradient) and a
straight-through estimator for the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qpipe.reference import apot as ref


@dataclass(frozen=True)
class APoTSpec:
    """b-bit APoT levels: ``signed`` = weights (the (b-1)-bit set mirrored by sign, ternary at 2 bits)."""

    bits: int
    signed: bool

    @property
    def denominator(self) -> int:
        return ref.denominator(self.bits, self.signed)

    def codes(self, device=None) -> torch.Tensor:
        return torch.as_tensor(ref.level_codes(self.bits, self.signed), device=device)


def _nearest(v: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (ascending) for values ``v`` in code units; ties to the lower code."""
    c = codes.to(v.dtype)
    mids = (c[1:] + c[:-1]) / 2
    return torch.searchsorted(mids, v.contiguous(), right=False)


def codes_of(x: torch.Tensor, alpha: torch.Tensor, spec: APoTSpec) -> torch.Tensor:
    """Integer level codes (int64) of ``x`` at clipping ``alpha``. Weights: nearest level of clip(x/alpha, -1, 1);
    activations: the fine cell floor(x / step) in float32, then the nearest-level table (reference.apot)."""
    codes = spec.codes(x.device)
    d = spec.denominator
    if spec.signed:
        v = torch.clamp(x.double() / alpha.double(), -1.0, 1.0) * d
        return codes[_nearest(v, codes)]
    step = torch.tensor(float(ref.activation_step(float(alpha), spec.bits)), device=x.device)
    f = torch.clamp(torch.floor(x.float() / step), 0, ref.FINE * d - 1).long()
    table = torch.as_tensor(ref.fine_table(spec.bits), device=x.device)
    return table[f]


class _APoTQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, spec: APoTSpec):
        q = codes_of(x, alpha, spec).to(x.dtype) / spec.denominator          # in units of alpha
        v = x / alpha
        lo = -1.0 if spec.signed else 0.0
        ctx.save_for_backward(v, q)
        ctx.lo = lo
        ctx.signed = spec.signed
        return q * alpha

    @staticmethod
    def backward(ctx, g):
        v, q = ctx.saved_tensors
        inside = (v >= ctx.lo) & (v <= 1.0)
        grad_x = g * inside.to(g.dtype)                                      # straight through inside the range
        outside = torch.where(v > 1.0, torch.ones_like(v), torch.full_like(v, -1.0 if ctx.signed else 0.0))
        d_alpha = torch.where(inside, q - v, outside)
        return grad_x, (g * d_alpha).sum().reshape(()), None


def apot_quantize(x: torch.Tensor, alpha: torch.Tensor, spec: APoTSpec) -> torch.Tensor:
    """alpha * (nearest APoT level of x / alpha, clipped to the range); gradients to x (STE) and to alpha."""
    return _APoTQuant.apply(x, alpha, spec)


def normalize_weights(w: torch.Tensor) -> torch.Tensor:
    """(w - mean) / std over the layer (population std), differentiable."""
    return (w - w.mean()) / w.std(unbiased=False)
