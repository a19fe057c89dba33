"""QDQ export: the float graph of the artifact with every ``qpipe.mark::Mark`` node replaced by
DequantizeLinear of the exact integer weights, or by a QuantizeLinear -> DequantizeLinear pair on activations.

Layout (what onnxruntime on x86 runs fastest): activations as uint8 (a signed b-bit activation maps losslessly
to uint8 with zero point +128), weights int8 (or INT4 for 4-bit Conv weights at opset 21), biases int32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

from qpipe.artifact import Artifact
from qpipe.errors import QpipeError
from qpipe.intvalues import masked_below
from qpipe.kinds import INT_OP_KINDS, REGISTRY, Kind, resolve
from qpipe.onnx_names import (
    ADDER2D,
    APOT_PROJECT,
    DEFAULT_OPSET,
    INT_GELU,
    INT_SOFTMAX,
    IR_VERSION,
    MARK,
    MARK_ADDER,
    MARK_DOMAIN,
    MARK_INT_OP,
    MIN_INT_OPSET,
    QPIPE_DOMAIN,
)
from qpipe.record import (
    ADDER_BITS,
    CLAMP_BIAS,
    GROUP,
    GROUP_SCALE,
    WEIGHT_INT,
    Encoding,
    IntOpRecord,
    QuantRecord,
    TensorKind,
    int_key,
    state_key,
)
from qpipe.reference.intops import MASKED

from . import intops as intops_onnx

FORMATS = ("qdq", "fp32", "int", "all")
LAYOUTS = ("u8", "s8")   # activation container: uint8 (fast on x86) or int8
# onnxruntime's x86 u8 x s8 kernels (VPMADDUBSW) add pairs of products in int16 with saturation:
# 2 * 255 * |w| <= 32767 holds for |w| <= 64. Wider int8 weights feeding a uint8 activation are stored as
# uint8 with zero point +128 instead, which runs the exact u8 x u8 kernel (same integers, same result).
U8S8_SAFE_WEIGHT = 64
WEIGHT_LAYOUT_PROP = "qpipe.weight_layout"   # ONNX metadata: the weight container choice a QDQ file holds


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise QpipeError(f"{path} is not a readable ONNX file ({type(e).__name__})") from e


def _act_layout(rec: Encoding, layout: str):
    """(onnx dtype, zero point, shift) for an activation encoding in ``layout``; shift maps q to the container."""
    signed, bits, z = rec.signed, rec.bits, int(rec.zero_point)
    if bits > 8:  # 16-bit residual stream (opset 21)
        return (TensorProto.INT16, np.int16(z), 0) if signed else (TensorProto.UINT16, np.uint16(z), 0)
    if layout == "u8":
        shift = 2 ** (bits - 1) if signed else 0
        return TensorProto.UINT8, np.uint8(z + shift), shift
    shift = 0 if signed else -(2 ** (bits - 1))
    return TensorProto.INT8, np.int8(z + shift), shift


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.new_nodes: list[onnx.NodeProto] = []

    def add_init(self, name: str, arr: np.ndarray | None = None, tensor: onnx.TensorProto | None = None) -> str:
        if name in self.inits:
            return name
        t = tensor if tensor is not None else numpy_helper.from_array(arr, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name


def _int4_tensor(name: str, a: np.ndarray) -> onnx.TensorProto:
    """ONNX INT4 as raw packed nibbles (element 2i in the low nibble, 2i+1 in the high one); a list would be
    stored as varint int32_data, about 1.4x larger."""
    flat = np.asarray(a, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    packed = ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, np.shape(a), packed.tobytes(), raw=True)


def _weight_tensors(name: str, q: np.ndarray, zp: np.ndarray, bits: int, container: str):
    """Integer weight initializer and its zero point in ``container``: int4 | int8 | uint8 (+128)."""
    if container == "int4":
        return _int4_tensor(f"{name}_quantized", q), _int4_tensor(f"{name}_zero_point", zp)
    if container == "uint8":
        t = numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), f"{name}_quantized")
        z = numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), f"{name}_zero_point")
        return t, z
    return (numpy_helper.from_array(q.astype(np.int8), f"{name}_quantized"),
            numpy_helper.from_array(zp.astype(np.int8), f"{name}_zero_point"))


# Weight containers for the integer kernels that read a uint8 activation:
#   portable: int8 weights with |w| > 64 as uint8 + 128 (the u8 x u8 kernel): exact on every CPU, but on CPUs
#             with VNNI that kernel is about half as fast as u8 x s8;
#   int8:     int8 always (the u8 x s8 kernel): fastest, exact where the int8 dot product sums in int32
#             (x86 VNNI / AMX), saturating on AVX2 and AVX-512 without VNNI;
#   auto:     int8 where the exporting CPU has VNNI or AMX, portable elsewhere. The file records which one it
#             holds (metadata ``qpipe.weight_layout``) and ``qpipe check`` fails an int8 file on a CPU that
#             would saturate it, so an artifact is never silently wrong on another machine.
WEIGHT_LAYOUTS = ("auto", "portable", "int8")


def resolve_weight_layout(weight_layout: str) -> str:
    """``auto`` -> the fastest exact container choice on this CPU."""
    if weight_layout not in WEIGHT_LAYOUTS:
        raise QpipeError(f"unknown weight layout {weight_layout!r}; use one of {', '.join(WEIGHT_LAYOUTS)}")
    if weight_layout != "auto":
        return weight_layout
    from qpipe.runtime.session import u8s8_exact

    return "int8" if u8s8_exact() else "portable"


def weight_container(q: np.ndarray, bits: int, users: list[str], fused_input: bool, layout: str, opset: int,
                     weight_layout: str = "portable", int4: bool = True) -> str:
    fits4 = q.size == 0 or (int(q.min()) >= -8 and int(q.max()) <= 7)  # APoT b-bit codes reach +-D (D up to 100)
    if int4 and opset >= 21 and bits <= 4 and fits4 and users and all(u in ("Conv", "Gather") for u in users):
        # Conv and embedding tables (Gather) only: onnxruntime rewrites INT4 DequantizeLinear->MatMul into
        # approximate MatMulNBits
        return "int4"
    if (weight_layout == "portable" and layout == "u8" and fused_input
            and np.abs(q.astype(np.int32)).max(initial=0) > U8S8_SAFE_WEIGHT):
        return "uint8"
    return "int8"


def wide_int8_weights(model: onnx.ModelProto) -> list[str]:
    """int8 weight initializers of a QDQ file with a value beyond +-64: the ones a saturating u8 x s8 kernel
    (x86 without VNNI) can get wrong when they meet a uint8 activation."""
    out = []
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    tables = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
              and consumers.get(n.output[0]) and all(u == "Gather" for u in consumers[n.output[0]])}
    for t in model.graph.initializer:
        if t.name in tables:   # an embedding table: gathered and dequantized, never read by an integer kernel
            continue
        if t.data_type == TensorProto.INT8 and t.name.endswith(".weight_quantized"):
            a = numpy_helper.to_array(t)
            if a.size and np.abs(a.astype(np.int16)).max() > U8S8_SAFE_WEIGHT:
                out.append(t.name.removesuffix("_quantized"))
    return out


@dataclass
class Emit:
    """What every QDQ emitter reads: the builder of the new graph, the record, the integers and the options."""

    b: _Builder
    record: QuantRecord
    ints: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    consumers: dict[str, list[onnx.NodeProto]]
    layout: str
    opset: int
    strip_only: bool
    weight_layout: str
    int4: bool


def _mark_kind(emit: Emit, node: onnx.NodeProto, name: str) -> Kind:
    """The op kind whose emitter replaces a mark: weights and biases belong to a layer, activation marks are
    quantizers, an integer-op mark is its op's kind."""
    if node.op_type == MARK_ADDER:
        return Kind.ADDER
    if node.op_type == MARK_INT_OP:
        rec = emit.record.intops.get(name)
        if rec is None:
            raise QpipeError(f"graph.onnx has the integer op {name!r}, which qparams.json does not record")
        return INT_OP_KINDS[rec.op]
    rec = emit.record.tensors.get(name)
    if rec is None:
        raise QpipeError(f"graph.onnx marks {name!r}, which qparams.json does not record")
    return Kind.LAYER if rec.kind in (TensorKind.WEIGHT, TensorKind.BIAS) else Kind.QUANTIZER


def build_qdq(graph: onnx.ModelProto, record: QuantRecord, ints: dict[str, np.ndarray], *, layout: str = "u8",
              opset: int = DEFAULT_OPSET, strip_only: bool = False, weight_layout: str = "portable",
              int4: bool = True, state: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Replace the Mark nodes of ``graph``, each by its kind's emitter (``REGISTRY[kind].qdq_emitter``).
    ``strip_only`` gives the plain float model (marks dropped, integer ops back to their float ops)."""
    if layout not in LAYOUTS:
        raise QpipeError(f"unknown activation layout {layout!r}; use one of {LAYOUTS}")
    weight_layout = resolve_weight_layout(weight_layout)
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    emit = Emit(_Builder(model), record, ints, state or {}, consumers, layout, opset, strip_only, weight_layout,
                int4)
    out_nodes = []
    adder_weights: dict[str, str] = {}   # output of an Adder mark -> the adder layer's name
    for node in model.graph.node:
        if node.domain == QPIPE_DOMAIN and node.op_type == ADDER2D and node.input[1] in adder_weights:
            emitter = resolve(REGISTRY[Kind.ADDER].qdq_emitter)
            out_nodes.extend(emitter(emit, adder_weights[node.input[1]], node))
            continue
        if node.domain != MARK_DOMAIN:
            out_nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        if node.op_type == MARK_ADDER:   # the adder layer's weights: the Adder2d that reads them is expanded
            adder_weights[node.output[0]] = name
            continue
        kind = _mark_kind(emit, node, name)
        if strip_only and node.op_type == MARK:
            out_nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=f"{name}/identity"))
            continue
        out_nodes.extend(resolve(REGISTRY[kind].qdq_emitter)(emit, name, node))
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    # drop the float weights that integers replaced
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    opsets = [o for o in model.opset_import if o.domain != MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    del model.functions[:]
    uses_int = any(n.domain == QPIPE_DOMAIN for n in model.graph.node)
    if uses_int and opset < MIN_INT_OPSET:
        raise QpipeError(f"integer ops (recipe ops.*: int) need --opset {MIN_INT_OPSET} or higher, got {opset}")
    return _finish(model, opset, with_functions=uses_int)


def weight_nodes(emit: Emit, name: str, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """A layer's weight or bias mark: DequantizeLinear of the exact integers (``Kind.LAYER``)."""
    rec, b, y = emit.record.tensors[name], emit.b, node.output[0]
    key = int_key(name)
    if key not in emit.ints:
        raise QpipeError(f"quantized.safetensors has no {key}")
    q = emit.ints[key]
    scale = np.asarray(rec.scale, dtype=np.float32)
    if rec.kind == TensorKind.WEIGHT:
        users = [u.op_type for u in emit.consumers.get(y, [])]
        layer = emit.record.layers.get(name.removesuffix(".weight"))
        fused_input = layer is not None and layer.input is not None
        container = weight_container(q, rec.bits, users, fused_input, emit.layout, emit.opset, emit.weight_layout,
                                     emit.int4)
        t, zt = _weight_tensors(name, q, np.asarray(rec.zero_point), rec.bits, container)
    else:
        t = numpy_helper.from_array(q.astype(np.int32), f"{name}_quantized")
        zt = numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int32), f"{name}_zero_point")
    b.add_init(t.name, tensor=t)
    b.add_init(f"{name}_scale", scale)
    b.add_init(zt.name, tensor=zt)
    attrs = {"axis": rec.axis} if rec.axis is not None and scale.ndim == 1 else {}
    return [helper.make_node("DequantizeLinear", [t.name, f"{name}_scale", zt.name], [y],
                             name=f"{name}/DequantizeLinear", **attrs)]


def activation_nodes(emit: Emit, name: str, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """An activation quantizer's mark: (Clip to a narrower grid ->) QuantizeLinear -> DequantizeLinear in the
    activation layout, or APoTProject for APoT levels (``Kind.QUANTIZER``)."""
    rec, b = emit.record.tensors[name], emit.b
    x, y = node.input[0], node.output[0]
    if rec.apot:
        return _apot_nodes(b, name, rec, x, y)
    dt, zp, shift = _act_layout(rec, emit.layout)
    bits, scale = rec.bits, np.float32(rec.scale)
    qmin = rec.qmin + shift
    qmax = qmin + 2**bits - 1
    b.add_init(f"{name}_scale", np.array(scale, dtype=np.float32))
    zname = f"{name}_zero_point_{emit.layout}"
    b.add_init(zname, np.array(zp))
    nodes, src = [], x
    container = (0, 255) if dt == TensorProto.UINT8 else (-128, 127)
    if (qmin, qmax) != container:
        # narrower than the container: clip to the b-bit grid in float first (exact, see tests)
        lo = np.float32((qmin - int(zp)) * scale)
        hi = np.float32((qmax - int(zp)) * scale)
        b.add_init(f"{name}_clip_lo", np.array(lo))
        b.add_init(f"{name}_clip_hi", np.array(hi))
        src = f"{y}/clipped"
        nodes.append(helper.make_node("Clip", [x, f"{name}_clip_lo", f"{name}_clip_hi"], [src], name=f"{y}/Clip"))
    qout = f"{y}/quantized"
    nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_scale", zname], [qout],
                                  name=f"{y}/QuantizeLinear"))
    nodes.append(helper.make_node("DequantizeLinear", [qout, f"{name}_scale", zname], [y],
                                  name=f"{y}/DequantizeLinear"))
    return nodes


def adder_nodes(emit: Emit, name: str, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """An AdderQuant layer: per group of filters, the input on the group's unsigned b-bit grid (Clip, Q, DQ at
    step S/(2^b-1)), the weight codes dequantized at 2S/(2^b-1), Adder2d, plus the clamp bias; the groups
    concatenated and gathered back into channel order; the float adder with the float weights for the fp32 model
    (``Kind.ADDER``)."""
    b, state, float_only = emit.b, emit.state, emit.strip_only
    attrs = {a.name: list(a.ints) for a in node.attribute}
    x, y = node.input[0], node.output[0]
    if float_only:
        w = b.add_init(f"{name}.weight", state[f"{name}.weight"].astype(np.float32))
        return [helper.make_node(ADDER2D, [x, w], [y], domain=QPIPE_DOMAIN, name=f"{name}/Adder2d", **attrs)]
    try:
        codes, group = state[state_key(name, WEIGHT_INT)], state[state_key(name, GROUP)]
        scales, bias = state[state_key(name, GROUP_SCALE)], state[state_key(name, CLAMP_BIAS)]
        bits = int(state[state_key(name, ADDER_BITS)])
    except KeyError as e:
        raise QpipeError(f"quantized.safetensors has no {e.args[0]} for the adder layer {name}") from e
    nodes, outs, order = [], [], []
    qmax = 2**bits - 1
    for g in range(len(scales)):
        sel = np.flatnonzero(group == g)
        step = np.float32(np.float32(scales[g]) / np.float32(qmax))
        p = f"{name}/group{g}/"
        src = x
        if bits < 8:
            src = p + "clipped"
            nodes.append(helper.make_node("Clip", [x, b.add_init(p + "lo", np.array(np.float32(0))),
                                                   b.add_init(p + "hi", np.array(np.float32(qmax * step)))],
                                          [src], name=p + "Clip"))
        sc = b.add_init(p + "step", np.array(step))
        zp = b.add_init(p + "zero_point", np.array(np.uint8(0)))
        nodes += [helper.make_node("QuantizeLinear", [src, sc, zp], [p + "xq"], name=p + "QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [p + "xq", sc, zp], [p + "x"], name=p + "DequantizeLinear")]
        wq = b.add_init(f"{name}.group{g}.weight_quantized", codes[sel].astype(np.int8))
        ws = b.add_init(p + "weight_step", np.array(np.float32(2) * step))
        wz = b.add_init(p + "weight_zero_point", np.array(np.int8(0)))
        nodes += [helper.make_node("DequantizeLinear", [wq, ws, wz], [p + "w"], name=p + "WeightDequantizeLinear"),
                  helper.make_node(ADDER2D, [p + "x", p + "w"], [p + "acc"], domain=QPIPE_DOMAIN,
                                   name=p + "Adder2d", **attrs),
                  helper.make_node("Add", [p + "acc", b.add_init(p + "bias", bias[sel].astype(np.float32).reshape(
                      1, -1, 1, 1))], [p + "y"], name=p + "ClampBias")]
        outs.append(p + "y")
        order.extend(sel.tolist())
    if len(outs) == 1:
        nodes[-1].output[0] = y
        return nodes
    inverse = np.argsort(np.asarray(order)).astype(np.int64)
    nodes += [helper.make_node("Concat", outs, [f"{name}/groups"], axis=1, name=f"{name}/Concat"),
              helper.make_node("Gather", [f"{name}/groups", b.add_init(f"{name}/channel_order", inverse)], [y],
                               axis=1, name=f"{name}/ChannelOrder")]
    return nodes


def _apot_nodes(b: _Builder, name: str, rec: Encoding, x: str, y: str) -> list[onnx.NodeProto]:
    """APoT activation levels: ai.qpipe APoTProject (fine cell, then the nearest-level table) -> uint8 codes ->
    DequantizeLinear at alpha / D: the exact values of the PyTorch Q-model."""
    step = b.add_init(f"{name}_fine_step", np.array(np.float32(rec.levels.fine_step)))
    table = b.add_init(f"{name}_table", np.asarray(rec.levels.table, dtype=np.int64))
    scale = b.add_init(f"{name}_scale", np.array(np.float32(rec.scale)))
    zp = b.add_init(f"{name}_zero_point_apot", np.array(np.uint8(0)))
    return [helper.make_node(APOT_PROJECT, [x, step, table], [f"{y}/codes"], domain=QPIPE_DOMAIN,
                             name=f"{y}/APoTProject"),
            helper.make_node("Cast", [f"{y}/codes"], [f"{y}/quantized"], to=TensorProto.UINT8, name=f"{y}/Cast"),
            helper.make_node("DequantizeLinear", [f"{y}/quantized", scale, zp], [y], name=f"{y}/DequantizeLinear")]


def int_op_nodes(emit: Emit, name: str, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Q (input grid) -> Cast int64 -> ai.qpipe op -> Cast float -> times the op's output scale: the exact
    float values that the PyTorch Q-model computes; the float op for the fp32 model (``Kind.SOFTMAX`` /
    ``GELU`` / ``LAYERNORM`` with ``ops.<op>: int``)."""
    b, rec, tensors, layout = emit.b, emit.record.intops[name], emit.record.tensors, emit.layout
    x, y = node.input[0], node.output[0]
    op = rec.op
    if emit.strip_only:
        return [_float_op(b, name, rec, x, y, emit.state)]
    src = tensors[rec.input]
    dt, zp, shift = _act_layout(src, layout)
    zname = b.add_init(f"{rec.input}_zero_point_{layout}", np.array(zp))
    sname = b.add_init(f"{rec.input}_scale", np.array(src.scale, dtype=np.float32))
    p = f"{name}/"
    nodes = [helper.make_node("QuantizeLinear", [x, sname, zname], [p + "q"], name=p + "QuantizeLinear"),
             helper.make_node("Cast", [p + "q"], [p + "q64"], to=TensorProto.INT64, name=p + "Cast"),
             helper.make_node("Sub", [p + "q64", b.add_init(p + "zin", np.array(int(zp), dtype=np.int64))],
                              [p + "x"], name=p + "SubZeroPoint")]
    c = lambda n, v: b.add_init(p + n, np.asarray(v, dtype=np.int64))
    xin = p + "x"
    if op == INT_SOFTMAX and any(n.op_type == "Where" and x in n.output for n in b.g.node):
        # masked scores (masked_fill(mask, -inf)): below the grid -> MASKED, which the op gives no weight
        low = np.float32(masked_below(float(src.scale), int(src.zero_point), src.qmin))
        nodes += [helper.make_node("Less", [x, b.add_init(p + "masked_below", np.array(low))], [p + "masked"],
                                   name=p + "Masked"),
                  helper.make_node("Where", [p + "masked", c("masked_value", MASKED), xin], [p + "xm"],
                                   name=p + "WhereMasked")]
        xin = p + "xm"
    if op in (INT_SOFTMAX, INT_GELU):
        nodes.append(helper.make_node(op, [xin, c("x0", rec.x0)], [p + "y"], domain=QPIPE_DOMAIN,
                                      name=p + op))
        zero_out = None
    else:
        nodes.append(helper.make_node(op, [p + "x", c("m", rec.m), c("k", rec.k), c("b", rec.b),
                                           c("z", rec.zero_point), c("qmin", rec.qmin), c("qmax", rec.qmax)],
                                      [p + "y"], domain=QPIPE_DOMAIN, name=p + op))
        zero_out = c("zout", rec.zero_point)
    last = p + "y"
    if zero_out is not None:
        nodes.append(helper.make_node("Sub", [last, zero_out], [p + "yc"], name=p + "SubOutZeroPoint"))
        last = p + "yc"
    nodes.append(helper.make_node("Cast", [last], [p + "yf"], to=TensorProto.FLOAT, name=p + "CastFloat"))
    if op == INT_GELU:  # float32(s_in) * 2^-8, as the PyTorch model multiplies
        out_scale = np.float32(np.float32(src.scale) * np.float32(2.0**-8))
    else:
        out_scale = np.float32(rec.output_scale)
    nodes.append(helper.make_node("Mul", [p + "yf", b.add_init(p + "out_scale", np.array(out_scale))], [y],
                                  name=p + "Scale"))
    return nodes


def _float_op(b: _Builder, name: str, rec: IntOpRecord, x: str, y: str, state: dict) -> onnx.NodeProto:
    """The float op an integer op replaced (for ``model.fp32.onnx`` of an artifact with integer ops)."""
    op = rec.op
    if op == INT_SOFTMAX:
        return helper.make_node("Softmax", [x], [y], axis=-1, name=f"{name}/Softmax")
    if op == INT_GELU:
        return helper.make_node("Gelu", [x], [y], name=f"{name}/Gelu")
    w, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    if w is None:
        raise QpipeError(f"quantized.safetensors has no {name}.weight for the float LayerNorm")
    inputs = [x, b.add_init(f"{name}.weight", w.astype(np.float32))]
    if bias is not None:
        inputs.append(b.add_init(f"{name}.bias", bias.astype(np.float32)))
    return helper.make_node("LayerNormalization", inputs, [y], axis=-1, epsilon=rec.eps if rec.eps is not None else 1e-5,
                            name=f"{name}/LayerNorm")


def _finish(model: onnx.ModelProto, opset: int, with_functions: bool = False) -> onnx.ModelProto:
    from onnx import version_converter

    if with_functions:  # the domain first (the converter must know it), the functions after the conversion
        model.opset_import.extend(intops_onnx.opset_imports())
    default = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if default != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as e:
            raise QpipeError(f"could not convert the graph to opset {opset}: {str(e).splitlines()[0][:200]}") from e
    model.ir_version = IR_VERSION
    model.producer_name = "qpipe"
    del model.graph.value_info[:]
    if with_functions:
        used = {n.op_type for n in model.graph.node if n.domain == QPIPE_DOMAIN}
        model.functions.extend(intops_onnx.function_protos(opset, used))
    model = simplify(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim without constant folding, so DequantizeLinear of integer initializers stays as it is."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model, skip_constant_folding=True, check_n=0)
    if not ok:
        raise QpipeError("onnxsim could not validate the simplified model")
    simplified.ir_version = IR_VERSION
    return simplified


def build_int(art: Artifact, record: QuantRecord, graph: onnx.ModelProto, state: dict[str, np.ndarray],
              opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """``model.int.onnx``: the integer-only graph written from the marked float graph, the record and the
    integers (``intgraph.build_int_graph``), with the ai.qpipe functions inside, at ``opset``, checked and
    simplified."""
    info = record.int_graph
    if info is None or not info.available:
        why = info.reason if info is not None else \
            "it was calibrated before qpipe wrote integer graphs; calibrate it again"
        raise QpipeError(f"{art.path} has no integer-only graph: {why}")
    if opset < MIN_INT_OPSET:
        raise QpipeError(f"the integer-only graph needs --opset {MIN_INT_OPSET} or higher, got {opset}")
    from .intgraph import build_int_graph

    return _finish(build_int_graph(graph, record, state, opset), opset, with_functions=True)


def export(artifact: Artifact | str | Path, format: str = "qdq", opset: int = DEFAULT_OPSET, layout: str = "u8",
           command: str | None = None, weight_layout: str = "auto", int4: bool = True) -> list[Path]:
    """Write ``model.qdq.onnx`` (and/or ``model.fp32.onnx``) into the artifact folder.

    ``int4``: store <=4-bit Conv weights as ONNX INT4 (smallest file; onnxruntime then runs those convs as
    DequantizeLinear + float Conv); False keeps them in int8 so they fuse into QLinearConv (faster)."""
    art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    if format not in FORMATS:
        raise QpipeError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if not 13 <= opset <= 21:
        raise QpipeError(f"--opset {opset} is outside 13..21 (per-axis QDQ needs 13, INT4 weights 21)")
    weight_layout = resolve_weight_layout(weight_layout)
    graph = _load(art.file("graph.onnx"))
    record = art.record
    try:
        state = load_file(str(art.file("quantized.safetensors")))
        ints = {k: v for k, v in state.items() if k.endswith(int_key(""))}
    except Exception as e:
        raise QpipeError(f"{art.file('quantized.safetensors')} is not a readable safetensors file") from e
    written = []
    has_int = record.int_graph is not None and record.int_graph.available
    todo = {"qdq": ["qdq"], "fp32": ["fp32"], "int": ["int"],
            "all": ["qdq", "fp32"] + (["int"] if has_int else [])}[format]
    for f in todo:
        if f == "int":
            model = build_int(art, record, graph, state, opset)
        else:
            model = build_qdq(graph, record, ints, layout=layout, opset=opset, strip_only=(f == "fp32"),
                              weight_layout=weight_layout, int4=int4, state=state)
        name = f"model.{f}.onnx"
        model.doc_string = json.dumps({"qpipe_format": f, "layout": layout, "weight_layout": weight_layout,
                                       "recipe": art.manifest.get("recipe")})
        if f == "qdq":
            helper.set_model_props(model, {WEIGHT_LAYOUT_PROP: weight_layout})
        art.add_file(name, model.SerializeToString(), command if f == todo[-1] else None)
        written.append(art.file(name))
    return written
