"""``qpipe check``: gate an artifact in CI: manifest hashes, onnx.checker, the allowed op set, integer weights
equal to the record, parity and accuracy floors (``--expect FILE``)."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qpipe.artifact import Artifact, sha256
from qpipe.errors import QpipeError
from qpipe.onnx_names import ADDER2D, INT_LAYERNORM, INT_SOFTMAX
from qpipe.onnx_names import QPIPE_DOMAIN as INT_DOMAIN
from qpipe.record import Encoding, TensorKind, int_key

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "Pad",
           "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Identity", "Transpose", "Concat",
           "ReduceMean", "Mul", "Sigmoid", "HardSwish", "HardSigmoid", "LeakyRelu", "PRelu", "Tanh", "Elu", "Mish",
           # transformers: float Softmax / LayerNorm / GELU between Q/DQ, the int64 Cast/Sub around ai.qpipe ops,
           # and the shape arithmetic of the class token
           "Softmax", "LayerNormalization", "Gelu", "Erf", "Div", "Sub", "Pow", "Sqrt", "Cast", "Gather", "Shape",
           "Unsqueeze", "Expand", "Where", "Equal", "ConstantOfShape", "Constant", "Slice", "Squeeze",
           # AdderNets: the BatchNorm after each adder layer (no conv to fold it into) and its groups' channel order
           "BatchNormalization",
           # transformers as they ship: attention masks and positions built from the inputs (integer / boolean)
           "And", "Or", "Not", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Range", "GatherElements",
           "Trilu", "Neg"}
# The integer-only graph: integer tensors only, between one QuantizeLinear and one DequantizeLinear
INT_OPS = {"QuantizeLinear", "DequantizeLinear", "Cast", "ConvInteger", "MatMulInteger", "Add", "Sub", "Mul",
           "Reshape", "Transpose", "Gather", "Concat", "Shape", "Unsqueeze", "Squeeze", "Expand", "Where", "Equal",
           "ConstantOfShape", "Flatten", "MaxPool", "ReduceSum", "Constant", "Identity", "Slice", "Pad",
           # attention masks and positions from integer inputs (every tensor is still checked to be an integer)
           "And", "Or", "Not", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Range", "GatherElements",
           "Trilu", "Neg"}
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
             onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
             onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.BOOL}
# Parity of a QDQ export with the PyTorch quantized model. In the optimised session the reference is the Q-model
# with onnxruntime's fused-kernel arithmetic (qpipe.pipeline.ortexact): measured 0 steps on the demo CNN, ResNet18
# and EfficientNet-Lite0; 2 leaves room for a kernel outside the emulated set. The validation session sums
# each float Conv in its own order, so a value on a rounding tie may land one step away, and a layer whose output
# step is finer than its input step times its weights amplifies that (x17 in one EfficientNet-Lite0 depthwise
# layer: 6 steps at the logits, where onnxruntime's own optimised and validation sessions also differ by 4-6).
# Its ceiling is 2 plus the distance between onnxruntime's two sessions on the same images.
PARITY_MAX_STEPS = 2
# Transformers (graphs with Softmax / LayerNorm, float or ai.qpipe), both sessions: every session sums its
# matmuls in its own float order (the optimised one also requantises inside MatMulIntegerToFloat / QLinearMatMul
# and runs DQ -> Softmax -> Q as the lookup table QLinearSoftmax), and a value within float32 noise of a rounding
# tie lands on either side. On a fine grid (the 16-bit residual stream: a step is 2^-15 of its range) that happens
# to a few % of the values, and each block carries the moves on: a real 6-layer BERT's validation session is 17
# output steps from the PyTorch Q-model on real tokens, and onnxruntime's own two sessions are 19 apart. The ceiling is derived on the artifact itself, from the
# same inputs: PyTorch is a third float order, so it may be as far from a session as onnxruntime's own optimised
# and validation sessions are from each other (the model's amplification of float-order ties, measured), plus the
# PARITY_MAX_STEPS of Q/DQ ties. A wrong op (not float noise) lands far beyond it. The integer graph must be exact.
TRANSFORMER_OPS = {"Softmax", "LayerNormalization", INT_SOFTMAX, INT_LAYERNORM}
# AdderNets (graphs with ai.qpipe Adder2d), both sessions: onnxruntime sums -|x - w| over ~100-300 terms in its own
# float order, a few 1e-5 away from PyTorch's, enough to move a value across a 4-bit group step now and then;
# measured 6 output steps on digits-adder W4 (top-1 agreement 100 %). The integer graph is exact (0).
PARITY_MAX_STEPS_ADDER = 12
ADDER_OPS = {ADDER2D}
PARITY_MIN_AGREEMENT = 0.995
# where float noise decides (see PARITY_MAX_STEPS): top-1 agreement at least onnxruntime's own optimised-vs-
# validation agreement on the same images less one point (a second, independent draw of the same noise; on
# EfficientNet-Lite0's photo crops, with many near-tied classes, onnxruntime agrees with itself on 97-98 %)
PARITY_AGREEMENT_SLACK = 0.01


@dataclass
class Result:
    name: str
    ok: bool
    detail: str = ""


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def check_integers(art: Artifact, model: onnx.ModelProto) -> Result:
    """Every quantized weight appears in the QDQ graph as a DequantizeLinear of exactly the recorded integers."""
    from safetensors.numpy import load_file

    ints = load_file(str(art.file("quantized.safetensors")))
    inits = {t.name: t for t in model.graph.initializer}
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    bad = []
    # the encodings alone: a record whose header was tampered with is the manifest check's finding, not a crash
    encodings = {k: Encoding.from_json(v) for k, v in art.qparams["tensors"].items()}
    weights = [k for k, v in encodings.items() if v.kind == TensorKind.WEIGHT]
    for name in weights:
        t = inits.get(f"{name}_quantized")
        if t is None or t.name not in dq_inputs:
            bad.append(f"{name}: no integer initializer")
            continue
        got = weight_codes(t)
        if not np.array_equal(got, ints[int_key(name)].astype(np.int32)):
            bad.append(f"{name}: integers differ")
    return Result("integer weights equal quantized.safetensors", not bad,
                  "; ".join(bad[:5]) or f"{len(weights)} tensors")


def integer_only(model: onnx.ModelProto) -> tuple[bool, str]:
    """Whether every tensor between the inputs' QuantizeLinear and the outputs' DequantizeLinear is an integer:
    (ok, detail). Float tensors allowed: the float graph inputs (one QuantizeLinear each; integer inputs such as
    token ids are read as they are), the final outputs (one DequantizeLinear each) and Q/DQ scales."""
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    outputs = {o.name for o in g.output}
    float_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type not in INT_TYPES}
    if len(q) != len(float_inputs) or {n.input[0] for n in q} != float_inputs:
        return False, (f"{len(q)} QuantizeLinear nodes; expected one on each float graph input "
                       f"({len(float_inputs)})")
    if len(dq) != len(outputs) or {n.output[0] for n in dq} != outputs:
        return False, f"{len(dq)} DequantizeLinear nodes; expected one giving each graph output ({len(outputs)})"
    scales = {n.input[1] for n in q} | {n.input[1] for n in dq}
    bad = []
    for n in g.node:
        for name in n.output:
            if name in outputs or name in scales:
                continue
            t = types.get(name)
            if t not in INT_TYPES:
                bad.append(f"{name} ({onnx.TensorProto.DataType.Name(t) if t else 'unknown type'}, {n.op_type})")
    ops = {(n.domain, n.op_type) for n in g.node}
    extra = sorted(op for d, op in ops if d not in ("", "ai.onnx", INT_DOMAIN) or (d in ("", "ai.onnx") and op not in INT_OPS))
    if extra:
        bad.append(f"ops not allowed in the integer graph: {extra}")
    n_int = sum(1 for n in g.node if n.domain == INT_DOMAIN)
    return not bad, "; ".join(bad[:5]) or f"{len(g.node)} nodes, {n_int} {INT_DOMAIN} ops, all integer"


def weight_codes(t: onnx.TensorProto) -> np.ndarray:
    """The signed integer codes of a weight initializer in any container (int4, int8, uint8 + 128)."""
    a = numpy_helper.to_array(t).astype(np.int32)
    if t.data_type == onnx.TensorProto.UINT8:
        a = a - 128
    return a


KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")   # float kernels in an optimised graph
EIGHT_BIT = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
LAYOUT_TRANSPOSES = 2   # onnxruntime's NHWC region of QLinearConv has one Transpose at each end


def fusion_census(path: Path, activations_quantized: bool, config: dict[str, str] | None = None) -> Result:
    """Every quantized Conv / Gemm / MatMul of a QDQ graph runs as a fused integer kernel in onnxruntime's fully
    optimised graph, and the optimisation adds no Transposes beyond the two at the ends of its NHWC region.

    A float kernel left in the optimised graph fails when its weights are 8-bit integers and its input is an 8-bit
    activation (or stays float although the recipe quantizes activations). Left float by design, and not counted:
    INT4 weights (a size choice), inputs that are not an 8-bit QuantizeLinear's (APoT codes), outputs quantized
    wider than 8 bits (AdderQuant's 16-bit adder inputs) or to APoT levels."""
    import tempfile

    from .session import make_session

    src = onnx.load(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        make_session(path, optimized=True, optimized_model_path=Path(tmp) / "optimized.onnx", config=config)
        opt = onnx.load(str(Path(tmp) / "optimized.onnx"))
    # what each kernel left float was meant to be is read in the graph as exported (the optimiser inlines the
    # ai.qpipe functions and folds Q/DQ away); a kernel keeps its name or its output's (NCHWc: "<output>_nchwc")
    g = src.graph
    exported = {**{n.output[0]: n for n in g.node if n.output}, **{n.name: n for n in g.node if n.name}}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in g.initializer}

    def zero_point_type(q) -> int | None:
        z = inits.get(q.input[2]) if len(q.input) > 2 else None
        return z.data_type if z is not None else onnx.TensorProto.UINT8

    def quantized_after(tensor: str) -> int | str | None:
        """The zero-point type of the QuantizeLinear that reads ``tensor`` (through Relu / Clip), ``"levels"`` for
        an ai.qpipe quantizer (APoTProject), or None."""
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return None
        u = users[0]
        if u.op_type in ("Relu", "Clip"):
            return quantized_after(u.output[0])
        if u.domain == INT_DOMAIN:
            return "levels"
        return zero_point_type(u) if u.op_type == "QuantizeLinear" else None

    left = []
    for kernel in opt.graph.node:
        n = exported.get(kernel.name) or exported.get(kernel.name.removesuffix("_nchwc")) or \
            exported.get(kernel.output[0] if kernel.output else "")
        if kernel.op_type not in KERNELS or n is None or n.op_type not in KERNELS or len(n.input) < 2:
            continue
        w, x = producer.get(n.input[1]), producer.get(n.input[0])
        weight = inits.get(w.input[0]) if w is not None and w.op_type == "DequantizeLinear" else None
        if weight is None or weight.data_type not in EIGHT_BIT:
            continue   # float or INT4 weights
        if x is not None and x.op_type == "DequantizeLinear":
            q = producer.get(x.input[0])
            if q is None or q.op_type != "QuantizeLinear" or zero_point_type(q) not in EIGHT_BIT:
                continue   # APoT codes, or a wider grid
        elif not activations_quantized:
            continue       # a weight-only recipe: the input is float by design
        if quantized_after(n.output[0]) not in (None, *EIGHT_BIT):
            continue       # the output is quantized wider than 8 bits or to APoT levels (no 8-bit kernel writes it)
        left.append(n.name or n.op_type)
    added = sum(n.op_type == "Transpose" for n in opt.graph.node) - sum(n.op_type == "Transpose" for n in g.node)
    fused = collections.Counter(n.op_type for n in opt.graph.node if n.op_type.startswith("QLinear") or
                                n.op_type in ("QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"))
    bad = [f"left float: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}"] if left else []
    if added > LAYOUT_TRANSPOSES:
        bad.append(f"{added} Transposes added")
    detail = "; ".join(bad) or (", ".join(f"{c} {op}" for op, c in sorted(fused.items())) or "no quantized kernels")
    return Result(f"fused integer kernels {path.name}", not bad, detail)


def weight_layout_fits_cpu(model: onnx.ModelProto) -> Result:
    """A QDQ file exported with int8 weights for a VNNI CPU (``--weight-layout int8``, or ``auto`` there) is exact
    only where onnxruntime's u8 x s8 dot product sums in int32; on other CPUs it fails here, by name."""
    from qpipe.export.qdq import WEIGHT_LAYOUT_PROP, wide_int8_weights
    from qpipe.runtime.session import EXACT_INT8_DOT_FLAGS, cpu_flags, u8s8_exact

    props = {p.key: p.value for p in model.metadata_props}
    layout = props.get(WEIGHT_LAYOUT_PROP, "portable")
    name = "weight layout exact on this CPU"
    if layout != "int8":
        return Result(name, True, f"{layout} (exact on every CPU)")
    wide = wide_int8_weights(model)
    if not wide:
        return Result(name, True, "int8, every weight within +-64 (exact on every CPU)")
    if u8s8_exact():
        have = [f for f in EXACT_INT8_DOT_FLAGS if f in cpu_flags()]
        return Result(name, True, f"int8 ({len(wide)} full-range weights; exact here: {', '.join(have)})")
    return Result(name, False, f"{len(wide)} int8 weights beyond +-64 (e.g. {wide[0]}) saturate in onnxruntime's "
                               "u8 x s8 kernel on this CPU (no VNNI/AMX); re-export with --weight-layout portable")


def check(artifact: str | Path | Artifact, expect: str | Path | None = None) -> list[Result]:
    art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    results: list[Result] = []
    manifest = art.manifest
    files = manifest.get("files", {})
    bad = [n for n, h in files.items() if not art.file(n).is_file() or sha256(art.file(n)) != h]
    results.append(Result("manifest hashes", not bad, ", ".join(bad) or f"{len(files)} files"))
    stray = [p.name for p in art.path.iterdir() if p.name.endswith(".tmp")]
    results.append(Result("no half-written files", not stray, ", ".join(stray)))

    qdq = art.file("model.qdq.onnx")
    transformer = adder = False
    for path in sorted(art.path.glob("model.*.onnx")):
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            results.append(Result(f"onnx.checker {path.name}", True))
        except Exception as e:
            results.append(Result(f"onnx.checker {path.name}", False, str(e).splitlines()[0][:200]))
            continue
        if path.name == "model.int.onnx":
            ok, detail = integer_only(model)
            results.append(Result(f"integer-only {path.name}", ok, detail))
            continue
        ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
        extra = sorted(ops - QDQ_OPS)
        results.append(Result(f"op set {path.name}", not extra, f"not allowed: {extra}" if extra else ""))
        if path == qdq:
            results.append(check_integers(art, model))
            acts = any(t.get("kind") == "activation" for t in art.qparams["tensors"].values())
            results.append(fusion_census(path, acts))
            results.append(weight_layout_fits_cpu(model))
            transformer = any(n.op_type in TRANSFORMER_OPS for n in model.graph.node)
            adder = any(n.op_type in ADDER_OPS for n in model.graph.node)

    exp = {}
    if expect is not None:
        p = Path(expect)
        if not p.is_file():
            raise QpipeError(f"expectation file {expect} does not exist")
        try:
            exp = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise QpipeError(f"expectation file {expect} is not valid JSON: {e}") from e
    main = next((f for f in ("qdq", "int") if art.file(f"model.{f}.onnx").is_file()), "fp32")   # evaluate's default
    mfile = exp.get("metrics_file", f"metrics-ort-{main}.json")
    int_metrics = art.file("metrics-ort-int.json")
    if art.file("model.int.onnx").is_file() and int_metrics.is_file() and mfile != int_metrics.name:
        m_int = art.read_json(int_metrics.name)
        for key in ("parity", "parity_optimized"):  # the integer graph must be exact
            v = _get(m_int, f"{key}.max_abs_diff")
            results.append(Result(f"int {key}.max_abs_diff == 0", v == 0, f"got {v}"))
    if not art.file(mfile).is_file():
        results.append(Result(f"metrics {mfile}", False, "missing: run qpipe evaluate --backend ort first"))
        return results
    metrics = art.read_json(mfile)
    floors = dict(exp.get("floors", {}))
    ceilings = dict(exp.get("ceilings", {}))
    if "parity" in metrics:
        ort_steps = _get(metrics, "ort_optimized_vs_validation.max_abs_diff_steps")
        ort_agree = _get(metrics, "ort_optimized_vs_validation.top1_agreement")
        for key in ("parity", "parity_optimized"):
            # a session with float-computed layers (the validation session; the optimised one where INT4 weights
            # leave convs float) is held to the float noise onnxruntime's own two sessions show
            noisy = ort_steps is not None and (key == "parity" or (_get(metrics, f"{key}.float_layers") or 0) > 0)
            floor = PARITY_MIN_AGREEMENT
            if noisy and ort_agree is not None:
                floor = min(floor, ort_agree - PARITY_AGREEMENT_SLACK)
            if "top1_agreement" in metrics[key]:   # classifiers (other outputs are held to their steps)
                floors.setdefault(f"{key}.top1_agreement", floor)
            if metrics[key].get("max_abs_diff_steps") is not None:
                exact = metrics.get("format") == "int"  # integer graph: onnxruntime must equal torch exactly
                limit = PARITY_MAX_STEPS
                if exact:
                    limit = 0
                elif transformer:
                    limit = PARITY_MAX_STEPS + (ort_steps or 0)
                elif adder:
                    limit = PARITY_MAX_STEPS_ADDER
                elif noisy and ort_steps:
                    # float noise: no float model can be closer to the validation session than onnxruntime's
                    # own integer kernels are, on a model that amplifies each tie (see PARITY_MAX_STEPS)
                    limit = PARITY_MAX_STEPS + ort_steps
                ceilings.setdefault(f"{key}.max_abs_diff_steps", limit)
    for key, lo in floors.items():
        v = _get(metrics, key)
        results.append(Result(f"{key} >= {lo}", v is not None and v >= lo, f"got {v}"))
    for key, hi in ceilings.items():
        v = _get(metrics, key)
        results.append(Result(f"{key} <= {hi}", v is not None and v <= hi, f"got {v}"))
    return results


def format_results(results: list[Result]) -> str:
    return "\n".join(f"{'PASS' if r.ok else 'FAIL'}  {r.name}" + (f"  ({r.detail})" if r.detail else "")
                     for r in results)
