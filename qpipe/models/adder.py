"""AdderNets (Chen et al., CVPR 2020; huawei-noah/AdderNet): convolutions that compute the negative l1 distance
``-sum |x - w|`` between each input patch and each kernel instead of ``sum x * w``.

``AdderConv2d`` runs in blocks of images and output rows, so no patch tensor grows beyond ``BLOCK_ELEMS``
elements (224 x 224 inputs stay memory-sane on CPU). Its backward is AdderNet's (``qpipe.reference.adder``): the
full-precision weight gradient ``X - W`` scaled per layer to ``eta * sqrt(k) / ||g||``, and the HardTanh input
gradient ``clip(W - X, -1, 1)``.

Models: ``digits-adder`` (a small adder ResNet for the bundled 8x8 digits) and ``resnet20-adder`` (CIFAR-10), the
ResNet20 of the AdderNet paper: the first conv and the classifier stay multiplicative, every other convolution
(the shortcut's 1x1 included) is an adder layer followed by BatchNorm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qpipe.onnx_names import QPIPE_DOMAIN as ONNX_DOMAIN
from qpipe.reference.adder import ETA

BLOCK_ELEMS = 1 << 22   # patch elements (and patch x filter elements in the backward) per block: 16 MiB float32


def _blocks(n: int, ho: int, per_row: int):
    """(n0, n1, r0, r1) blocks of images and output rows with at most ``BLOCK_ELEMS`` patch elements each."""
    rows = max(1, BLOCK_ELEMS // max(per_row, 1))
    if rows >= ho:
        imgs = max(1, rows // ho)
        for n0 in range(0, n, imgs):
            yield n0, min(n, n0 + imgs), 0, ho
        return
    for n0 in range(n):
        for r0 in range(0, ho, rows):
            yield n0, n0 + 1, r0, min(ho, r0 + rows)


def _geometry(xp: torch.Tensor, w: torch.Tensor, stride: int):
    kh, kw = w.shape[2:]
    ho = (xp.shape[2] - kh) // stride + 1
    wo = (xp.shape[3] - kw) // stride + 1
    return kh, kw, ho, wo


def _band(xp, n0, n1, r0, r1, kh, kw, stride):
    """Patches (M, K) of output rows r0..r1 of images n0..n1; M runs over (image, row, column)."""
    band = xp[n0:n1, :, r0 * stride : (r1 - 1) * stride + kh, :]
    pt = F.unfold(band, (kh, kw), stride=stride)          # n, K, L
    return pt.transpose(1, 2).reshape(-1, pt.shape[1]), band.shape[2]


def adder2d_forward(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """-sum |patch - w|: float via ``torch.cdist(p=1)``; integer tensors exactly in int64."""
    exact = not x.is_floating_point()
    if exact:  # integers in float64: every |difference| and sum below 2^53 is exact, and cdist runs fast
        if x.abs().max() * 2 * w[0].numel() + w.abs().max() * w[0].numel() >= 2**52:
            raise ValueError("integer adder inputs too large for exact float64 sums")
        x, w = x.to(torch.float64), w.to(torch.float64)
    xp = F.pad(x, (padding,) * 4) if padding else x
    kh, kw, ho, wo = _geometry(xp, w, stride)
    n, o = x.shape[0], w.shape[0]
    wf = w.reshape(o, -1)
    k = wf.shape[1]
    out = torch.empty((n, o, ho, wo), dtype=x.dtype, device=x.device)
    for n0, n1, r0, r1 in _blocks(n, ho, wo * k):
        pt, _ = _band(xp, n0, n1, r0, r1, kh, kw, stride)
        d = torch.cdist(pt, wf, p=1)
        out[n0:n1, :, r0:r1, :] = -d.reshape(n1 - n0, r1 - r0, wo, o).permute(0, 3, 1, 2)
    if exact:
        return out.to(torch.int64)
    return out




class _Adder2d(torch.autograd.Function):
    @staticmethod
    def symbolic(g, x, w, stride, padding, eta):
        """The float adder layer as the ai.qpipe function Adder2d (qpipe.export.intops)."""
        out = g.op(f"{ONNX_DOMAIN}::Adder2d", x, w, strides_i=[stride, stride], pads_i=[padding] * 4)
        out.setType(x.type().with_sizes([None] * 4))
        return out

    @staticmethod
    def forward(ctx, x, w, stride, padding, eta):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.eta = stride, padding, eta
        return adder2d_forward(x, w, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        xp = F.pad(x, (p,) * 4) if p else x
        kh, kw, ho, wo = _geometry(xp, w, s)
        n, o = x.shape[0], w.shape[0]
        wf = w.reshape(o, -1)
        k = wf.shape[1]
        gw = torch.zeros_like(wf)
        gxp = torch.zeros_like(xp) if ctx.needs_input_grad[0] else None
        for n0, n1, r0, r1 in _blocks(n, ho, wo * k):
            pt, band_h = _band(xp, n0, n1, r0, r1, kh, kw, s)
            gt = g[n0:n1, :, r0:r1, :].permute(0, 2, 3, 1).reshape(-1, o)       # M, O
            gw += gt.T @ pt - wf * gt.sum(0)[:, None]                            # sum over patches of g (X - W)
            if gxp is None:
                continue
            gp = torch.empty_like(pt)
            step = max(1, BLOCK_ELEMS // (o * k))
            for m0 in range(0, pt.shape[0], step):                               # sum_o g clip(W - X, -1, 1)
                d = (wf[None] - pt[m0 : m0 + step, None, :]).clamp_(-1, 1)
                gp[m0 : m0 + step] = torch.bmm(gt[m0 : m0 + step, None, :], d)[:, 0]
            cols = gp.reshape(n1 - n0, -1, k).transpose(1, 2)
            gxp[n0:n1, :, r0 * s : r0 * s + band_h, :] += F.fold(cols, (band_h, xp.shape[3]), (kh, kw), stride=s)
        if ctx.eta is not None:   # adaptive per-layer scaling: eta * sqrt(k) / ||g||
            gw = gw / gw.norm().clamp(min=1e-12) * (ctx.eta * math.sqrt(gw.numel()))
        gx = None
        if gxp is not None:
            gx = gxp[:, :, p : p + x.shape[2], p : p + x.shape[3]] if p else gxp
        return gx, gw.reshape(w.shape), None, None, None


def adder2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0, eta: float | None = ETA):
    return _Adder2d.apply(x, w, stride, padding, eta)


class AdderConv2d(nn.Module):
    """``-sum |x - w|`` over every patch (zero padding), no bias; ``eta`` scales the weight gradient (None: off)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 eta: float | None = ETA):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.eta = (kernel_size, kernel_size), stride, padding, eta
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adder2d(x, self.weight, self.stride, self.padding, self.eta)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class AdderBlock(nn.Module):
    """The AdderNet BasicBlock: adder 3x3 -> BN -> ReLU -> adder 3x3 -> BN, plus the shortcut (adder 1x1 -> BN
    where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = AdderConv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = AdderConv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(AdderConv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class AdderResNet(nn.Module):
    """Multiplicative 3x3 stem conv + BN + ReLU, adder stages, global average pool, multiplicative classifier."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(AdderBlock(cin, w, stride), *[AdderBlock(w, w) for _ in range(n - 1)]))
            cin = w
        self.n_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20_adder(num_classes: int = 10) -> AdderResNet:
    """CIFAR-10 ResNet20 with adder layers (3 stages x 3 blocks, widths 16/32/64)."""
    return AdderResNet([3, 3, 3], [16, 32, 64], num_classes)


def digits_adder(num_classes: int = 10) -> AdderResNet:
    """Small adder ResNet for 1x8x8 digits: widths 16/24/32, one block per stage."""
    return AdderResNet([1, 1, 1], [16, 24, 32], num_classes, in_channels=1)
