"""The integer ops as ONNX functions in the ``ai.qpipe`` domain (version 1), written with onnxscript.

Each function is built only from standard integer ops, so a model that carries these FunctionProtos runs in any
onnxruntime build and provider with no extra library (onnxruntime inlines functions). Every tensor is int64.

Signed arithmetic: ONNX ``BitShift`` is unsigned-only and integer ``Div`` truncates toward zero, so floor
division is ``(a - Mod(a, b)) / b`` with ``fmod=0`` (Python's sign convention: exact, also for negatives), and
``2^j`` for ``j >= 0`` is an unsigned shift of 1. The NumPy twins are in ``qpipe.reference.intops``.
"""

from __future__ import annotations

import onnx
from onnxscript import INT64, script
from onnxscript import opset21 as op
from onnxscript.values import Opset

from qpipe.reference.intops import GELU_N, INT32_MAX, OUT_BITS, SOFTMAX_N, SQRT_ITERS, SQRT_START

assert SQRT_ITERS == 20, "ISqrt below unrolls exactly 20 Newton steps"

DOMAIN = "ai.qpipe"
VERSION = 1
ONNX_OPSET = 21   # the standard opset the bodies are written in; they use nothing that changed since MIN_OPSET
MIN_OPSET = 18    # Reduce* with axes as an input
qp = Opset(DOMAIN, VERSION)


@script(qp, default_opset=op)
def FloorDiv(a: INT64, b: INT64) -> INT64:
    """floor(a / b) for int64 (b != 0), exact for negative a or b."""
    return op.Div(op.Sub(a, op.Mod(a, b, fmod=0)), b)


@script(qp, default_opset=op)
def IMin(a: INT64, b: INT64) -> INT64:
    """Elementwise minimum of int64 tensors as ``Where(Less(a, b), a, b)``. Not ``Min``/``Max``/``Clip``:
    onnxruntime 1.31's int64 Min, Max and Clip compare only the low 32 bits when broadcasting over a tensor of
    more than one element (Min(2540848425, 32767) gives 2540848425; tests/test_intops.py)."""
    return op.Where(op.Less(a, b), a, b)


@script(qp, default_opset=op)
def IMax(a: INT64, b: INT64) -> INT64:
    return op.Where(op.Greater(a, b), a, b)


@script(qp, default_opset=op)
def Clamp(x: INT64, lo: INT64, hi: INT64) -> INT64:
    """min(max(x, lo), hi) for int64."""
    return IMin(IMax(x, lo), hi)


@script(qp, default_opset=op)
def Pow2(j: INT64) -> INT64:
    """2^j for 0 <= j <= 62, as an unsigned shift of 1."""
    one = op.Cast(op.Constant(value_int=1), to=onnx.TensorProto.UINT64)
    return op.Cast(op.BitShift(one, op.Cast(j, to=onnx.TensorProto.UINT64), direction="LEFT"),
                   to=onnx.TensorProto.INT64)


@script(qp, default_opset=op)
def Requant(x: INT64, m: INT64, k: INT64, zero_point: INT64, qmin: INT64, qmax: INT64) -> INT64:
    """clamp(floor((x * m + 2^(k-1)) / 2^k) + z, qmin, qmax): dyadic requantisation, round half up."""
    half = Pow2(op.Sub(k, op.Constant(value_int=1)))
    y = FloorDiv(op.Add(op.Mul(x, m), half), Pow2(k))
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
    x = op.Sub(op.Add(x, FloorDiv(x, op.Constant(value_int=2))), FloorDiv(x, op.Constant(value_int=16)))
    x = IMax(x, op.Mul(n, x0))
    q = FloorDiv(x, x0)
    r = op.Sub(x, op.Mul(x0, q))
    e = op.Sub(FloorDiv(r, op.Constant(value_int=2)), x0)
    return op.Mul(e, Pow2(op.Sub(n, q)))


@script(qp, default_opset=op)
def IntSoftmax(x: INT64, x0: INT64) -> INT64:
    """Shiftmax along the last axis; output uint8 values (0..255) at scale 2^-8."""
    axes = op.Constant(value_ints=[-1])
    e = ShiftExp(op.Sub(x, op.ReduceMax(x, axes, keepdims=1)), x0, op.Constant(value_int=SOFTMAX_N))
    imax = op.Constant(value_int=INT32_MAX)
    s = IMin(op.ReduceSum(e, axes, keepdims=1), imax)
    factor = FloorDiv(imax, s)
    out = FloorDiv(op.Mul(e, factor), op.Constant(value_int=2 ** (31 - OUT_BITS)))
    return IMin(out, op.Constant(value_int=2**OUT_BITS - 1))


@script(qp, default_opset=op)
def IntGELU(x: INT64, x0: INT64) -> INT64:
    """ShiftGELU x * sigmoid(1.702 x), elementwise (x0 = floor(-1 / (1.702 s))); scale s * 2^-8."""
    n = op.Constant(value_int=GELU_N)
    m = IMax(x, op.Constant(value_int=0))
    e1 = ShiftExp(op.Sub(x, m), x0, n)
    e2 = ShiftExp(op.Neg(m), x0, n)
    imax = op.Constant(value_int=INT32_MAX)
    factor = FloorDiv(imax, IMin(op.Add(e1, e2), imax))
    sig = FloorDiv(op.Mul(e1, factor), op.Constant(value_int=2 ** (31 - OUT_BITS)))
    return op.Mul(x, sig)


@script(qp, default_opset=op)
def NewtonStep(k: INT64, v: INT64) -> INT64:
    """One integer Newton step towards sqrt(v): floor((k + floor(v / k)) / 2)."""
    return FloorDiv(op.Add(k, FloorDiv(v, k)), op.Constant(value_int=2))


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
    mu = FloorDiv(op.Add(op.ReduceSum(x, axes, keepdims=1), FloorDiv(d, op.Constant(value_int=2))), d)
    y = op.Sub(x, mu)
    var = op.ReduceSum(op.Mul(y, y), axes, keepdims=1)
    factor = FloorDiv(op.Constant(value_int=INT32_MAX), ISqrt(var))
    yn = FloorDiv(op.Mul(y, factor), op.Constant(value_int=2))
    half = Pow2(op.Sub(k, op.Constant(value_int=1)))
    out = FloorDiv(op.Add(op.Add(op.Mul(yn, m), b), half), Pow2(k))
    return Clamp(op.Add(out, zero_point), qmin, qmax)


# op name -> function; helpers come first so that every function's callees are defined before it
FUNCTIONS = {f.name: f for f in (FloorDiv, IMin, IMax, Clamp, Pow2, Requant, IntAdd, ShiftExp, IntSoftmax, IntGELU,
                                 NewtonStep, Newton10, ISqrt, IntLayerNorm)}
PUBLIC_OPS = ("Requant", "IntAdd", "IntSoftmax", "IntGELU", "IntLayerNorm")


def function_protos(opset: int = ONNX_OPSET) -> list[onnx.FunctionProto]:
    """Every ``ai.qpipe`` FunctionProto, to be put into a model's ``functions``; each imports both the standard
    opset and ``ai.qpipe`` (onnxscript lists only some of the domains a body calls)."""
    protos = []
    for f in FUNCTIONS.values():
        proto = f.to_function_proto()
        del proto.opset_import[:]
        proto.opset_import.extend([onnx.helper.make_opsetid("", opset), *opset_imports()])
        protos.append(proto)
    return protos


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [onnx.helper.make_opsetid(DOMAIN, VERSION)]
