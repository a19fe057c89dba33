"""Integer ops: NumPy reference == PyTorch == onnx.reference == onnxruntime, bit for bit (I-ViT ops, requant)."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qpipe.export import intops as X
from qpipe.pipeline import intops as T
from qpipe.reference import intops as R


def onnx_model(op: str, arrays) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(arrays))]
    node = helper.make_node(op, names, ["y"], domain=X.DOMAIN)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, TensorProto.INT64, np.shape(a)) for n, a in zip(names, arrays, strict=True)],
        [helper.make_tensor_value_info("y", TensorProto.INT64, np.shape(arrays[0]))])  # every op keeps x's shape
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", X.ONNX_OPSET), *X.opset_imports()],
                              functions=X.function_protos(), ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(op: str, *arrays) -> tuple[np.ndarray, np.ndarray]:
    """(onnx.reference, onnxruntime CPU) outputs of one ai.qpipe op."""
    model = onnx_model(op, arrays)
    feeds = {f"in{i}": np.asarray(a, dtype=np.int64) for i, a in enumerate(arrays)}
    ref = ReferenceEvaluator(model).run(None, feeds)[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return ref, sess.run(None, feeds)[0]


def assert_all_equal(expected: np.ndarray, *others):
    for got in others:
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)


RNG = np.random.default_rng(1234)
SOFTMAX_RTOL, SOFTMAX_ATOL = 0.1, 1 / 256  # ShiftExp's 1 + r/2 for 2^r is off by up to 6 %; the 8-bit output floors
GELU_ATOL = 0.05            # I-ViT's ShiftGELU (sigmoid approximation) against the exact GELU, in output units
LAYERNORM_STEPS = 1.01      # one output step (the integer square root and the rounding), plus float slack
SCALES = [1e-4, 3.7e-3, 0.05, 0.31, 1.0]


def _rows(shape, lo, hi, rng=RNG):
    """Random integers plus the edge rows: constant, the most negative value, the grid's extremes."""
    x = rng.integers(lo, hi + 1, shape).astype(np.int64)
    x[..., 0, :] = lo                      # constant row at the most negative input
    x[..., 1, :] = 7                       # constant row
    if shape[-2] > 2:
        x[..., 2, :] = lo
        x[..., 2, 0] = hi                  # one maximum, the rest at the minimum
    return x


# ---------------------------------------------------------------- golden vectors (hand-computed)

def test_floor_division_is_floor_for_negative_values_in_every_version():
    a = np.array([-7, -8, -1, 0, 1, 7, 8], dtype=np.int64)
    # requantize with m = 1, k = 2: floor((a + 2) / 4)
    expected = [-2, -2, 0, 0, 0, 2, 2]
    assert R.requantize(a, 1, 2).tolist() == expected
    assert T.requantize(torch.tensor(a), 1, 2).tolist() == expected
    ref, rt = run_onnx("Requant", a, 1, 2, 0, -100, 100)
    assert ref.tolist() == expected and rt.tolist() == expected


def test_requantize_rounds_half_up_and_clamps():
    # x * 3 / 8: -12 -> -4.5 -> -4, -4 -> -1.5 -> -1, 4 -> 1.5 -> 2, 12 -> 4.5 -> 5; then +z=1, clamp to [-3, 4]
    x = np.array([-12, -4, 4, 12], dtype=np.int64)
    assert R.requantize(x, 3, 3, 1, -3, 4).tolist() == [-3, 0, 3, 4]


def test_dyadic_multiplier_is_within_2_pow_minus_31_relative():
    for v in [1e-9, 3.3e-5, 0.0123, 0.5, 0.999999999, 1.0, 7.5, -0.25]:
        d = R.dyadic(v)
        assert abs(d.m[0]) < 2**31 and 1 <= d.k[0] <= R.MAX_SHIFT
        assert abs(d.m[0] / 2 ** d.k[0] - v) <= abs(v) * 2.0**-30


def test_shift_exp_golden():
    # s = 0.5: x0 = -2; x = -4 -> -4 - 2 + 1 = -5 -> q = 2, r = -1, e = -1 + 2 = 1, out = 1 << (15 - 2) = 8192
    assert R.shift_exp(np.array([-4, 0]), -2, 15).tolist() == [8192, 2 << 15]


# ---------------------------------------------------------------- the four versions agree

@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("shape", [(3, 5, 17), (1, 197, 197)], ids=["17x17", "197x197"])
def test_int_softmax_four_versions_identical(scale, shape):
    x = _rows(shape, -128, 127)
    x0 = R.shiftexp_x0(scale)
    expected = R.softmax(x, x0)
    assert expected.min() >= 0 and expected.max() <= 255
    assert_all_equal(expected, T.softmax(torch.tensor(x), x0), *run_onnx("IntSoftmax", x, x0))


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:g}")
def test_masked_positions_take_nothing_from_the_real_ones(scale):
    """Attention padding (``MASKED`` inputs): in all four versions the real positions of a row get exactly what
    the row without its padding gives, the padding 0; a row of padding alone stays uniform, not 0 / 0."""
    x = _rows((4, 6, 19), -128, 127)
    keep = np.ones(x.shape, bool)
    keep[..., 11:] = False          # 8 padded keys
    keep[1, 2, :] = False           # a query row of padding alone
    x0 = R.shiftexp_x0(scale)
    xm = np.where(keep, x, R.MASKED)
    expected = R.softmax(xm, x0)
    assert_all_equal(expected, T.softmax(torch.tensor(xm), x0), *run_onnx("IntSoftmax", xm, x0))
    np.testing.assert_array_equal(expected[..., :11][keep[..., :11].all(-1)],
                                  R.softmax(x[..., :11], x0)[keep[..., :11].all(-1)])
    assert (expected[..., 11:][keep[..., :11].all(-1)] == 0).all()
    assert len(set(expected[1, 2].tolist())) == 1 and expected[1, 2, 0] > 0
    # I-ViT without a mask: a real position at the grid's lowest value keeps ShiftExp's floor, and the row's
    # real positions lose that much to the padding
    low = np.where(keep, x, -128)
    assert (R.softmax(low, x0)[..., :11] <= expected[..., :11]).all()


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("shape", [(2, 5, 64), (1, 197, 768)], ids=["64", "197x768"])
def test_int_gelu_four_versions_identical(scale, shape):
    x = _rows(shape, -128, 127)
    x[..., 3, :] = RNG.integers(-128, 0, shape[-1])   # a whole row negative
    x0 = R.gelu_x0(scale)
    expected = R.gelu(x, x0)
    assert_all_equal(expected, T.gelu(torch.tensor(x), x0), *run_onnx("IntGELU", x, x0))


@pytest.mark.parametrize("out_scale", [1e-4, 0.02, 0.1, 1.0], ids=lambda s: f"s{s:g}")
@pytest.mark.parametrize("shape", [(2, 6, 64), (1, 197, 768)], ids=["64", "197x768"])
def test_int_layernorm_four_versions_identical(out_scale, shape):
    d = shape[-1]
    x = _rows(shape, -32768, 32767)                 # 16-bit residual input
    gamma = RNG.normal(1.0, 0.3, d)
    gamma[:3] = [0.0, -0.7, 2.5]                    # zero and negative gamma are fine (folded into the multiplier)
    beta = RNG.normal(0.0, 0.5, d)
    p = R.layernorm_params(gamma, beta, out_scale, -3, -128, 127)
    expected = R.layernorm(x, p)
    assert_all_equal(expected, T.layernorm(torch.tensor(x), p),
                     *run_onnx("IntLayerNorm", x, p.m, p.k, p.b, p.zero_point, p.qmin, p.qmax))


@pytest.mark.parametrize("mult", [3.1e-5, 0.0123, 0.77, 1.9], ids=lambda s: f"M{s:g}")
def test_requant_four_versions_identical_per_tensor_and_per_channel(mult):
    x = RNG.integers(-(2**31), 2**31, (4, 8, 5)).astype(np.int64)
    x[0, 0, 0], x[0, 0, 1] = -(2**31), 2**31 - 1
    d = R.dyadic(mult)
    expected = R.requantize(x, d.m[0], d.k[0], 5, -128, 127)
    assert_all_equal(expected, T.requantize(torch.tensor(x), d.m[0], d.k[0], 5, -128, 127),
                     *run_onnx("Requant", x, d.m[0], d.k[0], 5, -128, 127))
    dc = R.dyadic(mult * RNG.uniform(0.5, 2.0, 8))  # per channel along axis 1
    m, k = np.array(dc.m).reshape(8, 1), np.array(dc.k).reshape(8, 1)
    expected = R.requantize(x, m, k, 0, -(2**15), 2**15 - 1)
    assert_all_equal(expected, T.requantize(torch.tensor(x), torch.tensor(m), torch.tensor(k), 0, -(2**15), 2**15 - 1),
                     *run_onnx("Requant", x, m, k, 0, -(2**15), 2**15 - 1))


def test_int_add_four_versions_identical():
    a = RNG.integers(-128, 128, (3, 17, 64)).astype(np.int64)
    b = RNG.integers(-32768, 32768, (3, 17, 64)).astype(np.int64)
    a[0, 0], b[0, 0] = -128, -32768
    ra, rb = R.dyadic(0.02 / 0.003), R.dyadic(0.0004 / 0.003)
    expected = R.add(a, b, ra, rb, 0, -32768, 32767, za=-3)
    assert_all_equal(expected, T.add(torch.tensor(a), torch.tensor(b), ra, rb, 0, -32768, 32767, za=-3),
                     *run_onnx("IntAdd", a, -3, ra.m[0], ra.k[0], b, 0, rb.m[0], rb.k[0], 0, -32768, 32767))


# ---------------------------------------------------------------- the integers approximate the float ops

def test_int_softmax_approximates_softmax():
    x = RNG.integers(-128, 128, (64, 197)).astype(np.int64)
    s = 0.08
    p = R.softmax(x, R.shiftexp_x0(s)) / 256
    ref = torch.softmax(torch.tensor(x * s), -1).numpy()
    # ShiftExp's 1 + r/2 for 2^r is off by up to 6 %, the 8-bit output floors away up to 1/256
    assert np.all(np.abs(p - ref) <= SOFTMAX_RTOL * ref + SOFTMAX_ATOL)


def test_int_gelu_approximates_gelu():
    x = np.arange(-128, 128, dtype=np.int64)[None]
    s = 0.04
    y = R.gelu(x, R.gelu_x0(s)) * s / 2**R.OUT_BITS
    ref = torch.nn.functional.gelu(torch.tensor(x * s)).numpy()
    assert np.abs(y - ref).max() < GELU_ATOL


def test_int_layernorm_approximates_layernorm():
    d = 768
    x = RNG.normal(0, 3, (8, d))
    s_in = np.abs(x).max() / 32767
    xi = np.round(x / s_in).astype(np.int64)
    gamma, beta = RNG.normal(1, 0.2, d), RNG.normal(0, 0.2, d)
    s_out = 0.05
    y = R.layernorm(xi, R.layernorm_params(gamma, beta, s_out, 0, -128, 127)) * s_out
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (d,), torch.tensor(gamma), torch.tensor(beta), eps=0).numpy()
    assert np.abs(y - np.clip(ref, -128 * s_out, 127 * s_out)).max() <= s_out * LAYERNORM_STEPS


def test_isqrt_newton_is_exact_where_layernorm_needs_it():
    # 16-bit inputs over up to 768 channels: 1 <= var < 768 * 2^34; 20 steps from 2^16 reach floor(sqrt(v)) (or +1)
    v = np.unique(np.concatenate([RNG.integers(1, 768 * 2**34, 20_000), 2 ** np.arange(0, 46),
                                  np.arange(1, 5000)])).astype(np.int64)
    k = R.isqrt_newton(v)
    true = np.array([math.isqrt(int(u)) for u in v])
    assert np.all((k == true) | (k == true + 1))


def test_clamp_of_large_int64_values():
    # onnxruntime 1.31's int64 Min/Max/Clip compare the low 32 bits when broadcasting: Requant must not use them
    x = np.array([[1705526877, 5, -(2**40), 2**40]], dtype=np.int64)
    expected = [[32767, 7, -32768, 32767]]
    for got in run_onnx("Requant", x, 1599631914, 30, 0, -(2**15), 2**15 - 1):
        assert got.tolist() == expected


def test_floor_shift_and_floor_div_helpers_are_floor_over_the_int64_range():
    a = np.concatenate([RNG.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64),
                        np.array([-(2**63), 2**63 - 1, -1, 0, 1, -(2**62), 2**62], dtype=np.int64)])
    for k in (1, 4, 23, 31, 62):
        for got in run_onnx("FloorShift", a, k):
            np.testing.assert_array_equal(got, np.floor_divide(a, np.int64(2) ** k))
    small = RNG.integers(-(2**40), 2**40, 2000, dtype=np.int64)
    for b in (-7, -1, 3, 16, 2**31 - 1):
        for got in run_onnx("FloorDiv", small, b):
            np.testing.assert_array_equal(got, np.floor_divide(small, b))
