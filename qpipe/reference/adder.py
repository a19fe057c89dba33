"""AdderNet layers (Chen et al., CVPR 2020; huawei-noah/AdderNet) in NumPy: the reference that the PyTorch layer
and the ONNX functions are tested against.

Forward: ``Y[n, o, i, j] = -sum_{c, u, v} |X[n, c, i*s + u - p, j*s + v - p] - W[o, c, u, v]|`` (zero padding).
Backward (ALGORITHMS.md section 6): the weight gradient is ``X - W`` (full precision, the gradient of the l2
surrogate ``-1/2 (X - W)^2``), then scaled per layer to ``eta * sqrt(k) / ||g||_2`` (k = number of weights,
eta = 0.2); the input gradient is ``clip(W - X, -1, 1)`` (HardTanh, the gradient of ``-huber_1(X - W)``).
"""

from __future__ import annotations

import numpy as np

ETA = 0.2  # adaptive learning-rate scaling of the weight gradient (reference code: sqrt(k) / ||g|| / 5)


def patches(x: np.ndarray, kernel: tuple[int, int], stride: int, padding: int) -> np.ndarray:
    """(N, Ho, Wo, C * kh * kw) patches of ``x`` (N, C, H, W), zero padded, in the (c, u, v) order of W.reshape."""
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    out = np.empty((n, ho, wo, c, kh, kw), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            out[..., u, v] = xp[:, :, u : u + stride * ho : stride, v : v + stride * wo : stride].transpose(0, 2, 3, 1)
    return out.reshape(n, ho, wo, c * kh * kw)


def adder2d(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """-sum |patch - w| for every patch and filter: (N, O, Ho, Wo), accumulated in x's dtype (int64 for ints)."""
    p = patches(x, w.shape[2:], stride, padding)
    wf = w.reshape(w.shape[0], -1)
    out = -np.abs(p[:, :, :, None, :] - wf[None, None, None]).sum(-1)
    return out.transpose(0, 3, 1, 2)


def adder2d_grads(x: np.ndarray, w: np.ndarray, g: np.ndarray, stride: int = 1, padding: int = 0,
                  eta: float | None = ETA) -> tuple[np.ndarray, np.ndarray]:
    """(grad_x, grad_w) of the AdderNet backward for upstream gradient ``g`` (N, O, Ho, Wo), in float64."""
    x, w, g = (np.asarray(a, dtype=np.float64) for a in (x, w, g))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    p = patches(x, (kh, kw), stride, padding)                         # N Ho Wo K
    wf = w.reshape(o, -1)
    gt = g.transpose(0, 2, 3, 1)                                      # N Ho Wo O
    diff = p[:, :, :, None, :] - wf[None, None, None]                 # N Ho Wo O K: X - W
    gw = (diff * gt[..., None]).sum((0, 1, 2)).reshape(w.shape)
    if eta is not None:
        gw = gw / max(np.linalg.norm(gw), 1e-12) * eta * np.sqrt(gw.size)
    gp = (np.clip(-diff, -1, 1) * gt[..., None]).sum(3)               # N Ho Wo K
    gx = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    gp = gp.reshape(n, gp.shape[1], gp.shape[2], c, kh, kw)
    ho, wo = gp.shape[1], gp.shape[2]
    for u in range(kh):
        for v in range(kw):
            gx[:, :, u : u + stride * ho : stride, v : v + stride * wo : stride] += gp[..., u, v].transpose(0, 3, 1, 2)
    return gx[:, :, padding : padding + h, padding : padding + wd], gw
