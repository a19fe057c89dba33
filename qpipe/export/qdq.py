"""QDQ export: the float graph of the artifact with every ``qpipe.mark::Mark`` node replaced by
DequantizeLinear of the exact integer weights, or by a QuantizeLinear -> DequantizeLinear pair on activations.

Layout (what onnxruntime on x86 runs fastest): activations as uint8 (a signed b-bit activation maps losslessly
to uint8 with zero point +128), weights int8 (or INT4 for 4-bit Conv weights at opset 21), biases int32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

from qpipe.artifact import Artifact
from qpipe.errors import QpipeError

MARK_DOMAIN = "qpipe.mark"
DEFAULT_OPSET = 21
IR_VERSION = 10          # onnxruntime 1.2x/1.3x refuse the IR version 14 that onnx.helper writes by default
FORMATS = ("qdq", "fp32", "all")
LAYOUTS = ("u8", "s8")   # activation container: uint8 (fast on x86) or int8
# onnxruntime's x86 u8 x s8 kernels (VPMADDUBSW) add pairs of products in int16 with saturation:
# 2 * 255 * |w| <= 32767 holds for |w| <= 64. Wider int8 weights feeding a uint8 activation are stored as
# uint8 with zero point +128 instead, which runs the exact u8 x u8 kernel (same integers, same result).
U8S8_SAFE_WEIGHT = 64


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise QpipeError(f"{path} is not a readable ONNX file ({type(e).__name__})") from e


def _act_layout(rec: dict, layout: str):
    """(onnx dtype, zero point, shift) for an activation record in ``layout``; shift maps q to the container."""
    signed, bits, z = rec["signed"], rec["bits"], int(rec["zero_point"])
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


WEIGHT_LAYOUTS = ("auto", "int8")  # int8: never switch to uint8 (unsafe on x86 u8 x s8; for diagnosis only)


def weight_container(q: np.ndarray, bits: int, users: list[str], fused_input: bool, layout: str, opset: int,
                     weight_layout: str = "auto", int4: bool = True) -> str:
    if int4 and opset >= 21 and bits <= 4 and users and all(u == "Conv" for u in users):
        return "int4"  # Conv only: onnxruntime rewrites INT4 DequantizeLinear->MatMul into approximate MatMulNBits
    if (weight_layout == "auto" and layout == "u8" and fused_input
            and np.abs(q.astype(np.int32)).max(initial=0) > U8S8_SAFE_WEIGHT):
        return "uint8"
    return "int8"


def build_qdq(graph: onnx.ModelProto, qparams: dict, ints: dict[str, np.ndarray], *, layout: str = "u8",
              opset: int = DEFAULT_OPSET, strip_only: bool = False, weight_layout: str = "auto",
              int4: bool = True) -> onnx.ModelProto:
    """Replace the Mark nodes of ``graph``. ``strip_only`` gives the plain float model (marks dropped)."""
    if layout not in LAYOUTS:
        raise QpipeError(f"unknown activation layout {layout!r}; use one of {LAYOUTS}")
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    b = _Builder(model)
    tensors = qparams["tensors"]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out_nodes = []
    for node in model.graph.node:
        if node.domain != MARK_DOMAIN:
            out_nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        x, y = node.input[0], node.output[0]
        if strip_only:
            out_nodes.append(helper.make_node("Identity", [x], [y], name=f"{name}/identity"))
            continue
        rec = tensors.get(name)
        if rec is None:
            raise QpipeError(f"graph.onnx marks {name!r}, which qparams.json does not record")
        if rec["kind"] in ("weight", "bias"):
            key = name + "_int"
            if key not in ints:
                raise QpipeError(f"quantized.safetensors has no {key}")
            q = ints[key]
            axis = rec["axis"]
            scale = np.asarray(rec["scale"], dtype=np.float32)
            if rec["kind"] == "weight":
                users = [u.op_type for u in consumers.get(y, [])]
                layer = qparams["layers"].get(name.removesuffix(".weight"), {})
                container = weight_container(q, rec["bits"], users, layer.get("input") is not None, layout, opset,
                                             weight_layout, int4)
                t, zt = _weight_tensors(name, q, np.asarray(rec["zero_point"]), rec["bits"], container)
            else:
                t = numpy_helper.from_array(q.astype(np.int32), f"{name}_quantized")
                zp = np.zeros(scale.shape, dtype=np.int32)
                zt = numpy_helper.from_array(zp, f"{name}_zero_point")
            b.add_init(t.name, tensor=t)
            b.add_init(f"{name}_scale", scale)
            b.add_init(zt.name, tensor=zt)
            attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
            out_nodes.append(helper.make_node("DequantizeLinear", [t.name, f"{name}_scale", zt.name], [y],
                                              name=f"{name}/DequantizeLinear", **attrs))
        else:
            dt, zp, shift = _act_layout(rec, layout)
            bits, scale = rec["bits"], np.float32(rec["scale"])
            qmin = (-(2 ** (bits - 1)) if rec["signed"] else 0) + shift
            qmax = qmin + 2**bits - 1
            b.add_init(f"{name}_scale", np.array(scale, dtype=np.float32))
            zname = f"{name}_zero_point_{layout}"
            b.add_init(zname, np.array(zp))
            src = x
            container = (0, 255) if dt == TensorProto.UINT8 else (-128, 127)
            if (qmin, qmax) != container:
                # narrower than the container: clip to the b-bit grid in float first (exact, see tests)
                lo = np.float32((qmin - int(zp)) * scale)
                hi = np.float32((qmax - int(zp)) * scale)
                b.add_init(f"{name}_clip_lo", np.array(lo))
                b.add_init(f"{name}_clip_hi", np.array(hi))
                src = f"{y}/clipped"
                out_nodes.append(helper.make_node("Clip", [x, f"{name}_clip_lo", f"{name}_clip_hi"], [src],
                                                  name=f"{y}/Clip"))
            qout = f"{y}/quantized"
            out_nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_scale", zname], [qout],
                                              name=f"{y}/QuantizeLinear"))
            out_nodes.append(helper.make_node("DequantizeLinear", [qout, f"{name}_scale", zname], [y],
                                              name=f"{y}/DequantizeLinear"))
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
    return _finish(model, opset)


def _finish(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    default = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if default != opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as e:
            raise QpipeError(f"could not convert the graph to opset {opset}: {str(e).splitlines()[0][:200]}") from e
    model.ir_version = IR_VERSION
    model.producer_name = "qpipe"
    del model.graph.value_info[:]
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
    if weight_layout not in WEIGHT_LAYOUTS:
        raise QpipeError(f"unknown weight layout {weight_layout!r}; use one of {WEIGHT_LAYOUTS}")
    graph = _load(art.file("graph.onnx"))
    qparams = art.qparams
    try:
        ints = {k: v for k, v in load_file(str(art.file("quantized.safetensors"))).items() if k.endswith("_int")}
    except Exception as e:
        raise QpipeError(f"{art.file('quantized.safetensors')} is not a readable safetensors file") from e
    written = []
    todo = {"qdq": ["qdq"], "fp32": ["fp32"], "all": ["qdq", "fp32"]}[format]
    for f in todo:
        model = build_qdq(graph, qparams, ints, layout=layout, opset=opset, strip_only=(f == "fp32"),
                          weight_layout=weight_layout, int4=int4)
        name = f"model.{f}.onnx"
        model.doc_string = json.dumps({"qpipe_format": f, "layout": layout, "weight_layout": weight_layout,
                                       "recipe": art.manifest.get("recipe")})
        art.add_file(name, model.SerializeToString(), command if f == todo[-1] else None)
        written.append(art.file(name))
    return written
