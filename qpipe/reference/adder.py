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


# ---------------------------------------------------------------------------------------------------- AdderQuant
# Nie et al., NeurIPS 2022 (mindspore-ai/models research/cv/AdderQuant), ALGORITHMS.md section 6. x - w needs x and
# w on one grid: a group of output filters shares the scale S, weights step 2S / (2^b - 1) (signed b-bit codes),
# activations step S / (2^b - 1) (unsigned b-bit codes), so a weight code is 2 * w_int activation steps.

PERCENTILE = 99.94   # the activation outlier clamp r: running max over batches of this percentile of |x|
GROUPS = 4
R_FLOOR = 1e-3       # the reference code's floor of r


def batch_range(x: np.ndarray, percentile: float = PERCENTILE) -> float:
    """One batch's contribution to r: the ``percentile`` of |x| over the whole batch, sorted[ceil(q n) - 1]."""
    v = np.sort(np.abs(np.asarray(x, dtype=np.float64)).ravel())
    if v.size == 0:
        return 0.0
    return float(v[max(int(np.ceil(percentile / 100.0 * v.size)) - 1, 0)])


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0, iters: int = 300) -> np.ndarray:
    """Cluster ids (0..k'-1, ascending by centre) of 1-D ``values`` by k-means with k-means++ seeding (seeded);
    k' = min(k, number of distinct values), and no cluster is empty."""
    v = np.asarray(values, dtype=np.float64)
    k = max(1, min(k, len(np.unique(v))))
    rng = np.random.default_rng(seed)
    centres = [v[rng.integers(len(v))]]
    while len(centres) < k:
        d2 = np.min((v[:, None] - np.asarray(centres)[None]) ** 2, axis=1)
        centres.append(v[rng.choice(len(v), p=d2 / d2.sum())] if d2.sum() > 0 else v[rng.integers(len(v))])
    c = np.sort(np.asarray(centres))
    ids = np.zeros(len(v), dtype=np.int64)
    for _ in range(iters):
        ids = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
        new = np.array([v[ids == j].mean() if np.any(ids == j) else c[j] for j in range(k)])
        if np.allclose(new, c, rtol=0, atol=0):
            break
        c = new
    used = np.unique(ids)                 # relabel: ascending centres, no gaps
    order = np.argsort([v[ids == j].mean() for j in used])
    remap = {int(used[j]): i for i, j in enumerate(order)}
    return np.array([remap[int(i)] for i in ids], dtype=np.int64)


def group_scales(w: np.ndarray, r: float, groups: int, method: str = "adderquant",
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(group id per output filter, scale S per group). AdderQuant: filters clustered by max |w|, S = min(max |w| of
    the group, r). Naive: one group, S = max(max |w|, r) (one scale covering both ranges)."""
    wmax = np.abs(np.asarray(w, dtype=np.float64)).reshape(w.shape[0], -1).max(axis=1)
    if method == "naive":
        return np.zeros(w.shape[0], dtype=np.int64), np.array([max(wmax.max(), r)], dtype=np.float32)
    ids = kmeans_1d(wmax, groups, seed)
    s = np.array([min(wmax[ids == g].max(), r) for g in range(ids.max() + 1)], dtype=np.float32)
    return ids, s


def weight_codes(w: np.ndarray, ids: np.ndarray, scales: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(int codes, clamp bias per filter). Weights beyond +-S are clipped to +-S first; the clipped part becomes the
    bias -sum max(|w| - S, 0), exact for inputs in [0, S] (|x - w| = |x - S| + |w| - S when w >= S >= x >= 0, and
    |x - w| = |x + S| + |w| - S for w <= -S); then codes clamp(round(w / (2 S / (2^b - 1))), -2^(b-1), 2^(b-1) - 1)."""
    w = np.asarray(w, dtype=np.float32)
    s = np.asarray(scales, dtype=np.float32)[ids].reshape(-1, *[1] * (w.ndim - 1))
    bias = -np.maximum(np.abs(w) - s, 0).reshape(w.shape[0], -1).sum(axis=1)
    step = np.float32(2) * s / np.float32(2**bits - 1)
    q = np.clip(np.round(np.clip(w, -s, s) / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.astype(np.int64), bias.astype(np.float32)


def act_step(scale: float, bits: int) -> np.float32:
    return np.float32(np.float32(scale) / np.float32(2**bits - 1))


def act_codes(x: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Unsigned b-bit codes of a group's input: clamp(round(x / (S / (2^b - 1))), 0, 2^b - 1), float32 like
    QuantizeLinear."""
    q = np.round(np.asarray(x, dtype=np.float32) / act_step(scale, bits))
    return np.clip(q, 0, 2**bits - 1).astype(np.int64)


def quantized_adder(x: np.ndarray, codes: np.ndarray, ids: np.ndarray, scales: np.ndarray, bias: np.ndarray,
                    bits: int, stride: int = 1, padding: int = 0) -> np.ndarray:
    """The AdderQuant layer: per group, -sum |x_int - 2 w_int| in int64 (activation steps), times the group's
    activation step, plus the clamp bias; the input is quantized once per group."""
    out = None
    for g in range(len(scales)):
        sel = ids == g
        acc = adder2d(act_codes(x, scales[g], bits), 2 * codes[sel], stride, padding)
        y = acc.astype(np.float32) * act_step(scales[g], bits) + bias[sel].reshape(1, -1, 1, 1)
        if out is None:
            out = np.zeros((x.shape[0], len(ids), *y.shape[2:]), dtype=np.float32)
        out[:, sel] = y
    return out
