"""The integer-only graph, written by the ONNX stage from the artifact alone: the marked float graph
(``graph.onnx``), the record (``qparams.json``) and the integers (``quantized.safetensors``).

Every tensor between the input's QuantizeLinear and the output's DequantizeLinear is an integer (int64):

- the input quantizer is ``QuantizeLinear`` (round half to even) to its grid;
- Conv / Linear / activation matmuls are exact integer products of ``(x - z_x)(w - z_w)`` (ConvInteger /
  MatMulInteger on uint8 containers) plus the int32 bias: an *accumulator* whose real value is
  ``acc * s_x * s_w``; a ReLU or a constant factor after it is folded into the next requantisation;
- each activation quantizer is ``ai.qpipe::Requant`` (``m / 2^k = s_acc / s_out``, round half up, clamp);
- residual adds are ``ai.qpipe::IntAdd`` (constants such as the position embedding integerised on the output
  grid), concatenations requantise their parts to the quantizer after them;
- Softmax / GELU / LayerNorm are ``IntSoftmax`` / ``IntGELU`` / ``IntLayerNorm`` with the recorded constants,
  adder layers ``AdderInteger`` per filter group, a BatchNorm after an adder an integer sign and bias;
- max pooling runs on the 8-bit container, global average pooling is a sum (its 1/(HW) goes into the next
  requantisation), and one ``DequantizeLinear`` gives the float output.

This is the same computation as the PyTorch integer model (``qpipe.pipeline.intmodel``), step for step, so
onnxruntime reproduces it exactly; tests hold the two against each other on every demo model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qpipe.errors import QpipeError
from qpipe.intvalues import (
    RELU,
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
from qpipe.kinds import REGISTRY, resolve
from qpipe.onnx_names import (
    ADDER_INTEGER,
    INT_ADD,
    INT_GELU,
    INT_LAYERNORM,
    INT_SOFTMAX,
    MARK,
    MARK_ADDER,
    MARK_DOMAIN,
    QPIPE_DOMAIN,
    REQUANT,
)
from qpipe.record import (
    ADDER_BITS,
    BIAS_INT,
    CLAMP_BIAS,
    GROUP,
    GROUP_SCALE,
    WEIGHT_INT,
    QuantRecord,
    TensorKind,
    dummy_arrays,
    state_key,
)
from qpipe.reference.intops import OUT_BITS, activation_table, dyadic, embedding_table

# ---------------------------------------------------------------- what a value is


@dataclass(frozen=True)
class Const:
    """A float constant (an initializer, maybe reshaped or expanded): integerised on the grid of the op that reads
    it. ``make(grid)`` returns the name of the integer tensor."""

    make: Callable[[Grid], str]


@dataclass(frozen=True)
class Weight:
    """A layer's marked weight or bias (its integers come from quantized.safetensors); ``transposed``: read
    through a Transpose (Linear on a 3-D input is exported as MatMul(x, W^T) + b)."""

    tensor: str
    transposed: bool = False


def _narrowest(lo: int, hi: int):
    """The smallest NumPy integer type holding [lo, hi]."""
    for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return t
    return np.int64


_ONNX_TABLES = {"Gelu": "gelu", "Tanh": "tanh", "Sigmoid": "sigmoid", "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid",
                "Elu": "elu", "LeakyRelu": "leaky_relu"}
FLOAT = "float"    # the float graph input
OTHER = "other"    # shapes, indices, masks: used as they are
SHAPES = {"Shape", "Size"}      # their outputs are shapes whatever their input is
ONNX_KINDS = {op: kind for kind, spec in REGISTRY.items() for op in spec.onnx_ops}


def _decimal(v: float) -> float:
    """A float32 attribute as the decimal number it was written from (epsilon 1e-5 is 1e-5, not 9.99999975e-6)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


class IntGraph:
    """Writes the integer-only graph node by node (``build_int_graph``)."""

    def __init__(self, graph: onnx.ModelProto, record: QuantRecord, state: dict[str, np.ndarray],
                 shapes: dict[str, tuple[int, ...]], opset: int):
        self.src = graph.graph
        self.record, self.state, self.shapes, self.opset = record, state, shapes, opset
        self.inits = {t.name: numpy_helper.to_array(t) for t in self.src.initializer}
        for n in self.src.node:   # the exporter shares equal parameters through Identity nodes
            if n.op_type == "Identity" and n.input[0] in self.inits:
                self.inits[n.output[0]] = self.inits[n.input[0]]
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.src.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: dict[str, onnx.TensorProto] = {}
        self.env: dict[str, str] = {}       # tensor of graph.onnx -> tensor of the integer graph
        self.meta: dict[str, object] = {}   # tensor of graph.onnx -> Grid / Acc / Const / Weight / FLOAT / OTHER
        self.values: dict[str, np.ndarray] = {}   # float Constant nodes (scale factors, fill values)
        self.done: set[int] = set()         # ids of nodes folded into an earlier replacement
        self.count = 0

    # -- helpers
    def fresh(self, base: str) -> str:
        self.count += 1
        return f"int/{base.strip('/').replace('/', '_')}_{self.count}"

    def const(self, value, dtype=np.int64, base: str = "c") -> str:
        name = self.fresh(base)
        self.new_inits[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def node(self, op: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        out = self.fresh(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def ndim(self, tensor: str) -> int:
        return len(self.shapes[tensor])

    def mark_name(self, node: onnx.NodeProto) -> str:
        return next(a.s.decode() for a in node.attribute if a.name == "name")

    def grid(self, name: str) -> Grid:
        rec = self.record.tensors.get(name)
        if rec is None or rec.kind != TensorKind.ACTIVATION:
            raise QpipeError(f"graph.onnx marks {name!r}, which qparams.json does not record as an activation")
        if rec.levels is not None and rec.levels.kind != "uniform":
            raise QpipeError(f"{name}: {rec.levels.kind} levels are not a uniform grid; no integer-only graph")
        return Grid(float(rec.scale), int(rec.zero_point), rec.qmin, rec.qmax)

    def quantizer_after(self, tensor: str):
        """The activation quantizer that follows ``tensor`` (through Relu / Clip): (its Mark node, its grid, the
        bounds of the activations between or None, the nodes from the op to the quantizer)."""
        bounds, cur, chain = None, tensor, []
        while len(self.consumers.get(cur, [])) == 1:
            u = self.consumers[cur][0]
            if u.domain == MARK_DOMAIN and u.op_type == MARK:
                return u, self.grid(self.mark_name(u)), bounds, [*chain, u]
            if u.op_type in ("Relu", "Clip"):
                bounds, cur = merge_bounds(bounds, self.bounds(u)), u.output[0]
                chain.append(u)
                continue
            break
        raise QpipeError(f"{tensor}: the integer-only graph needs a quantizer after this op")

    def fold(self, chain: list[onnx.NodeProto], value: str, meta) -> None:
        for n in chain:
            self.env[n.output[0]], self.meta[n.output[0]] = value, meta
            self.done.add(id(n))

    def to_u8(self, x: str, grid: Grid) -> tuple[str, str]:
        """int64 grid values -> uint8 container (+128 for signed grids) and its zero point (u8 x u8 kernels)."""
        shift = 128 if grid.signed else 0
        if shift:
            x = self.node("Add", [x, self.const(shift)], "to_u8")
        return self.node("Cast", [x], "u8", to=TensorProto.UINT8), self.const(grid.zero_point + shift, np.uint8)

    def bounds(self, node: onnx.NodeProto) -> tuple[float, float]:
        """The output range of a Relu (0, inf) or a Clip with constant bounds (ReLU6, Hardtanh, clamp)."""
        if node.op_type == "Relu":
            return RELU
        ends = []
        for i, default in ((1, -math.inf), (2, math.inf)):
            name = node.input[i] if len(node.input) > i else ""
            value = self.values.get(name, self.inits.get(name)) if name else None
            if name and (value is None or value.size != 1):
                raise QpipeError(f"{node.name}: Clip with a tensor bound has no integer form")
            ends.append(default if value is None else float(value.reshape(())))
        return ends[0], ends[1]

    def requant(self, x: str, multiplier, shape, grid: Grid, lo: int, zin: int = 0, hi: int | None = None) -> str:
        """(x - z_in) * multiplier -> grid (dyadic, round half up), clamped to [lo, hi] (hi: grid.qmax)."""
        d = dyadic(multiplier)
        if zin:
            x = self.node("Sub", [x, self.const(zin)], "sub_zp")
        m = self.const(np.asarray(d.m, np.int64).reshape(shape))
        k = self.const(np.asarray(d.k, np.int64).reshape(shape))
        hi = grid.qmax if hi is None else hi
        return self.node(REQUANT, [x, m, k, self.const(grid.zero_point), self.const(lo), self.const(hi)],
                         "requant", domain=QPIPE_DOMAIN)

    def operand(self, tensor: str, grid: Grid, with_zp: bool):
        """(integer tensor, multiplier to ``grid``, its broadcast shape, zero point to subtract) of an add operand."""
        meta = self.meta.get(tensor)
        if isinstance(meta, Const):
            g0 = dataclasses.replace(grid, zero_point=grid.zero_point if with_zp else 0)
            return meta.make(g0), 2.0 / 2, (), 0   # exact identity: floor((2 b + 1) / 2) = b
        if isinstance(meta, (Grid, Acc)):
            return self.env[tensor], *onto(meta, grid, self.ndim(tensor), tensor)
        raise QpipeError(f"{tensor}: unsupported operand for the integer graph ({type(meta).__name__})")

    def layer_ints(self, weight: Weight) -> tuple[str, np.ndarray, np.ndarray | None]:
        """(layer name, int8 weight codes, int32 bias or None) of a marked weight; symmetric weights only."""
        layer = weight.tensor.removesuffix(".weight")
        rec = self.record.tensors.get(weight.tensor)
        w = self.state.get(state_key(layer, WEIGHT_INT))
        if rec is None or w is None:
            raise QpipeError(f"{layer}: the integer-only graph needs quantized weights (weights.bits 2..8)")
        if np.any(np.asarray(rec.zero_point) != 0):
            raise QpipeError(f"{layer}: the integer-only graph needs symmetric weights (weights.symmetric)")
        return layer, w, self.state.get(state_key(layer, BIAS_INT))

    def integerise(self, value: np.ndarray, grid: Grid) -> np.ndarray:
        q = np.clip(np.rint(value.astype(np.float64) / grid.scale) + grid.zero_point, grid.qmin, grid.qmax)
        return q.astype(np.int64)

    # -- the walk
    def run(self) -> onnx.ModelProto:
        for inp in self.src.input:   # float inputs are quantized; integer ones (ids, masks) are used as they are
            floating = inp.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
            self.env[inp.name], self.meta[inp.name] = inp.name, FLOAT if floating else OTHER
        for name, value in self.inits.items():
            if np.issubdtype(value.dtype, np.floating):
                self.meta[name] = Const(lambda grid, v=value, n=name: self.const(self.integerise(v, grid),
                                                                                 base=f"{n}_int"))
            else:
                self.meta[name] = OTHER
        for node in self.src.node:
            if id(node) not in self.done:
                self.visit(node)
        outputs = []
        for out in self.src.output:
            meta = self.meta.get(out.name)
            if not isinstance(meta, Grid):
                raise QpipeError("the integer-only graph needs an output quantizer (quantized activations)")
            x32 = self.node("Cast", [self.env[out.name]], "to_int32", to=TensorProto.INT32)
            self.nodes.append(helper.make_node(
                "DequantizeLinear", [x32, self.const(np.float32(meta.scale), np.float32),
                                     self.const(meta.zero_point, np.int32)], [out.name],
                name="dequantize" if len(self.src.output) == 1 else f"dequantize_{out.name}"))
            outputs.append(out)
        graph = helper.make_graph(self.nodes, "qpipe-int", list(self.src.input), outputs,
                                  list(self.new_inits.values()))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])

    def visit(self, node: onnx.NodeProto) -> None:
        """One node of graph.onnx: the integer emitter of its kind (``REGISTRY[kind].int_emitter``, the kind found
        by the node's op type in ``REGISTRY[kind].onnx_ops``) writes its integer form."""
        if node.op_type == "Constant":
            self.visit_constant(node)
            return
        metas = [self.meta.get(i) for i in node.input if i]
        if node.domain != MARK_DOMAIN and (all(m == OTHER for m in metas) or node.op_type in SHAPES):
            self.copy(node, OTHER)   # shape arithmetic, masks and indices
            return
        kind = ONNX_KINDS.get(node.op_type)
        if kind is None:
            raise QpipeError(f"{node.name or node.op_type} ({node.op_type}) has no integer form")
        resolve(REGISTRY[kind].int_emitter)(self, node)

    def tensor(self, name: str) -> str:
        """The integer graph's name for a graph.onnx tensor; an integer initializer (shape, indices) is copied over
        when first read."""
        if name and name not in self.env and name in self.inits:
            self.env[name] = self.const(self.inits[name], self.inits[name].dtype, base=name)
        return self.env[name] if name else ""

    def copy(self, node: onnx.NodeProto, meta) -> None:
        """The node as it is, on the integer tensors (reshape, transpose, gather, ... act on int64 unchanged)."""
        for i in node.input:
            if i and i not in self.env and isinstance(self.meta.get(i), Const):
                raise QpipeError(f"{node.name}: a float constant reaches {node.op_type} in the integer graph")
        inputs = [self.tensor(i) for i in node.input]
        outputs = [self.fresh(o) for o in node.output]
        self.nodes.append(helper.make_node(node.op_type, inputs, outputs, name=outputs[0], domain=node.domain))
        self.nodes[-1].attribute.extend(node.attribute)
        for o, new in zip(node.output, outputs, strict=True):
            self.env[o], self.meta[o] = new, meta

    def visit_constant(self, node: onnx.NodeProto) -> None:
        value = numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
        if np.issubdtype(value.dtype, np.floating):
            self.values[node.output[0]] = value
            self.meta[node.output[0]] = Const(lambda grid, v=value, n=node.output[0]: self.const(
                self.integerise(v, grid), base=n))
            return
        self.copy(node, OTHER)

    def visit_pass(self, node: onnx.NodeProto) -> None:
        """Ops that pass values through on their grid (``Kind.PASS``): reshapes and the like on the integers,
        max pooling on the 8-bit container, masked_fill with the grid's end."""
        if node.op_type == "MaxPool":
            self.max_pool(node)
            return
        if node.op_type == "Where":
            self.masked_fill(node)
            return
        if node.op_type == "Pad":
            self.pad(node)
            return
        x = node.input[0]
        xm = self.meta.get(x)
        if isinstance(xm, Weight) and node.op_type == "Gather":
            self.visit_embedding(node)
            return
        if isinstance(xm, Weight) and node.op_type == "Transpose":
            self.meta[node.output[0]] = dataclasses.replace(xm, transposed=not xm.transposed)
            return
        if isinstance(xm, Const):   # reshape / expand a constant: done on its integers once the grid is known
            rest = list(node.input[1:])

            def make(grid, node=node, parent=xm, rest=rest):
                first = parent.make(grid)
                out = self.fresh(node.output[0])
                inputs = [first, *(self.tensor(r) for r in rest)]
                self.nodes.append(helper.make_node(node.op_type, inputs, [out], name=out))
                self.nodes[-1].attribute.extend(node.attribute)
                return out

            self.meta[node.output[0]] = Const(make)
            return
        if not isinstance(xm, (Grid, Acc)):
            raise QpipeError(f"{node.name} ({node.op_type}) on an unsupported value in the integer graph")
        self.copy(node, xm)

    # -- quantizers and layers
    def visit_quantizer(self, node: onnx.NodeProto) -> None:
        """A Mark (``Kind.QUANTIZER``): a weight or bias (read by its layer), or an activation quantizer:
        QuantizeLinear on the float input, Requant from another grid or an accumulator, nothing on its own grid."""
        name, x, y = self.mark_name(node), node.input[0], node.output[0]
        rec = self.record.tensors.get(name)
        if rec is not None and rec.kind in (TensorKind.WEIGHT, TensorKind.BIAS):
            self.meta[y] = Weight(name)
            return
        gr, xm = self.grid(name), self.meta.get(x)
        if xm == FLOAT:
            require_8bit(gr, "the input QuantizeLinear")
            q = self.node("QuantizeLinear", [self.env[x], self.const(np.float32(gr.scale), np.float32),
                                             self.const(gr.zero_point, np.int8 if gr.signed else np.uint8)], "quantize")
            out = self.node("Cast", [q], "q64", to=TensorProto.INT64)
            if (gr.qmin, gr.qmax) != ((-128, 127) if gr.signed else (0, 255)):
                out = self.node("Clamp", [out, self.const(gr.qmin), self.const(gr.qmax)], "clamp", domain=QPIPE_DOMAIN)
        elif isinstance(xm, Grid):
            out = self.env[x] if xm == gr else self.requant(self.env[x], xm.scale / gr.scale, (), gr, gr.qmin,
                                                              xm.zero_point)
        elif isinstance(xm, Acc):
            s = scales(xm.scale)
            lo, hi = clip_range(gr, xm.bounds)
            out = self.requant(self.env[x], [v / gr.scale for v in s], broadcast_shape(len(s), xm.axis, self.ndim(x)),
                               gr, lo, hi=hi)
        else:
            raise QpipeError(f"{name}: cannot quantize a {type(xm).__name__} value in the integer graph")
        self.env[y], self.meta[y] = out, gr

    def visit_activation(self, node: onnx.NodeProto) -> None:
        """Tanh / Sigmoid / HardSwish / HardSigmoid / Elu / LeakyRelu on a quantized input (``Kind.ACTIVATION``): a
        Gather from the table over the input's codes (``reference.intops.activation_table``); the quantizer after
        it is folded in."""
        x = node.input[0]
        xm = self.meta.get(x)
        fn, alpha = _ONNX_TABLES[node.op_type], 0.0
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "HardSigmoid" and (abs(attrs.get("alpha", 0.2) - 1 / 6) > 1e-6 or attrs.get("beta", 0.5) != 0.5):
            raise QpipeError(f"{node.name}: HardSigmoid other than PyTorch's (x / 6 + 1/2) has no integer form")
        if fn == "gelu" and attrs.get("approximate", b"none") in (b"tanh", "tanh"):
            fn = "gelu_tanh"
        if fn in ("elu", "leaky_relu"):
            alpha = _decimal(attrs.get("alpha", 1.0 if fn == "elu" else 0.01))
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: the integer-only graph needs a quantized input to {node.op_type}")
        _, gr, bounds, chain = self.quantizer_after(node.output[0])
        lo, hi = clip_range(gr, bounds)
        table = activation_table(fn, alpha, xm.scale, xm.zero_point, xm.qmin, xm.qmax, gr.scale, gr.zero_point, lo, hi)
        idx = self.node("Sub", [self.env[x], self.const(xm.qmin)], "lut_index") if xm.qmin else self.env[x]
        y = self.node("Gather", [self.const(table, base=f"{node.op_type}_table"), idx], "lut")
        self.env[node.output[0]], self.meta[node.output[0]] = y, gr
        self.fold(chain, y, gr)

    def visit_embedding(self, node: onnx.NodeProto) -> None:
        """Gather from a marked table (``Kind.EMBEDDING``): the table requantised once to the grid of the quantizer
        after it (``reference.intops.embedding_table``), gathered; that quantizer is folded in."""
        weight = self.meta[node.input[0]]
        layer = weight.tensor.removesuffix(".weight")
        rec, w = self.record.tensors.get(weight.tensor), self.state.get(state_key(layer, WEIGHT_INT))
        if rec is None or w is None:
            raise QpipeError(f"{layer}: quantized.safetensors has no integer table")
        _, gr, bounds, chain = self.quantizer_after(node.output[0])
        lo, hi = clip_range(gr, bounds)
        table = embedding_table(w, np.asarray(rec.scale, np.float64), gr.scale, gr.zero_point, lo, hi)
        narrow = _narrowest(lo, hi)   # stored in the grid's own width (int8 for 8 bits), widened after the Gather
        rows = self.node("Gather", [self.const(table, narrow, base=f"{layer}_table"), self.tensor(node.input[1])],
                         "embedding", **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        y = self.node("Cast", [rows], "embedding_i64", to=TensorProto.INT64)
        self.env[node.output[0]], self.meta[node.output[0]] = y, gr
        self.fold(chain, y, gr)

    def visit_layer(self, node: onnx.NodeProto) -> None:
        """Conv2d (ConvInteger) or Linear (Gemm: MatMulInteger) on its integer weights (``Kind.LAYER``)."""
        if node.op_type == "Gemm":
            self.gemm(node)
            return
        x, w = node.input[0], self.meta.get(node.input[1])
        xm = self.meta.get(x)
        if not isinstance(w, Weight) or not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: the integer-only graph needs a quantized input and integer weights")
        layer, codes, bias = self.layer_ints(w)
        require_8bit(xm, f"Conv {layer}")
        xu, zu = self.to_u8(self.env[x], xm)
        wu = self.const((codes.astype(np.int16) + 128).astype(np.uint8), np.uint8, base=f"{layer}.weight_u8")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        acc = self.node("ConvInteger", [xu, wu, zu, self.const(128, np.uint8)], f"{layer}/ConvInteger", **attrs)
        acc = self.node("Cast", [acc], f"{layer}/acc", to=TensorProto.INT64)
        if bias is not None:
            acc = self.node("Add", [acc, self.const(bias.astype(np.int64).reshape(1, -1, 1, 1))], f"{layer}/bias")
        sw = scales(self.record.tensors[w.tensor].scale)
        s = tuple(xm.scale * v for v in sw)
        self.env[node.output[0]], self.meta[node.output[0]] = acc, Acc(s if len(s) > 1 else s[0], axis=1)

    def linear(self, node: onnx.NodeProto, x: str, w: Weight, bias_mark: str | None) -> None:
        xm = self.meta.get(x)
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: the integer-only graph needs a quantized input to every layer")
        layer, codes, bias = self.layer_ints(w)
        require_8bit(xm, f"Linear {layer}")
        xu, zu = self.to_u8(self.env[x], xm)
        wt = (codes.astype(np.int16).T + 128).astype(np.uint8)   # (in, out) for MatMulInteger
        acc = self.node("MatMulInteger", [xu, self.const(wt, np.uint8, base=f"{layer}.weight_t_u8"), zu,
                                          self.const(128, np.uint8)], f"{layer}/MatMulInteger")
        acc = self.node("Cast", [acc], f"{layer}/acc", to=TensorProto.INT64)
        if bias_mark is not None and bias is not None:
            acc = self.node("Add", [acc, self.const(bias.astype(np.int64))], f"{layer}/bias")
        sw = scales(self.record.tensors[w.tensor].scale)
        s = tuple(xm.scale * v for v in sw)
        self.env[node.output[0]], self.meta[node.output[0]] = acc, Acc(s if len(s) > 1 else s[0], axis=-1)

    def gemm(self, node: onnx.NodeProto) -> None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = self.meta.get(node.input[1])
        if not isinstance(w, Weight) or attrs.get("transB", 0) != 1 or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise QpipeError(f"{node.name}: Gemm other than x W^T + b has no integer form")
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        self.linear(node, node.input[0], w, bias)

    def visit_matmul(self, node: onnx.NodeProto) -> None:
        """A product of two activations (``Kind.MATMUL``), or a Linear on a 3-D input (MatMul with W^T)."""
        a, b = node.input
        am, bm = self.meta.get(a), self.meta.get(b)
        if isinstance(bm, Weight):   # Linear on a 3-D input: MatMul(x, W^T), its bias added by the Add after
            if not bm.transposed:
                raise QpipeError(f"{node.name}: MatMul with an untransposed weight has no integer form")
            self.linear(node, a, bm, None)
            return
        if not (isinstance(am, Grid) and isinstance(bm, Grid)):
            raise QpipeError(f"{node.name}: the integer graph needs quantized inputs to matmul")
        for gr in (am, bm):
            require_8bit(gr, "matmul")
        au, zau = self.to_u8(self.env[a], am)
        bu, zbu = self.to_u8(self.env[b], bm)
        acc = self.node("MatMulInteger", [au, bu, zau, zbu], "matmul")
        self.env[node.output[0]] = self.node("Cast", [acc], "matmul_acc", to=TensorProto.INT64)
        self.meta[node.output[0]] = Acc(am.scale * bm.scale)

    def visit_relu(self, node: onnx.NodeProto) -> None:
        """Relu / Clip (``Kind.RELU``: ReLU, ReLU6, Hardtanh, clamp): pending on an accumulator, the grid's range
        narrowed on a grid."""
        x, y = node.input[0], node.output[0]
        xm, bounds = self.meta.get(x), self.bounds(node)
        if isinstance(xm, Acc):
            self.env[y], self.meta[y] = self.env[x], dataclasses.replace(xm, bounds=merge_bounds(xm.bounds, bounds))
        elif isinstance(xm, Grid):   # clamp(q, lo, hi) on a grid
            lo, hi = clip_range(xm, bounds)
            gr = dataclasses.replace(xm, qmin=lo, qmax=hi)
            self.env[y], self.meta[y] = self.requant(self.env[x], 1.0, (), gr, gr.qmin), gr
        else:
            raise QpipeError(f"{node.name}: ReLU on an unsupported value in the integer graph")

    def scale_by(self, node: onnx.NodeProto, invert: bool) -> None:
        """Multiplication / division of an accumulator by a constant number: folded into its scale."""
        x, c = node.input
        if c not in self.values and c not in self.inits:
            x, c = c, x
        value = self.values.get(c, self.inits.get(c))
        xm = self.meta.get(x)
        if value is None or value.size != 1 or not isinstance(xm, Acc) or xm.bounds is not None:
            raise QpipeError(f"{node.name}: multiplication by a constant is folded only after Conv/Linear/matmul")
        f = float(value.reshape(()))
        f = 1.0 / f if invert else f
        s = scales(xm.scale)
        self.env[node.output[0]] = self.env[x]
        self.meta[node.output[0]] = dataclasses.replace(xm, scale=tuple(v * f for v in s) if len(s) > 1 else s[0] * f)

    def visit_scale(self, node: onnx.NodeProto) -> None:
        """Multiplication / division by a constant number (``Kind.SCALE``)."""
        if node.op_type == "Div" and node.input[1] not in self.values and node.input[1] not in self.inits:
            raise QpipeError(f"{node.name}: division by a tensor has no integer form")
        self.scale_by(node, invert=node.op_type == "Div")

    def visit_add(self, node: onnx.NodeProto) -> None:
        metas = [self.meta.get(i) for i in node.input]
        if any(isinstance(m, Weight) for m in metas):   # the bias of a Linear on a 3-D input
            acc = node.input[1 - next(i for i, m in enumerate(metas) if isinstance(m, Weight))]
            if not isinstance(self.meta.get(acc), Acc):
                raise QpipeError(f"{node.name}: a bias added to something other than a layer's accumulator")
            layer = next(m for m in metas if isinstance(m, Weight)).tensor.removesuffix(".bias")
            bias = self.state.get(state_key(layer, BIAS_INT))
            if bias is None:
                raise QpipeError(f"{layer}: the integer-only graph needs an integer bias")
            self.env[node.output[0]] = self.node("Add", [self.env[acc], self.const(bias.astype(np.int64))],
                                                 f"{layer}/bias")
            self.meta[node.output[0]] = self.meta[acc]
            return
        mark, gr, bounds, chain = self.quantizer_after(node.output[0])
        ops = [self.operand(i, gr, with_zp=False) for i in node.input]
        lo, hi = clip_range(gr, bounds)
        args = []
        for x, mult, shape, zin in ops:
            d = dyadic(mult)
            args += [x, self.const(zin), self.const(np.asarray(d.m, np.int64).reshape(shape)),
                     self.const(np.asarray(d.k, np.int64).reshape(shape))]
        y = self.node(INT_ADD, [*args, self.const(gr.zero_point), self.const(lo), self.const(hi)], "add",
                      domain=QPIPE_DOMAIN)
        self.env[node.output[0]], self.meta[node.output[0]] = y, gr
        self.fold(chain, y, gr)

    def visit_cat(self, node: onnx.NodeProto) -> None:
        mark, gr, _, chain = self.quantizer_after(node.output[0])
        parts = []
        for a in node.input:
            am = self.meta.get(a)
            if isinstance(am, Const):
                parts.append(am.make(gr))
            elif isinstance(am, Grid):
                parts.append(self.env[a] if am == gr else self.requant(self.env[a], am.scale / gr.scale, (), gr,
                                                                       gr.qmin, am.zero_point))
            else:
                raise QpipeError(f"{node.name}: Concat of an unsupported value in the integer graph")
        y = self.node("Concat", parts, "concat", **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        self.env[node.output[0]], self.meta[node.output[0]] = y, gr
        self.fold(chain, y, gr)

    def pad(self, node: onnx.NodeProto) -> None:
        """Padding on a grid: a constant pad writes the grid's value of the constant (0.0 is the zero point);
        reflect / edge copy values."""
        x = node.input[0]
        xm = self.meta.get(x)
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: padding needs a quantized input in the integer graph")
        inputs = [self.env[x], self.tensor(node.input[1])]
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        if mode == "constant":
            name = node.input[2] if len(node.input) > 2 else ""
            value = self.values.get(name, self.inits.get(name)) if name else None
            fill = 0.0 if value is None else float(np.asarray(value).reshape(()))
            inputs.append(self.const(round(fill / xm.scale) + xm.zero_point))
        y = self.node("Pad", inputs, "pad", mode=mode)
        self.env[node.output[0]], self.meta[node.output[0]] = y, xm

    def masked_fill(self, node: onnx.NodeProto) -> None:
        """masked_fill(mask, -inf) before a softmax: ``MASKED``, which the IntSoftmax gives no weight; a small
        negative fill the lowest value of the grid, a positive one the highest."""
        cond, a, b = node.input
        fill_first = a in self.values
        fill, x = (a, b) if fill_first else (b, a)
        xm = self.meta.get(x)
        if fill not in self.values or self.values[fill].size != 1 or not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: Where has no integer form here (only masked_fill with a constant)")
        value = float(self.values[fill].reshape(()))
        fill_value, meta = masked_fill_value(xm, value)
        f = self.const(fill_value)
        y = self.node("Where", [self.env[cond], f, self.env[x]] if fill_first else [self.env[cond], self.env[x], f],
                      "masked_fill")
        self.env[node.output[0]], self.meta[node.output[0]] = y, meta

    def visit_int_op(self, node: onnx.NodeProto) -> None:
        """IntSoftmax / IntGELU / IntLayerNorm (``Kind.SOFTMAX`` / ``GELU`` / ``LAYERNORM``) with the recorded
        constants."""
        name, x = self.mark_name(node), node.input[0]
        rec = self.record.intops.get(name)
        xm = self.meta.get(x)
        if rec is None:
            raise QpipeError(f"graph.onnx has the integer op {name!r}, which qparams.json does not record")
        if isinstance(xm, MaskedGrid) and rec.op == INT_SOFTMAX:
            xm = xm.grid   # masked scores: MASKED - z stays far below every real score
        if not isinstance(xm, Grid):
            raise QpipeError(f"{name}: integer {rec.op} needs a quantized input")
        xs = self.node("Sub", [self.env[x], self.const(xm.zero_point)], f"{name}/sub_zp")
        if rec.op in (INT_SOFTMAX, INT_GELU):
            y = self.node(rec.op, [xs, self.const(rec.x0)], f"{name}/{rec.op}", domain=QPIPE_DOMAIN)
        else:
            y = self.node(INT_LAYERNORM, [xs, self.const(rec.m), self.const(rec.k), self.const(rec.b),
                                          self.const(rec.zero_point), self.const(rec.qmin), self.const(rec.qmax)],
                          f"{name}/{rec.op}", domain=QPIPE_DOMAIN)
        out = node.output[0]
        self.env[out] = y
        if rec.op == INT_GELU:
            self.meta[out] = Acc(xm.scale * 2.0**-OUT_BITS)
            return
        mark, gr, _, chain = self.quantizer_after(out)
        if rec.op == INT_SOFTMAX and (gr.scale, gr.zero_point) != (2.0**-OUT_BITS, 0):
            raise QpipeError(f"{name}: IntSoftmax writes at scale 2^-{OUT_BITS}, but the quantizer after it has "
                             f"scale {gr.scale}")
        self.meta[out] = gr
        self.fold(chain, y, gr)

    # -- pooling
    def max_pool(self, node: onnx.NodeProto) -> None:
        x = node.input[0]
        xm = self.meta.get(x)
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: MaxPool needs a quantized input in the integer graph")
        require_8bit(xm, "MaxPool")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("ceil_mode", 0) or any(d != 1 for d in attrs.get("dilations", [1])):
            raise QpipeError("the integer graph supports MaxPool2d without dilation or ceil_mode")
        xc = self.node("Cast", [self.env[x]], "to_int8", to=TensorProto.INT8 if xm.signed else TensorProto.UINT8)
        y = self.node("MaxPool", [xc], "maxpool", **attrs)   # MaxPool has no int64 kernel
        self.env[node.output[0]] = self.node("Cast", [y], "maxpool64", to=TensorProto.INT64)
        self.meta[node.output[0]] = xm

    def visit_pool(self, node: onnx.NodeProto) -> None:
        """Global average pooling (``Kind.POOL``): the sum over H x W; 1/(HW) goes into the next requantisation."""
        x, y = node.input[0], node.output[0]
        xm = self.meta.get(x)
        if not isinstance(xm, Grid):
            raise QpipeError(f"{node.name}: pooling needs a quantized input in the integer graph")
        tin, tout = self.shapes[x], self.shapes[y]
        if len(tout) != 4 or tuple(tout[2:]) != (1, 1):
            raise QpipeError(f"{node.name}: only global average pooling is supported in the integer graph")
        xs = self.node("Sub", [self.env[x], self.const(xm.zero_point)], "pool_sub_zp")
        self.env[y] = self.node("ReduceSum", [xs, self.const([2, 3])], "sumpool", keepdims=1)
        self.meta[y] = Acc(xm.scale / (tin[2] * tin[3]))

    # -- AdderNets
    def visit_adder(self, node: onnx.NodeProto) -> None:
        """An adder layer (``Kind.ADDER``: its marked weights, then ai.qpipe Adder2d). Per filter group: the input requantised to the group's unsigned b-bit codes, ``-sum |x - 2 w|``
        exactly (AdderInteger), plus the integer clamp bias; groups concatenated and put back in channel order."""
        if node.op_type == MARK_ADDER:
            self.meta[node.output[0]] = Weight(self.mark_name(node))
            return
        x, w = node.input
        xm, wm = self.meta.get(x), self.meta.get(w)
        if not isinstance(wm, Weight):
            raise QpipeError(f"{node.name}: the integer-only graph needs a calibrated adder layer")
        name = wm.tensor
        if not isinstance(xm, Grid):
            raise QpipeError(f"{name}: the integer-only graph needs a quantized input to every adder layer")
        try:
            codes, group = self.state[state_key(name, WEIGHT_INT)], self.state[state_key(name, GROUP)]
            scales, clamp = self.state[state_key(name, GROUP_SCALE)], self.state[state_key(name, CLAMP_BIAS)]
            bits = int(self.state[state_key(name, ADDER_BITS)])
        except KeyError as e:
            raise QpipeError(f"quantized.safetensors has no {e.args[0]} for the adder layer {name}") from e
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        qmax = 2**bits - 1
        steps = (scales.astype(np.float32) / np.float32(qmax)).astype(np.float64)   # float32, as the Q-model
        src = self.env[x]
        if xm.zero_point:
            src = self.node("Sub", [src, self.const(xm.zero_point)], f"{name}/sub_zp")
        outs, order, channel_scale = [], [], [0.0] * len(group)
        for g, step in enumerate(steps.tolist()):
            sel = np.flatnonzero(group == g)
            d = dyadic(xm.scale / step)
            q = self.node(REQUANT, [src, self.const(d.m[0]), self.const(d.k[0]), self.const(0), self.const(0),
                                    self.const(qmax)], f"{name}/group{g}/codes", domain=QPIPE_DOMAIN)
            q8 = self.node("Cast", [q], f"{name}/group{g}/u8", to=TensorProto.UINT8)
            wq = self.const(codes[sel].astype(np.int8), np.int8, base=f"{name}.group{g}.weight")
            acc = self.node(ADDER_INTEGER, [q8, wq, self.const(2, np.int32)], f"{name}/group{g}/AdderInteger",
                            domain=QPIPE_DOMAIN, **attrs)
            acc = self.node("Cast", [acc], f"{name}/group{g}/acc", to=TensorProto.INT64)
            b = np.rint(clamp[sel].astype(np.float64) / step).astype(np.int64).reshape(1, -1, 1, 1)
            outs.append(self.node("Add", [acc, self.const(b)], f"{name}/group{g}/bias"))
            order.extend(sel.tolist())
            for o in sel.tolist():
                channel_scale[o] = step
        y = outs[0] if len(outs) == 1 else self.node("Concat", outs, f"{name}/groups", axis=1)
        y = self.node("Gather", [y, self.const(np.argsort(np.asarray(order)))], f"{name}/channel_order", axis=1)
        self.env[node.output[0]], self.meta[node.output[0]] = y, Acc(tuple(channel_scale), axis=1)

    def visit_bn(self, node: onnx.NodeProto) -> None:
        """BatchNorm (eval) on a per-channel accumulator no conv absorbed (after an adder layer): gamma / sigma
        goes into the accumulator's scale (its sign into the integers), beta - gamma mu / sigma becomes an
        integer bias on that scale."""
        x = node.input[0]
        xm = self.meta.get(x)
        if not isinstance(xm, Acc) or xm.bounds is not None:
            raise QpipeError(f"{node.name}: the integer graph folds BatchNorm only into the accumulator of the "
                             "layer before it")
        gamma, beta, mean, var = (self.inits[i].astype(np.float64) for i in node.input[1:5])
        eps = _decimal(next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5))
        f = gamma / np.sqrt(var + eps)
        s = np.broadcast_to(np.asarray(scales(xm.scale), np.float64), f.shape)
        new = np.where(f != 0, s * np.abs(f), s)
        sign = np.sign(f).astype(np.int64).reshape(1, -1, 1, 1)
        bias = np.rint((beta - f * mean) / new).astype(np.int64).reshape(1, -1, 1, 1)
        y = self.node("Add", [self.node("Mul", [self.env[x], self.const(sign)], "bn_sign"), self.const(bias)],
                      "bn_bias")
        self.env[node.output[0]], self.meta[node.output[0]] = y, Acc(tuple(new.tolist()), axis=1)


def value_shapes(graph: onnx.ModelProto, specs, functions) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the marked float graph on a batch of 2 (onnxruntime on the graph with its
    marks as identities), for ranks and pooling windows."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(graph)
    for n in m.graph.node:
        if n.domain == MARK_DOMAIN:
            n.op_type, n.domain = "Identity", ""
            del n.attribute[:]
    opsets = [o for o in m.opset_import if o.domain != MARK_DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    if any(n.domain == QPIPE_DOMAIN for n in m.graph.node):
        if not any(o.domain == QPIPE_DOMAIN for o in m.opset_import):
            m.opset_import.extend(functions.opset_imports())
        default = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        m.functions.extend(functions.function_protos(default, used={n.op_type for n in m.graph.node
                                                                    if n.domain == QPIPE_DOMAIN}))
    known = {o.name for o in m.graph.output}
    names = [o for n in m.graph.node for o in n.output if o and o not in known]
    m.graph.output.extend([onnx.ValueInfoProto(name=o) for o in names])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = dict(zip([i.name for i in sess.get_inputs()], dummy_arrays(specs), strict=True))
    outs = sess.run(None, feed)
    return {o.name: tuple(np.shape(v)) for o, v in zip(sess.get_outputs(), outs, strict=True)} | \
        {k: v.shape for k, v in feed.items()}


def build_int_graph(graph: onnx.ModelProto, record: QuantRecord, state: dict[str, np.ndarray],
                    opset: int) -> onnx.ModelProto:
    """The integer-only model of an artifact (ai.qpipe functions not yet attached)."""
    from . import intops as functions

    shapes = value_shapes(graph, record.input_specs(), functions)
    return IntGraph(graph, record, state, shapes, opset).run()
