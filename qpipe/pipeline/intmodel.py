"""The integer-only model: the frozen Q-model rewritten so that every tensor between the input quantizer and
the output dequantizer is an integer (int64 in PyTorch), with dyadic requantisation between layers.

``to_int(gm, example)`` walks the Q-model's fx graph and replaces

- the input quantizer by ``QuantizeLinear``-exact rounding (half to even) to its grid;
- Conv / Linear / matmul by exact integer products of ``(x - z_x)(w - z_w)`` plus the int32 bias: an
  *accumulator* whose real value is ``acc * s_x * s_w``; a ReLU or a constant factor after it is folded into the
  next requantisation;
- each activation quantizer by ``Requant`` (``m / 2^k = s_acc / s_out``, round half up, clamp);
- residual adds by ``IntAdd`` (both operands requantised to the output grid; constants such as the position
  embedding integerised on it), ``torch.cat`` with a constant (the class token) likewise;
- Softmax / GELU / LayerNorm by IntSoftmax / IntGELU / IntLayerNorm (the recipe must say ``int`` for each);
- max / global average pooling by their integer forms; and ends with one dequantisation to float logits.

Every replacement is a module whose forward computes the integers with ``qpipe.pipeline.intops``. This is the
PyTorch side of the integer-only graph: ``qpipe.export.intgraph`` writes the same computation, step for step, as
ConvInteger / MatMulInteger / ``ai.qpipe`` nodes from the artifact alone, and onnxruntime must reproduce this
model's outputs exactly (parity 0). Reshape / permute / getitem / flatten / expand stay as they are: they act on
int64 tensors unchanged.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qpipe.errors import QpipeError
from qpipe.intvalues import (
    Acc,
    Grid,
    MaskedGrid,
    broadcast_shape,
    clip_range,
    masked_fill_value,
    merge_bounds,
    onto,
    require_8bit,
    scales,
)
from qpipe.kinds import REGISTRY, Kind, resolve
from qpipe.models.adder import adder2d_forward
from qpipe.onnx_names import INT_GELU, INT_SOFTMAX
from qpipe.reference.intops import OUT_BITS, activation_table, dyadic, embedding_table

from . import intops
from .qmodel import (
    DIV_FUNCS,
    MUL_FUNCS,
    ActQuant,
    QAdder2d,
    QConv2d,
    QLinear,
    _IntOpMixin,
    _is_scalar,
    activation_bounds,
    kind_of,
    mode,
)

# ---------------------------------------------------------------- what a value is

class Const:
    """A float constant (a parameter, maybe expanded): integerised on the grid of the op that reads it."""

    def __init__(self, make):
        self.make = make  # grid -> node of the new graph that yields the integers


# ---------------------------------------------------------------- the integer modules

def _quantize(x, scale: float, zp: int, qmin: int, qmax: int):
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return torch.clamp(torch.round(x.float() / s) + zp, qmin, qmax).to(torch.int64)



class IntQuantize(nn.Module):
    def __init__(self, grid: Grid):
        super().__init__()
        require_8bit(grid, "the input QuantizeLinear")
        self.grid = grid

    def forward(self, x):
        gr = self.grid
        return _quantize(x, gr.scale, gr.zero_point, gr.qmin, gr.qmax)


def _requant(x, m, k, zp: int, qmin: int, qmax: int, zin: int):
    return intops.requantize(x - zin, m, k, zp, qmin, qmax)



def _mk(multiplier, shape) -> tuple[torch.Tensor, torch.Tensor]:
    d = dyadic(multiplier)
    return (torch.tensor(d.m, dtype=torch.int64).reshape(shape), torch.tensor(d.k, dtype=torch.int64).reshape(shape))


class IntRequant(nn.Module):
    """(x - z_in) * multiplier -> grid (dyadic, round half up); per channel when the multiplier is a vector."""

    def __init__(self, multiplier, shape, grid: Grid, lo: int, zin: int = 0, hi: int | None = None):
        super().__init__()
        m, k = _mk(multiplier, shape)
        self.register_buffer("m", m)
        self.register_buffer("k", k)
        self.zp, self.lo, self.hi, self.zin = grid.zero_point, lo, grid.qmax if hi is None else hi, zin

    def forward(self, x):
        return _requant(x, self.m, self.k, self.zp, self.lo, self.hi, self.zin)


def _conv(x, w, b, zx: int, signed: bool, stride, padding, dilation, groups):
    y = F.conv2d((x - zx).double(), w.double(), None, stride, padding, dilation, groups)
    y = torch.round(y).to(torch.int64)
    return y if b is None else y + b.reshape(1, -1, 1, 1)



def _check_layer(layer, grid: Grid, what: str) -> None:
    """A Conv/Linear the integer graph can run: symmetric integer weights and an 8-bit input grid."""
    if layer.weight_int is None:
        raise QpipeError(f"{layer.qname}: the integer-only graph needs quantized weights (weights.bits 2..8)")
    if layer.weight_zero_point.abs().max() != 0:
        raise QpipeError(f"{layer.qname}: the integer-only graph needs symmetric weights (weights.symmetric)")
    require_8bit(grid, f"{what} {layer.qname}")


class IntConv(nn.Module):
    def __init__(self, conv: QConv2d, grid: Grid):
        super().__init__()
        _check_layer(conv, grid, "Conv")
        self.register_buffer("w", conv.weight_int.to(torch.int64))
        self.register_buffer("b", None if conv.bias_int is None else conv.bias_int.to(torch.int64))
        self.zx, self.signed = grid.zero_point, grid.signed
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if isinstance(self.padding, str):
            raise QpipeError(f"{conv.qname}: padding={self.padding!r} is not supported in the integer graph")

    def forward(self, x):
        return _conv(x, self.w, self.b, self.zx, self.signed, self.stride, self.padding, self.dilation,
                             self.groups)


def _mat_mul(a, b, za: int, zb: int, sa: bool, sb: bool):
    return torch.round(torch.matmul((a - za).double(), (b - zb).double())).to(torch.int64)



class IntMatMul(nn.Module):
    """(a - z_a) @ (b - z_b) exactly, for two activation grids."""

    def __init__(self, ga: Grid, gb: Grid):
        super().__init__()
        for gr in (ga, gb):
            require_8bit(gr, "matmul")
        self.za, self.zb, self.sa, self.sb = ga.zero_point, gb.zero_point, ga.signed, gb.signed

    def forward(self, a, b):
        return _mat_mul(a, b, self.za, self.zb, self.sa, self.sb)


def _linear(x, wt, b, zx: int, signed: bool):
    y = torch.round(torch.matmul((x - zx).double(), wt.double())).to(torch.int64)
    return y if b is None else y + b



class IntLinear(nn.Module):
    def __init__(self, lin: QLinear, grid: Grid):
        super().__init__()
        _check_layer(lin, grid, "Linear")
        self.register_buffer("wt", lin.weight_int.to(torch.int64).t().contiguous())  # (in, out) for MatMulInteger
        self.register_buffer("b", None if lin.bias_int is None else lin.bias_int.to(torch.int64))
        self.zx, self.signed = grid.zero_point, grid.signed

    def forward(self, x):
        return _linear(x, self.wt, self.b, self.zx, self.signed)


def _add(a, za: int, ma, ka, b, zb: int, mb, kb, zp: int, qmin: int, qmax: int):
    ya = intops.requantize(a - za, ma, ka)
    yb = intops.requantize(b - zb, mb, kb)
    return torch.clamp(ya + yb + zp, qmin, qmax)



class IntAdd(nn.Module):
    """Residual add: each operand (a grid, an accumulator or an integerised constant) requantised to the output
    grid, summed, clamped to [lo, hi] (a folded ReLU / ReLU6 narrows the grid's range, ``clip_range``)."""

    def __init__(self, mults, shapes, zins, grid: Grid, lo: int, hi: int):
        super().__init__()
        for i in (0, 1):
            m, k = _mk(mults[i], shapes[i])
            self.register_buffer(f"m{i}", m)
            self.register_buffer(f"k{i}", k)
        self.za, self.zb = zins
        self.zp, self.lo, self.hi = grid.zero_point, lo, hi

    def forward(self, a, b):
        return _add(a, self.za, self.m0, self.k0, b, self.zb, self.m1, self.k1, self.zp, self.lo, self.hi)


def _shift_op(x, zin: int, x0: int, op: str):
    """IntSoftmax or IntGELU of (x - z_in) with ShiftExp's x0."""
    return (intops.softmax if op == INT_SOFTMAX else intops.gelu)(x - zin, x0)



def _layer_norm(x, zin: int, m, k: int, b, zp: int, qmin: int, qmax: int):
    from qpipe.reference.intops import LayerNormParams

    p = LayerNormParams(tuple(m.tolist()), k, tuple(b.tolist()), zp, qmin, qmax)
    return intops.layernorm(x - zin, p)



class IntNonlinear(nn.Module):
    """IntSoftmax / IntGELU / IntLayerNorm on (x - z_in) with the constants the Q-model froze."""

    def __init__(self, op: _IntOpMixin, zin: int):
        super().__init__()
        self.kind, self.zin = op.kind, zin
        if op.kind == "layernorm":
            p = op.ln_params()
            self.register_buffer("ln_m", torch.tensor(p.m, dtype=torch.int64))
            self.register_buffer("ln_b", torch.tensor(p.b, dtype=torch.int64))
            self.k, self.zp, self.qmin, self.qmax = p.k, p.zero_point, p.qmin, p.qmax
        else:
            self.x0 = int(op.x0)

    def forward(self, x):
        if self.kind in ("softmax", "gelu"):
            return _shift_op(x, self.zin, self.x0, INT_SOFTMAX if self.kind == Kind.SOFTMAX else INT_GELU)
        return _layer_norm(x, self.zin, self.ln_m, self.k, self.ln_b, self.zp, self.qmin, self.qmax)


def _max_pool(x, kernel, stride, padding, signed: bool):
    # -inf padding as MaxPool; values are exact in float64
    return F.max_pool2d(x.double(), kernel, stride, padding).to(torch.int64)



class IntMaxPool(nn.Module):
    def __init__(self, pool: nn.MaxPool2d, grid: Grid):
        super().__init__()
        require_8bit(grid, "MaxPool2d")
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode:
            raise QpipeError("the integer graph supports MaxPool2d without dilation or ceil_mode")
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        self.kernel, self.stride, self.padding = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
        self.signed = grid.signed

    def forward(self, x):
        return _max_pool(x, self.kernel, self.stride, self.padding, self.signed)


def _padding(node: fx.Node, modules) -> tuple[tuple[int, ...], str] | None:
    """(pads, mode) of a padding node (nn.ZeroPad2d / ReflectionPad2d / ReplicationPad2d or F.pad), else None."""
    if node.op == "call_module":
        m = modules[node.target]
        modes = {nn.ZeroPad2d: "constant", nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate"}
        mode = next((v for cls, v in modes.items() if isinstance(m, cls)), None)
        return (tuple(m.padding), mode) if mode else None
    if node.op == "call_function" and node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        return tuple(node.args[1] if len(node.args) > 1 else node.kwargs["pad"]), mode
    return None


class IntPad(nn.Module):
    """Padding on a grid: zero padding writes the zero point (the grid's 0.0); reflect / replicate copy values."""

    def __init__(self, pads: tuple[int, ...], mode: str, grid: Grid):
        super().__init__()
        self.pads, self.mode, self.zp = pads, mode, grid.zero_point

    def forward(self, x):
        if self.mode == "constant":
            return F.pad(x, self.pads, value=self.zp)
        return F.pad(x.double(), self.pads, mode=self.mode).to(torch.int64)   # exact below 2^53


def _sum_pool(x, zin: int):
    return (x - zin).sum(dim=(2, 3), keepdim=True)



class IntSumPool(nn.Module):
    """Global average pooling as the sum over H x W (the 1/(H W) goes into the next requantisation)."""

    def __init__(self, zin: int):
        super().__init__()
        self.zin = zin

    def forward(self, x):
        return _sum_pool(x, self.zin)


def _dequant(x, scale: float, zp: int):
    return (x - zp).float() * torch.tensor(scale, dtype=torch.float32, device=x.device)



class Dequantize(nn.Module):
    def __init__(self, grid: Grid):
        super().__init__()
        self.scale, self.zp = grid.scale, grid.zero_point

    def forward(self, x):
        return _dequant(x, self.scale, self.zp)


def _adder(x, perm, zin: int, qmax: int, stride: int, padding: int, *params):
    """AdderQuant layer on a grid input: per group, the input requantised to the group's unsigned b-bit codes,
    ``-sum |x - 2 w|`` exactly (ai.qpipe AdderInteger), plus the integer clamp bias; groups concatenated and put
    back in channel order. ``params``: (m, k, int8 weight codes w, bias) per group; the activation grid is half
    the weight step, so the codes enter as 2 w."""
    outs = []
    for i in range(0, len(params), 4):
        m, k, w, b = params[i : i + 4]
        codes = intops.requantize(x - zin, m, k, 0, 0, qmax)
        outs.append(adder2d_forward(codes, 2 * w.to(torch.int64), stride, padding) + b.reshape(1, -1, 1, 1))
    return torch.cat(outs, 1).index_select(1, perm)



class IntAdder(nn.Module):
    """A frozen QAdder2d on an integer input grid: an accumulator whose channel o has scale S_g / (2^b - 1) of
    its group g."""

    def __init__(self, adder: QAdder2d, grid: Grid):
        super().__init__()
        if adder.weight_int is None:
            raise QpipeError(f"{adder.qname}: the integer-only graph needs a calibrated adder layer")
        self.zin, self.stride, self.padding = grid.zero_point, adder.stride, adder.padding
        self.qmax = 2 ** int(adder.bits) - 1
        steps = adder.steps().double()
        order, scales = [], [0.0] * adder.out_channels
        self.n_groups = len(steps)
        for gi in range(self.n_groups):
            sel = torch.nonzero(adder.group == gi).flatten()
            step = float(steps[gi])
            m, k = _mk(grid.scale / step, ())
            self.register_buffer(f"m{gi}", m)
            self.register_buffer(f"k{gi}", k)
            self.register_buffer(f"w{gi}", adder.weight_int[sel].to(torch.int8).clone())  # stored as int8 codes
            self.register_buffer(f"b{gi}", torch.round(adder.clamp_bias[sel].double() / step).to(torch.int64))
            order.extend(sel.tolist())
            for o in sel.tolist():
                scales[o] = step
        self.register_buffer("perm", torch.argsort(torch.tensor(order)))
        self.scales = tuple(scales)

    def forward(self, x):
        params = []
        for gi in range(self.n_groups):
            params += [getattr(self, f"{n}{gi}") for n in ("m", "k", "w", "b")]
        return _adder(x, self.perm, self.zin, self.qmax, self.stride, self.padding, *params)


def _affine(x, sign, bias):
    return x * sign.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)



class IntBatchNorm(nn.Module):
    """BatchNorm (eval) on a per-channel accumulator that no conv could absorb (after an adder layer):
    ``gamma / sigma`` goes into the accumulator's scale (its sign into the integers), ``beta - gamma mu / sigma``
    becomes an integer bias on that scale."""

    def __init__(self, bn: nn.BatchNorm2d, scales: tuple[float, ...]):
        super().__init__()
        f = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var.double())) / torch.sqrt(
            bn.running_var.double() + bn.eps)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(f)
        s = torch.tensor(scales, dtype=torch.float64).expand_as(f)
        sign = torch.sign(f)
        new = torch.where(f != 0, s * f.abs(), s)
        self.register_buffer("sign", sign.to(torch.int64))
        self.register_buffer("bias", torch.round((beta - f * bn.running_mean.double()) / new).to(torch.int64))
        self.scales = tuple(new.tolist())

    def forward(self, x):
        return _affine(x, self.sign, self.bias)


# ---------------------------------------------------------------- the rewrite

def _grid(aq: ActQuant) -> Grid:
    return Grid(float(aq.scale), int(aq.zero_point), aq.spec.qmin, aq.spec.qmax)


class IntEmbedding(nn.Module):
    """Rows of an integer table (int64 [V, D], already on the output grid) by integer ids."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class IntLookup(nn.Module):
    """``table[x - qmin]``: an elementwise function of a b-bit integer input as a table (int64)."""

    def __init__(self, table: torch.Tensor, qmin: int):
        super().__init__()
        self.register_buffer("table", table)
        self.qmin = qmin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x - self.qmin]


_TABLE_MODULES = {nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                  nn.ELU: "elu", nn.LeakyReLU: "leaky_relu"}
_TABLE_FUNCS = {torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.elu: "elu", F.leaky_relu: "leaky_relu",
                "tanh": "tanh", "sigmoid": "sigmoid"}
_TABLE_ALPHA = {"elu": ("alpha", 1.0), "leaky_relu": ("negative_slope", 0.01)}


def table_function(node: fx.Node, modules) -> tuple[str, float]:
    """(``reference.intops.TABLE_FUNCTIONS`` name, its constant) of an activation node; raises where none fits."""
    if node.op == "call_module":
        m = modules[node.target]
        fn = next((v for cls, v in _TABLE_MODULES.items() if type(m) is cls), None)
        if fn is None:
            raise QpipeError(f"{node.target} ({type(m).__name__}) has no integer form yet")
        if fn == "gelu" and m.approximate == "tanh":
            fn = "gelu_tanh"
        key = _TABLE_ALPHA.get(fn)
        return fn, float(getattr(m, key[0])) if key else 0.0
    fn = _TABLE_FUNCS.get(node.target)
    if fn is None:
        raise QpipeError(f"{node.name} ({getattr(node.target, '__name__', node.target)}) has no integer form yet")
    key = _TABLE_ALPHA.get(fn)
    if not key:
        return fn, 0.0
    value = node.kwargs.get(key[0], node.args[1] if len(node.args) > 1 else key[1])
    return fn, float(value)


class Rewriter:
    """Writes the integer-only model of a frozen Q-model node by node (``visit``)."""

    def __init__(self, gm: fx.GraphModule, example: tuple[torch.Tensor, ...]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.new = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.meta: dict[fx.Node, object] = {}
        self.done: set[fx.Node] = set()     # nodes folded into an earlier replacement
        self.count = 0
        with mode(gm, "quant"), torch.no_grad():
            ShapeProp(gm).propagate(*example)

    # -- helpers
    def add_module(self, base: str, m: nn.Module) -> str:
        self.count += 1
        name = f"{base.replace('.', '_')}_{self.count}"
        self.root.add_module(name, m)
        return name

    def call(self, base: str, m: nn.Module, *args) -> fx.Node:
        return self.new.call_module(self.add_module(base, m), tuple(args))

    def ndim(self, node: fx.Node) -> int:
        tm = node.meta.get("tensor_meta")
        return len(tm.shape) if tm is not None else 0

    def aq_after(self, node: fx.Node) -> tuple[fx.Node, ActQuant, tuple[float, float] | None]:
        """The quantizer that follows ``node`` (through ReLU-kind activations): (its node, the module, the bounds
        of the activations between, None when there are none)."""
        bounds, cur = None, node
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            k = kind_of(u, self.modules)
            if k == Kind.QUANTIZER:
                return u, self.modules[u.target], bounds
            if k == Kind.RELU:
                bounds, cur = merge_bounds(bounds, activation_bounds(u, self.modules)), u
                continue
            break
        raise QpipeError(f"{node.name}: the integer-only graph needs a quantizer after this op")

    def mark_folded(self, node: fx.Node, until: fx.Node, value: fx.Node, meta) -> None:
        """Map the ReLU / quantizer nodes between ``node`` and ``until`` (inclusive) to ``value``."""
        cur = node
        while cur is not until:
            cur = next(iter(cur.users))
            self.env[cur], self.meta[cur] = value, meta
            self.done.add(cur)

    def as_operand(self, node: fx.Node, grid: Grid, with_zp: bool):
        """(new node, multiplier to ``grid``, its broadcast shape, zero point to subtract) for an add operand."""
        meta = self.meta[node]
        nd = self.ndim(node)
        if isinstance(meta, Const):
            g0 = replace(grid, zero_point=grid.zero_point if with_zp else 0)
            return meta.make(g0), 2.0 / 2, (), 0  # exact identity: floor((2 b + 1) / 2) = b
        if isinstance(meta, (Grid, Acc)):
            return self.env[node], *onto(meta, grid, nd, node.name)
        raise QpipeError(f"{node.name}: unsupported operand for the integer graph ({type(meta).__name__})")

    def const(self, node: fx.Node) -> Const:
        """A float parameter read by get_attr: integerised (and registered) when the reader knows its grid."""
        value = functools.reduce(getattr, node.target.split("."), self.gm)  # a parameter or buffer

        def make(grid: Grid):
            q = torch.clamp(torch.round(value.detach().double() / grid.scale) + grid.zero_point, grid.qmin, grid.qmax)
            name = self.add_module(node.target + "_int", nn.Module())
            holder = self.root.get_submodule(name)
            holder.register_buffer("value", q.to(torch.int64))
            return self.new.get_attr(f"{name}.value")

        return Const(make)

    # -- the walk
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node in self.done:
                continue
            self.visit(node)
        return fx.GraphModule(self.root, self.new)

    def copy(self, node: fx.Node, meta) -> None:
        def arg(a):
            return self.env[a] if isinstance(a, fx.Node) else a
        if node.op == "call_module":  # a pass-through module (Dropout, Flatten, Identity)
            args = fx.node.map_arg(node.args, arg)
            self.env[node] = self.call(node.target, self.modules[node.target], *args)
        else:
            self.env[node] = self.new.node_copy(node, arg)
        self.meta[node] = meta

    def visit(self, node: fx.Node) -> None:
        """One node of the Q-model: its kind's step (``REGISTRY[kind].int_module``) writes its integer form."""
        if node.op == "get_attr":
            self.visit_constant(node)
        elif node.op == "output":
            self.visit_output(node)
        else:
            kind = kind_of(node, self.modules)
            step = REGISTRY[kind].int_module
            if step is None:
                raise QpipeError(f"{node.name}: {kind} ops have no integer form yet (the QDQ graph runs them in float)")
            resolve(step)(self, node)

    def operand(self, node: fx.Node):
        """(the first argument, what its value is: Grid / Acc / Const / 'float' / 'other' / None)."""
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return x, (self.meta.get(x) if x is not None else None)

    def visit_input(self, node: fx.Node) -> None:
        self.copy(node, "float")

    def visit_constant(self, node: fx.Node) -> None:
        value = functools.reduce(getattr, node.target.split("."), self.gm)
        if isinstance(value, torch.Tensor) and not value.is_floating_point():  # a mask: used as it is
            name = self.add_module(node.target + "_raw", nn.Module())
            self.root.get_submodule(name).register_buffer("value", value.detach().clone())
            self.env[node] = self.new.get_attr(f"{name}.value")
            self.meta[node] = "other"
            return
        self.meta[node] = self.const(node)

    def visit_output(self, node: fx.Node) -> None:
        """Each output dequantized once from its grid (a tuple stays a tuple)."""
        outs = node.args[0]
        many = isinstance(outs, (tuple, list))
        ys = []
        for out in (outs if many else (outs,)):
            meta = self.meta.get(out)
            if not isinstance(meta, Grid):
                raise QpipeError(f"the integer-only graph needs a quantizer on every output ({out} has none)")
            ys.append(self.call("dequantize", Dequantize(meta), self.env[out]))
        self.new.output(tuple(ys) if many else ys[0])

    def visit_quantizer(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        target = node.target
        aq = self.modules[target]
        gr = _grid(aq)
        if xm == "float":
            self.env[node] = self.call("quantize", IntQuantize(gr), self.env[x])
        elif isinstance(xm, Grid):
            if xm == gr:
                self.env[node] = self.env[x]
            else:
                self.env[node] = self.call("requant", IntRequant(xm.scale / gr.scale, (), gr, gr.qmin,
                                                                 xm.zero_point), self.env[x])
        elif isinstance(xm, Acc):
            s = scales(xm.scale)
            lo, hi = clip_range(gr, xm.bounds)
            self.env[node] = self.call("requant", IntRequant([v / gr.scale for v in s],
                                                             broadcast_shape(len(s), xm.axis, self.ndim(x)), gr, lo,
                                                             hi=hi),
                                       self.env[x])
        else:
            raise QpipeError(f"{node.name}: cannot quantize a {type(xm).__name__} value in the integer graph")
        self.meta[node] = gr

    def visit_layer(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        target = node.target
        m = self.modules[target]
        if not isinstance(xm, Grid):
            raise QpipeError(f"{target}: the integer-only graph needs a quantized input to every layer")
        if not isinstance(m, (QConv2d, QLinear)):
            raise QpipeError(f"{target} is kept float (exclude); the integer-only graph needs every layer quantized")
        sw = scales(m.weight_scale) if m.weight_scale is not None else (1.0,)
        acc_scale = tuple(xm.scale * v for v in sw)
        if isinstance(m, QConv2d):
            self.env[node] = self.call(target, IntConv(m, xm), self.env[x])
            self.meta[node] = Acc(acc_scale if len(acc_scale) > 1 else acc_scale[0], axis=1)
        else:
            self.env[node] = self.call(target, IntLinear(m, xm), self.env[x])
            self.meta[node] = Acc(acc_scale if len(acc_scale) > 1 else acc_scale[0], axis=-1)

    def visit_embedding(self, node: fx.Node) -> None:
        """An embedding (``Kind.EMBEDDING``): a Gather from its table requantised to the quantizer after it once
        (``reference.intops.embedding_table``), which that quantizer then leaves as it is."""
        ids = node.args[0]
        m = self.modules[node.target]
        if getattr(m, "weight_int", None) is None:
            raise QpipeError(f"{node.target}: a float embedding table (weights.embedding_bits: 32 or exclude); the "
                             "integer-only graph needs integer tables")
        qnode, aq, bounds = self.aq_after(node)
        gr = _grid(aq)
        lo, hi = clip_range(gr, bounds)
        table = embedding_table(m.weight_int.numpy(), m.weight_scale.double().numpy(), gr.scale, gr.zero_point, lo, hi)
        y = self.call(node.target, IntEmbedding(torch.from_numpy(table)), self.env[ids])
        self.env[node], self.meta[node] = y, gr
        self.mark_folded(node, qnode, y, gr)

    def visit_activation(self, node: fx.Node) -> None:
        """An elementwise activation (``Kind.ACTIVATION``) on a quantized input: a lookup table over the input's
        codes into the grid of the quantizer after it (``reference.intops.activation_table``), folded in."""
        x, xm = self.operand(node)
        fn, alpha = table_function(node, self.modules)
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: the integer-only graph needs a quantized input to {fn}")
        qnode, aq, bounds = self.aq_after(node)
        gr = _grid(aq)
        lo, hi = clip_range(gr, bounds)
        table = activation_table(fn, alpha, xm.scale, xm.zero_point, xm.qmin, xm.qmax, gr.scale, gr.zero_point, lo, hi)
        y = self.call(node.name, IntLookup(torch.from_numpy(table), xm.qmin), self.env[x])
        self.env[node], self.meta[node] = y, gr
        self.mark_folded(node, qnode, y, gr)

    def visit_adder(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        target = node.target
        if not isinstance(xm, Grid):
            raise QpipeError(f"{target}: the integer-only graph needs a quantized input to every adder layer")
        mod = IntAdder(self.modules[target], xm)
        self.env[node] = self.call(target, mod, self.env[x])
        self.meta[node] = Acc(mod.scales, axis=1)

    def visit_bn(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        target = node.target
        if not isinstance(xm, Acc) or xm.bounds is not None:
            raise QpipeError(f"{target}: the integer graph folds BatchNorm only into the accumulator of the "
                             "layer before it")
        s = scales(xm.scale)
        mod = IntBatchNorm(self.modules[target], s)
        self.env[node] = self.call(target, mod, self.env[x])
        self.meta[node] = Acc(mod.scales, axis=1)

    def visit_relu(self, node: fx.Node) -> None:
        """ReLU / ReLU6 / Hardtanh / clamp: pending on an accumulator (folded into the next requantisation), the
        grid's range narrowed on a grid."""
        x, xm = self.operand(node)
        bounds = activation_bounds(node, self.modules)
        if isinstance(xm, Acc):
            self.env[node], self.meta[node] = self.env[x], replace(xm, bounds=merge_bounds(xm.bounds, bounds))
            return
        if isinstance(xm, Grid):  # clamp(q, lo, hi) on a grid
            lo, hi = clip_range(xm, bounds)
            gr = replace(xm, qmin=lo, qmax=hi)
            self.env[node] = self.call("relu", IntRequant(1.0, (), gr, gr.qmin, 0), self.env[x])
            self.meta[node] = gr
            return
        raise QpipeError(f"{node.name}: ReLU on an unsupported value in the integer graph")

    def visit_scale(self, node: fx.Node) -> None:
        target, args = node.target, node.args
        c = next(a for a in args if isinstance(a, (int, float)))
        if target in DIV_FUNCS:
            c = 1.0 / c
        src = next(a for a in args if isinstance(a, fx.Node))
        sm = self.meta.get(src)
        if not isinstance(sm, Acc) or sm.bounds is not None:
            raise QpipeError(f"{node.name}: multiplication by a constant is folded only after Conv/Linear/matmul")
        s = scales(sm.scale)
        self.env[node] = self.env[src]
        self.meta[node] = replace(sm, scale=tuple(v * c for v in s) if len(s) > 1 else s[0] * c)

    def visit_matmul(self, node: fx.Node) -> None:
        args = node.args
        a, b = args[0], args[1]
        ga, gb = self.meta.get(a), self.meta.get(b)
        if not (isinstance(ga, Grid) and isinstance(gb, Grid)):
            raise QpipeError(f"{node.name}: the integer graph needs quantized inputs to matmul")
        self.env[node] = self.call("matmul", IntMatMul(ga, gb), self.env[a], self.env[b])
        self.meta[node] = Acc(ga.scale * gb.scale)

    def visit_add(self, node: fx.Node) -> None:
        args = node.args
        aq_node, aq, bounds = self.aq_after(node)
        gr = _grid(aq)
        operands = [a for a in args[:2]]
        if not all(isinstance(a, fx.Node) for a in operands):
            raise QpipeError(f"{node.name}: adding a plain number is not supported in the integer graph")
        ops = [self.as_operand(a, gr, with_zp=False) for a in operands]
        lo, hi = clip_range(gr, bounds)
        mod = IntAdd([o[1] for o in ops], [o[2] for o in ops], [o[3] for o in ops], gr, lo, hi)
        y = self.call("add", mod, ops[0][0], ops[1][0])
        self.env[node], self.meta[node] = y, gr
        self.mark_folded(node, aq_node, y, gr)

    def visit_cat(self, node: fx.Node) -> None:
        args = node.args
        aq_node, aq, _ = self.aq_after(node)
        gr = _grid(aq)
        parts = []
        for a in args[0]:
            am = self.meta.get(a)
            if isinstance(am, Const):
                parts.append(am.make(gr))
            elif isinstance(am, Grid):
                parts.append(self.env[a] if am == gr else self.call(
                    "requant", IntRequant(am.scale / gr.scale, (), gr, gr.qmin, am.zero_point), self.env[a]))
            else:
                raise QpipeError(f"{node.name}: torch.cat of an unsupported value in the integer graph")
        y = self.new.call_function(torch.cat, (parts,), dict(node.kwargs, **({"dim": args[1]} if len(args) > 1 else {})))
        self.env[node], self.meta[node] = y, gr
        self.mark_folded(node, aq_node, y, gr)

    def visit_int_op(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        k = kind_of(node, self.modules)
        target = node.target
        m = self.modules[target]
        if not isinstance(m, _IntOpMixin) and k == Kind.GELU:
            self.visit_activation(node)   # the float GELU (erf or tanh, as the model has it) as an exact table
            return
        if not isinstance(m, _IntOpMixin):
            raise QpipeError(f"{target}: the integer-only graph needs ops.{k}: int in the recipe")
        if isinstance(xm, MaskedGrid) and k == Kind.SOFTMAX:
            xm = xm.grid
        if not isinstance(xm, Grid):
            raise QpipeError(f"{target}: integer {k} needs a quantized input")
        y = self.call(target, IntNonlinear(m, xm.zero_point), self.env[x])
        self.env[node] = y
        if k == Kind.GELU:
            self.meta[node] = Acc(xm.scale * 2.0**-OUT_BITS)
        else:
            aq_node, aq, _ = self.aq_after(node)
            gr = _grid(aq)
            if k == Kind.SOFTMAX and (gr.scale, gr.zero_point) != (2.0**-OUT_BITS, 0):
                raise QpipeError(f"{target}: IntSoftmax writes at scale 2^-{OUT_BITS}, but the quantizer after "
                                 f"it has scale {gr.scale}")
            self.meta[node] = gr
            self.mark_folded(node, aq_node, y, gr)

    def visit_pool(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: pooling needs a quantized input in the integer graph")
        tin, tout = x.meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
        if len(tout) != 4 or tuple(tout[2:]) != (1, 1):
            raise QpipeError(f"{node.name}: only global average pooling is supported in the integer graph")
        y = self.call("sumpool", IntSumPool(xm.zero_point), self.env[x])
        self.env[node], self.meta[node] = y, Acc(xm.scale / (tin[2] * tin[3]))

    def visit_pass(self, node: fx.Node) -> None:
        x, xm = self.operand(node)
        k = kind_of(node, self.modules)
        op, target, args = node.op, node.target, node.args
        if op == "call_module" and isinstance(self.modules[target], nn.MaxPool2d):
            self.env[node] = self.call(target, IntMaxPool(self.modules[target], xm), self.env[x])
            self.meta[node] = xm
            return
        pad = _padding(node, self.modules)
        if pad is not None:
            if not isinstance(xm, Grid):
                raise QpipeError(f"{node.name}: padding needs a quantized input in the integer graph")
            self.env[node] = self.call("pad", IntPad(*pad, xm), self.env[x])
            self.meta[node] = xm
            return
        if k == Kind.PASS and op == "call_method" and target == "masked_fill" and isinstance(xm, Grid):
            # masked_fill(mask, -inf) before softmax: MASKED, which the IntSoftmax gives no weight (a small negative
            # fill: the lowest value of the grid, a positive one the highest)
            value = args[2] if len(args) > 2 else node.kwargs.get("value")
            if not isinstance(value, (int, float)):
                raise QpipeError(f"{node.name}: masked_fill needs a constant fill value in the integer graph")
            fill, meta = masked_fill_value(xm, value)
            mask = self.env[args[1]] if isinstance(args[1], fx.Node) else args[1]
            self.env[node] = self.new.call_method("masked_fill", (self.env[x], mask, fill))
            self.meta[node] = meta
            return
        if k in (Kind.PASS, Kind.OTHER, Kind.SPLIT):
            if op == "call_module" and not isinstance(self.modules[target], (nn.Dropout, nn.Identity, nn.Flatten)):
                raise QpipeError(f"{target} ({type(self.modules[target]).__name__}) has no integer form")
            if op == "call_function" and target in (F.max_pool2d,):
                raise QpipeError("F.max_pool2d: use nn.MaxPool2d for the integer graph")
            if isinstance(xm, Const):
                parent = xm

                def make(grid, node=node, parent=parent):
                    first = parent.make(grid)
                    rest = fx.map_arg(node.args[1:], lambda a: self.env[a])   # sizes in lists too ([n, -1, -1])
                    kwargs = fx.map_arg(node.kwargs, lambda a: self.env[a])
                    return self.new.create_node(node.op, node.target, (first, *rest), kwargs)

                self.meta[node] = Const(make)
                return
            integers = all(self.meta.get(a) == "other" for a in node.all_input_nodes)   # positions, masks
            if op == "call_function" and target in MUL_FUNCS + (operator.truediv, torch.div) and not _is_scalar(node) \
                    and not integers:
                raise QpipeError(f"{node.name}: {target} on a tensor is not supported in the integer graph")
            self.copy(node, xm if isinstance(xm, (Grid, Acc)) else "other")
            return
        raise QpipeError(f"{node.name} ({op} {target}) has no integer form")


def to_int(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """The integer-only model of a frozen Q-model (see the module docstring); float images in, float logits
    (one final dequantisation) out. ``example``: inputs to propagate shapes with (``qpipe.inputs.dummy_inputs``)."""
    model = Rewriter(gm, example).run()
    model.graph.lint()
    model.recompile()
    return model.eval()
