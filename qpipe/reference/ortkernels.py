"""onnxruntime's fused uint8 kernels (MLAS, x86 CPU), written plainly in NumPy: the arithmetic that the
optimised session applies to a qpipe QDQ export, from onnxruntime's ``qlinearconv.cc``, ``quantize.cpp``
(MlasRequantizeOutput), ``qladd_avx2.cpp`` (MlasQLinearAdd, also used on AVX-512) and ``qlgavgpool.cpp``.

Every float step is float32 (``np.float32`` arithmetic is IEEE single, as the kernels'); an FMA is its exact
product and sum in float64, rounded once to float32 (exact there: an 8-bit code times a float32 has 32
significant bits). ``rne``: round half to even, as ``cvtps2dq`` under the default rounding mode.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def requant_multiplier(s_in: float, s_w: np.ndarray | float, s_out: float) -> np.ndarray:
    """QLinearConv / QGemm: M[c] = f32(f32(s_in * s_w[c]) / s_out)."""
    return (F32(s_in) * np.asarray(s_w, dtype=F32)) / F32(s_out)


def requantize(acc: np.ndarray, m: np.ndarray | float, zp: int, qmin: int = 0, qmax: int = 255) -> np.ndarray:
    """MlasRequantizeOutput: f32(acc) * M, clamped to [qmin - zp, qmax - zp], rounded half to even, + zp.
    ``acc``: the exact int32 accumulator (bias included)."""
    v = np.asarray(acc, dtype=np.int64).astype(F32) * np.asarray(m, dtype=F32)
    v = np.minimum(np.maximum(v, F32(qmin - zp)), F32(qmax - zp))
    return (np.rint(v) + zp).astype(np.int64)


def _fma(a: np.ndarray, b: float, c: np.ndarray | float) -> np.ndarray:
    return (np.asarray(a, np.float64) * np.float64(F32(b)) + np.asarray(c, np.float64)).astype(F32)


def qlinear_add(qa: np.ndarray, sa: float, za: int, qb: np.ndarray, sb: float, zb: int, sc: float,
                zc: int) -> np.ndarray:
    """MlasQLinearAdd on uint8 codes: rA = f32(sa/sc), rB = f32(sb/sc), F = f32(zc - f32(f32(rA za) + f32(rB zb))),
    y = sat_u8(rne(fma(a, rA, fma(b, rB, F))))."""
    ra, rb = F32(sa) / F32(sc), F32(sb) / F32(sc)
    f = F32(zc) - (ra * F32(za) + rb * F32(zb))
    v = _fma(qa, ra, _fma(qb, rb, f))
    return np.clip(np.rint(v), 0, 255).astype(np.int64)


def qlinear_global_avg_pool(qx: np.ndarray, sx: float, zx: int, sy: float, zy: int) -> np.ndarray:
    """QLinearGlobalAveragePool (N, C, H, W) uint8 -> (N, C, 1, 1): the exact integer sum minus zx * H * W,
    requantized at f32(sx / f32(sy * f32(H W)))."""
    count = qx.shape[2] * qx.shape[3]
    acc = np.asarray(qx, np.int64).sum(axis=(2, 3), keepdims=True) - zx * count
    m = F32(sx) / (F32(sy) * F32(count))
    return requantize(acc, m, zy)
