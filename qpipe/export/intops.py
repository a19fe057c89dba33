"""The integer ops as ONNX functions in the ``ai.qpipe`` domain (version 1), written with onnxscript.

Each function is built only from standard integer ops, so a model that carries these FunctionProtos runs in any
onnxruntime build and provider with no extra library (onnxruntime inlines functions). Every tensor is int64.

Signed arithmetic: ONNX ``BitShift`` is unsigned-only and integer ``Div`` truncates toward zero, so floor
division is the truncating Div corrected by the remainder's sign (``FloorDiv``), floor division by 2^k flips the
sign bit and shifts as uint64 (``FloorShift``, no division at all), and ``2^j`` is an unsigned shift of 1. The NumPy twins are in ``qpipe.reference.intops``.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnxscript import FLOAT, INT8, INT32, INT64, UINT8, script
from onnxscript import opset21 as op
from onnxscript.values import Opset

from qpipe.onnx_names import FUNCTIONS_OPSET as ONNX_OPSET
from qpipe.onnx_names import PUBLIC_OPS
from qpipe.onnx_names import QPIPE_DOMAIN as DOMAIN
from qpipe.onnx_names import QPIPE_VERSION as VERSION
from qpipe.reference.intops import GELU_N, INT32_MAX, MASK_DIFF, OUT_BITS, SOFTMAX_N, SQRT_ITERS, SQRT_START

assert SQRT_ITERS == 20, "ISqrt below unrolls exactly 20 Newton steps"


qp = Opset(DOMAIN, VERSION)


@script(qp, default_opset=op)
def Pow2(j: INT64) -> INT64:
    """2^j for 0 <= j <= 62, as an unsigned shift of 1."""
    one = op.Cast(op.Constant(value_int=1), to=onnx.TensorProto.UINT64)
    return op.Cast(op.BitShift(one, op.Cast(j, to=onnx.TensorProto.UINT64), direction="LEFT"),
                   to=onnx.TensorProto.INT64)


@script(qp, default_opset=op)
def FloorDiv(a: INT64, b: INT64) -> INT64:
    """floor(a / b) for int64 (b != 0), exact for negative a or b: the truncating Div, minus one where the
    remainder is non-zero and its sign differs from b's (one division; ``(a - Mod(a, b)) / b`` needs two, and
    onnxruntime's int64 Mod is slower than its Div)."""
    q = op.Div(a, b)
    r = op.Sub(a, op.Mul(q, b))
    zero = op.Constant(value_int=0)
    fix = op.And(op.Xor(op.Less(r, zero), op.Less(b, zero)), op.Not(op.Equal(r, zero)))
    return op.Sub(q, op.Cast(fix, to=onnx.TensorProto.INT64))


@script(qp, default_opset=op)
def FloorShift(a: INT64, k: INT64) -> INT64:
    """floor(a / 2^k) for any int64 a and 1 <= k <= 62 without a division: flipping the sign bit of a as uint64
    gives a + 2^63 (order kept), an unsigned right shift floors, and 2^(63 - k) undoes the offset."""
    sign = op.Cast(op.Constant(value_int=-(2**63)), to=onnx.TensorProto.UINT64)   # 2^63
    u = op.BitwiseXor(op.Cast(a, to=onnx.TensorProto.UINT64), sign)
    shifted = op.BitShift(u, op.Cast(k, to=onnx.TensorProto.UINT64), direction="RIGHT")
    return op.Sub(op.Cast(shifted, to=onnx.TensorProto.INT64), Pow2(op.Sub(op.Constant(value_int=63), k)))


@script(qp, default_opset=op)
def IMin(a: INT64, b: INT64) -> INT64:
    """Elementwise minimum of int64 tensors as ``Where(Less(a, b), a, b)``. Not ``Min``/``Max``/``Clip``:
    onnxruntime 1.31's int64 Min, Max and Clip compare only the low 32 bits when broadcasting over a tensor of
    more than one element (Min(2540848425, 32767) gives 2540848425; tests/export/test_intops.py)."""
    return op.Where(op.Less(a, b), a, b)


@script(qp, default_opset=op)
def IMax(a: INT64, b: INT64) -> INT64:
    return op.Where(op.Greater(a, b), a, b)


@script(qp, default_opset=op)
def Clamp(x: INT64, lo: INT64, hi: INT64) -> INT64:
    """min(max(x, lo), hi) for int64."""
    return IMin(IMax(x, lo), hi)


@script(qp, default_opset=op)
def Requant(x: INT64, m: INT64, k: INT64, zero_point: INT64, qmin: INT64, qmax: INT64) -> INT64:
    """clamp(floor((x * m + 2^(k-1)) / 2^k) + z, qmin, qmax): dyadic requantisation, round half up."""
    half = Pow2(op.Sub(k, op.Constant(value_int=1)))
    y = FloorShift(op.Add(op.Mul(x, m), half), k)
    return Clamp(op.Add(y, zero_point), qmin, qmax)


@script(qp, default_opset=op)
def IntAdd(a: INT64, za: INT64, ma: INT64, ka: INT64, b: INT64, zb: INT64, mb: INT64, kb: INT64,
           zero_point: INT64, qmin: INT64, qmax: INT64) -> INT64:
    """Residual addition: (a - za) and (b - zb) requantised to the output scale, summed, clamped."""
    zero = op.Constant(value_int=0)
    lo = op.Constant(value_int=-(2**62))
    hi = op.Constant(value_int=2**62)
    ya = Requant(op.Sub(a, za), ma, ka, zero, lo, hi)
    yb = Requant(op.Sub(b, zb), mb, kb, zero, lo, hi)
    return Clamp(op.Add(op.Add(ya, yb), zero_point), qmin, qmax)


@script(qp, default_opset=op)
def ShiftExp(x: INT64, x0: INT64, n: INT64) -> INT64:
    """2^n * exp(x s) for x <= 0 (x0 = floor(-1/s)); output scale s / 2^n."""
    one = op.Constant(value_int=1)
    x = op.Sub(op.Add(x, FloorShift(x, one)), FloorShift(x, op.Constant(value_int=4)))
    x = IMax(x, op.Mul(n, x0))
    q = op.Div(x, x0)        # x <= 0 and x0 < 0: a non-negative quotient, where truncation is the floor
    r = op.Sub(x, op.Mul(x0, q))
    e = op.Sub(FloorShift(r, one), x0)
    return op.Mul(e, Pow2(op.Sub(n, q)))


@script(qp, default_opset=op)
def IntSoftmax(x: INT64, x0: INT64) -> INT64:
    """Shiftmax along the last axis; output uint8 values (0..255) at scale 2^-8; MASKED inputs weigh 0."""
    axes = op.Constant(value_ints=[-1])
    d = op.Sub(x, op.ReduceMax(x, axes, keepdims=1))
    masked = op.Less(d, op.Constant(value_int=MASK_DIFF))   # attention padding: no weight
    e = op.Where(masked, op.Constant(value_int=0), ShiftExp(d, x0, op.Constant(value_int=SOFTMAX_N)))
    imax = op.Constant(value_int=INT32_MAX)
    s = IMin(op.ReduceSum(e, axes, keepdims=1), imax)
    factor = op.Div(imax, s)  # both positive: Div is the floor
    out = op.Div(op.Mul(e, factor), op.Constant(value_int=2 ** (31 - OUT_BITS)))  # non-negative
    return IMin(out, op.Constant(value_int=2**OUT_BITS - 1))


@script(qp, default_opset=op)
def IntGELU(x: INT64, x0: INT64) -> INT64:
    """ShiftGELU x * sigmoid(1.702 x), elementwise (x0 = floor(-1 / (1.702 s))); scale s * 2^-8."""
    n = op.Constant(value_int=GELU_N)
    m = IMax(x, op.Constant(value_int=0))
    e1 = ShiftExp(op.Sub(x, m), x0, n)
    e2 = ShiftExp(op.Neg(m), x0, n)
    imax = op.Constant(value_int=INT32_MAX)
    factor = op.Div(imax, IMin(op.Add(e1, e2), imax))  # both positive: Div is the floor
    sig = op.Div(op.Mul(e1, factor), op.Constant(value_int=2 ** (31 - OUT_BITS)))  # non-negative
    return op.Mul(x, sig)


@script(qp, default_opset=op)
def NewtonStep(k: INT64, v: INT64) -> INT64:
    """One integer Newton step towards sqrt(v): floor((k + floor(v / k)) / 2); v >= 1 and k >= 1, so the
    truncating Div is the floor."""
    two = op.Constant(value_int=2)
    return op.Div(op.Add(k, op.Div(v, k)), two)


@script(qp, default_opset=op)
def Newton10(k: INT64, v: INT64) -> INT64:
    """Ten Newton steps, unrolled (an ONNX Loop would do, but onnx.reference mishandles its carried state)."""
    k1 = NewtonStep(k, v)
    k2 = NewtonStep(k1, v)
    k3 = NewtonStep(k2, v)
    k4 = NewtonStep(k3, v)
    k5 = NewtonStep(k4, v)
    k6 = NewtonStep(k5, v)
    k7 = NewtonStep(k6, v)
    k8 = NewtonStep(k7, v)
    k9 = NewtonStep(k8, v)
    return NewtonStep(k9, v)


@script(qp, default_opset=op)
def ISqrt(v: INT64) -> INT64:
    """Integer square root: SQRT_ITERS = 20 Newton steps from k = 2^16 (v = 0 taken as 1)."""
    v = IMax(v, op.Constant(value_int=1))
    k = op.Expand(op.Constant(value_int=SQRT_START), op.Shape(v))
    return Newton10(Newton10(k, v), v)


@script(qp, default_opset=op)
def IntLayerNorm(x: INT64, m: INT64, k: INT64, b: INT64, zero_point: INT64, qmin: INT64, qmax: INT64) -> INT64:
    """I-BERT/I-ViT LayerNorm over the last axis with gamma, beta and the output requantisation folded into the
    per-channel multiplier m / 2^k and bias b."""
    axes = op.Constant(value_ints=[-1])
    d = op.Gather(op.Shape(x), op.Constant(value_int=-1))
    mu = FloorDiv(op.Add(op.ReduceSum(x, axes, keepdims=1), op.Div(d, op.Constant(value_int=2))), d)
    y = op.Sub(x, mu)
    var = op.ReduceSum(op.Mul(y, y), axes, keepdims=1)
    factor = op.Div(op.Constant(value_int=INT32_MAX), ISqrt(var))  # both positive
    one = op.Constant(value_int=1)
    yn = FloorShift(op.Mul(y, factor), one)
    half = Pow2(op.Sub(k, one))
    out = FloorShift(op.Add(op.Add(op.Mul(yn, m), b), half), k)
    return Clamp(op.Add(out, zero_point), qmin, qmax)


@script(qp, default_opset=op)
def APoTProject(x: FLOAT, step: FLOAT, table: INT64) -> INT64:
    """APoT activation codes: the fine cell clamp(floor(x / step), 0, len(table) - 1) in float32, then the code of
    the nearest level from ``table`` (qpipe.reference.apot.fine_table). Float in, integer codes out."""
    f_max = op.Cast(op.Sub(op.Size(table), op.Constant(value_int=1)), to=onnx.TensorProto.FLOAT)
    f = op.Clip(op.Floor(op.Div(x, step)), op.Constant(value_float=0.0), f_max)
    return op.Gather(table, op.Cast(f, to=onnx.TensorProto.INT64))


@script(qp, default_opset=op)
def AdderDistance(p, w):
    """-sum_k |p[n, k, i, j] - w[o, k]| for patches p (N, K, Ho, Wo) and kernels w (O, C, kh, kw), K = C kh kw;
    float or int32 (both of one type)."""
    ps = op.Shape(p)
    ws = op.Shape(w)
    n = op.Slice(ps, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    hw = op.Slice(ps, op.Constant(value_ints=[2]), op.Constant(value_ints=[4]))
    o = op.Slice(ws, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
    k = op.Slice(ps, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
    flat = op.Reshape(p, op.Concat(n, op.Constant(value_ints=[1]), k, op.Constant(value_ints=[-1]), axis=0))          # N 1 K L
    wf = op.Reshape(w, op.Concat(op.Constant(value_ints=[1]), o, op.Constant(value_ints=[-1, 1]), axis=0))  # 1 O K 1
    d = op.ReduceSum(op.Abs(op.Sub(flat, wf)), op.Constant(value_ints=[2]), keepdims=0)      # N O L
    return op.Neg(op.Reshape(d, op.Concat(n, o, hw, axis=0)))


@script(qp, default_opset=op)
def OneHotKernels(w: FLOAT) -> FLOAT:
    """(K, C, kh, kw) kernels with a single 1 each: a convolution with them gathers every patch exactly."""
    cks = op.Slice(op.Shape(w), op.Constant(value_ints=[1]), op.Constant(value_ints=[4]))
    k = op.ReduceProd(cks, keepdims=1)
    eye = op.EyeLike(op.ConstantOfShape(op.Concat(k, k, axis=0)))
    return op.Reshape(eye, op.Concat(k, cks, axis=0))


@script(qp, default_opset=op)
def Adder2d(x: FLOAT, w: FLOAT, strides: Sequence[int], pads: Sequence[int]) -> FLOAT:
    """AdderNet layer, float: -sum |patch - w| over each (zero-padded) patch and kernel. The patches come from a
    Conv with one-hot kernels (each output is 1 * x + 0 * others: exact)."""
    p = op.Conv(x, OneHotKernels(w), strides=strides, pads=pads)
    return AdderDistance(p, w)


@script(qp, default_opset=op)
def AdderInteger(x: UINT8, w: INT8, w_mult: INT32, strides: Sequence[int], pads: Sequence[int]) -> INT32:
    """AdderNet layer on integers: ``-sum |patch - w_mult * w|`` in int32 for uint8 codes x and int8 weight codes w
    (O, C, kh, kw) whose step is ``w_mult`` activation steps (AdderQuant: 2). The patches are gathered exactly by
    ConvInteger with one-hot uint8 kernels."""
    w32 = op.Mul(op.Cast(w, to=onnx.TensorProto.INT32), w_mult)
    onehot = op.Cast(OneHotKernels(op.Cast(w, to=onnx.TensorProto.FLOAT)), to=onnx.TensorProto.UINT8)
    p = op.ConvInteger(x, onehot, strides=strides, pads=pads)                                # N K Ho Wo, int32
    return AdderDistance(p, w32)


# op name -> function; helpers come first so that every function's callees are defined before it
FUNCTIONS = {f.name: f for f in (Pow2, FloorDiv, FloorShift, IMin, IMax, Clamp, Requant, IntAdd, ShiftExp, IntSoftmax, IntGELU,
                                 NewtonStep, Newton10, ISqrt, IntLayerNorm, APoTProject, AdderDistance,
                                 OneHotKernels, Adder2d, AdderInteger)}
assert set(PUBLIC_OPS) <= set(FUNCTIONS), "every public ai.qpipe op has a function"


def function_protos(opset: int = ONNX_OPSET, used: set[str] | None = None) -> list[onnx.FunctionProto]:
    """The ``ai.qpipe`` FunctionProtos (all, or those ``used`` op types need), for a model's ``functions``; each
    imports both the standard opset and ``ai.qpipe`` (onnxscript lists only some of the domains a body calls)."""
    protos = {}
    for name, f in FUNCTIONS.items():
        proto = f.to_function_proto()
        del proto.opset_import[:]
        proto.opset_import.extend([onnx.helper.make_opsetid("", opset), *opset_imports()])
        protos[name] = proto
    if used is not None:  # only what the graph calls, and what those call
        need, todo = set(), list(used)
        while todo:
            n = todo.pop()
            if n in need or n not in protos:
                continue
            need.add(n)
            todo.extend(node.op_type for node in protos[n].node if node.domain == DOMAIN)
        protos = {k: v for k, v in protos.items() if k in need}
    return list(protos.values())


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [onnx.helper.make_opsetid(DOMAIN, VERSION)]
