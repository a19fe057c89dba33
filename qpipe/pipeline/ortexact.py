"""The Q-model with onnxruntime's fused-kernel arithmetic: the PyTorch reference for parity in the optimised
session, the one users deploy.

The fake-quantized Q-model computes each Conv in float and rounds at its output quantizer; onnxruntime's
validation session does the same with its own float sums. Its optimised session instead fuses every QDQ group
into an integer kernel (MLAS, x86), whose float steps are fixed (onnxruntime's ``qlinearconv.cc``,
``quantize.cpp``, ``qladd_avx2.cpp``, ``qlgavgpool.cpp``, ``quant_gemm.cc``)::

    QLinearConv / QGemm   M[c] = f32(f32(s_x * s_w[c]) / s_y)
                          y = clamp(rne(f32(acc + bias) * M[c]), qmin - z_y, qmax - z_y) + z_y   (acc exact in int32)
    QLinearAdd            rA = f32(s_a / s_c), rB = f32(s_b / s_c), F = f32(z_c - f32(f32(rA z_a) + f32(rB z_b)))
                          y = sat_u8(rne(fma(a, rA, fma(b, rB, F))))      (a, b, z: the uint8 container values)
    QLinearGlobalAveragePool  M = f32(s_x / f32(s_y * f32(N))), y = requantize(sum(x) - z_x N, M)

A tie that float sums break one way and these kernels the other moves an activation by one step, and a layer
whose output step is much finer than its input step times its weights amplifies it: on EfficientNet-Lite0 a
single-step move at a depthwise conv's input became 17 steps at its output, 6 steps at the logits. ``fused``
rewrites a loaded Q-model so that every group onnxruntime fuses computes those integers (the accumulator in
float64, exact), and leaves the rest (float convs of INT4 weights, unfused ops) fake-quantized. Uses only the
record's integers and scales: an independent computation of what the exported file must give.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpipe.kinds import Kind

from .qmodel import ActQuant, QConv2d, QLinear, activation_bounds, kind_of

U8_MIN, U8_MAX = 0, 255


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


class Grid8:
    """An 8-bit activation quantizer as onnxruntime's uint8 container sees it."""

    def __init__(self, aq: ActQuant):
        self.scale = aq.scale.detach().float().reshape(())
        shift = 128 if aq.spec.signed else 0
        self.zp = int(aq.zero_point) + shift           # the container's zero point
        self.lo, self.hi = U8_MIN - self.zp, U8_MAX - self.zp   # the grid relative to the zero point

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """x (on this grid) -> q - z as float64 integers."""
        return torch.round(x.double() / self.scale.double())

    def values(self, n: torch.Tensor) -> torch.Tensor:
        return n.float() * self.scale


def _requantize(acc: torch.Tensor, m: torch.Tensor, out: Grid8) -> torch.Tensor:
    """MlasRequantizeOutput: f32(acc) * M, clamped to the container, rounded half to even."""
    return out.values(torch.clamp(torch.round(acc.float() * m), out.lo, out.hi))


class FusedLayer(nn.Module):
    """QLinearConv / QGemm with a uint8 output: a Conv or Linear with its input and output quantizers."""

    def __init__(self, layer: QConv2d | QLinear, x: Grid8, y: Grid8):
        super().__init__()
        self.layer, self.x, self.y = layer, x, y
        sw = layer.weight_scale.detach().float()
        m = (self.x.scale * sw) / self.y.scale
        self.register_buffer("m", m.reshape(-1, 1, 1) if isinstance(layer, QConv2d) else m.reshape(-1))

    def forward(self, xin: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, QLinear) and xin.ndim != 2:
            # a Linear on (B, N, D) exports as MatMul + Add: onnxruntime runs MatMulIntegerToFloat and a float
            # Add, not QGemm; left to the fake-quantized layer (the quantizer after it rounds as before)
            return layer(xin)
        n = self.x.codes(xin)
        zw = layer.weight_zero_point.double()
        w = layer.weight_int.double() - (zw.reshape(-1, *[1] * (layer.weight_int.ndim - 1)) if zw.ndim else zw)
        b = layer.bias_int.double() if layer.bias_int is not None else None
        if isinstance(layer, QConv2d):
            acc = F.conv2d(n, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)   # exact below 2^53
        else:
            acc = F.linear(n, w, b)
        return _requantize(acc, self.m, self.y)


class FusedAdd(nn.Module):
    """QLinearAdd of two uint8 tensors (MLAS's AVX2 kernel, also used on AVX-512: explicit FMAs, B first)."""

    def __init__(self, a: Grid8, b: Grid8, c: Grid8):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        ra, rb = (a.scale / c.scale), (b.scale / c.scale)          # float32 divisions
        self.ra, self.rb = float(ra), float(rb)
        f = _f32(c.zp) - ((ra * _f32(a.zp)) + (rb * _f32(b.zp)))    # float32, not contracted
        self.f = float(f)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        qa = self.a.codes(xa) + self.a.zp
        qb = self.b.codes(xb) + self.b.zp
        t = (qb * self.rb + self.f).float()             # fma: the product and sum exact in float64, one rounding
        v = (qa * self.ra + t.double()).float()
        q = torch.clamp(torch.round(v), U8_MIN, U8_MAX)
        return self.c.values(q - self.c.zp)


class FusedGlobalAvgPool(nn.Module):
    """QLinearGlobalAveragePool: the integer sum over H x W, requantized at f32(s_x / f32(s_y * N))."""

    def __init__(self, x: Grid8, y: Grid8):
        super().__init__()
        self.x, self.y = x, y

    def forward(self, xin: torch.Tensor) -> torch.Tensor:
        n = self.x.codes(xin)
        count = n.shape[2] * n.shape[3]
        m = self.x.scale / (self.y.scale * _f32(float(count)))
        acc = n.sum(dim=(2, 3), keepdim=True)
        return _requantize(acc, m, self.y)


def _grid_of(node: fx.Node, modules) -> Grid8 | None:
    """The 8-bit grid a node's value lies on: its activation quantizer, seen through pass-through ops."""
    while True:
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, ActQuant):
            ok = m.scale > 0 and m.spec.bits == 8 and m.levels is None and not m.fixed
            return Grid8(m) if ok else None
        if kind_of(node, modules) == Kind.PASS and node.all_input_nodes and not _is_pad_with_value(node):
            node = node.all_input_nodes[0]
            continue
        return None


def _is_pad_with_value(node: fx.Node) -> bool:
    return node.target is F.pad and len(node.args) > 3 and node.args[3] not in (0, 0.0)


def _relu_redundant(node: fx.Node, modules, y: Grid8) -> bool:
    """onnxruntime drops a Relu / Clip before a QuantizeLinear whose grid it cannot change (and fuses the
    rest); otherwise the group stays unfused."""
    lo, hi = activation_bounds(node, modules)
    s = float(y.scale)
    low_ok = y.zp == U8_MIN if lo == 0.0 and hi == float("inf") else round(lo / s) + y.zp <= U8_MIN
    high_ok = hi == float("inf") or round(hi / s) + y.zp >= U8_MAX
    return low_ok and high_ok


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def fused(q: fx.GraphModule, int4_layers: set[str] = frozenset()) -> fx.GraphModule:
    """A copy of the loaded Q-model ``q`` in which every group that onnxruntime's optimised CPU session fuses
    computes that kernel's integers. ``int4_layers``: layers whose weights the file holds as INT4, which
    onnxruntime runs as DequantizeLinear + float op (left fake-quantized)."""
    gm = copy.deepcopy(q)
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        aq = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(aq, ActQuant) or len(node.args) != 1:
            continue
        y = _grid_of(node, modules)
        if y is None:
            continue
        prod = node.args[0]
        if not isinstance(prod, fx.Node) or not _single_user(prod):
            continue
        if kind_of(prod, modules) == Kind.RELU:
            if not _relu_redundant(prod, modules, y) or not prod.all_input_nodes:
                continue
            prod = prod.all_input_nodes[0]
            if not _single_user(prod):
                continue
        new = None
        pm = modules.get(prod.target) if prod.op == "call_module" else None
        if isinstance(pm, (QConv2d, QLinear)) and pm.weight_int is not None and pm.bias_int is not None \
                and prod.target not in int4_layers:
            x = _grid_of(prod.args[0], modules)
            if x is not None:
                new = (FusedLayer(pm, x, y), (prod.args[0],))
        elif prod.op == "call_function" and prod.target in (operator.add, torch.add) and len(prod.args) == 2 \
                and all(isinstance(a, fx.Node) for a in prod.args) and not prod.kwargs:
            a, b = (_grid_of(arg, modules) for arg in prod.args)
            if a is not None and b is not None:
                new = (FusedAdd(a, b, y), tuple(prod.args))
        elif isinstance(pm, nn.AdaptiveAvgPool2d) and pm.output_size in (1, (1, 1)):
            x = _grid_of(prod.args[0], modules)
            if x is not None:
                new = (FusedGlobalAvgPool(x, y), (prod.args[0],))
        if new is None:
            continue
        module, args = new
        name = f"ort_fused_{count}"
        count += 1
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            exact = gm.graph.call_module(name, args)
        node.replace_input_with(node.args[0], exact)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.fused_groups = count
    return gm
