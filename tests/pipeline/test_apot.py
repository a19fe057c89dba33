"""APoT primitives: the level sets of the paper's construction, projection, the clipping gradient, weight
normalisation; PyTorch against the NumPy reference."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import FLOAT64_TOL

from qpipe.pipeline.apot import APoTSpec, apot_quantize, codes_of, normalize_weights
from qpipe.reference import apot as ref

# hand-listed from ALGORITHMS.md section 5 (integer multiples of 1/D)
UNSIGNED = {
    2: ([0, 1, 2, 4], 4),
    3: ([0, 1, 2, 3, 4, 6, 8, 10], 10),
    4: ([0, 1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 33, 36, 48], 48),
    5: ([0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 17, 20, 21, 24, 28, 32, 34, 36, 38, 48, 52, 64, 65, 68, 69,
         72, 76, 96, 100], 100),
}
RNG = np.random.default_rng(7)
ON_MIDPOINT = 1e-5       # x / alpha * D this close to a midpoint of two levels is "on it" at float32 precision
ALPHA_GRAD_RTOL = 1e-9   # the clipping gradient sums 3000 float64 terms in another order than the reference


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_unsigned_level_sets_are_the_papers(bits):
    codes, d = UNSIGNED[bits]
    assert ref.unsigned_levels(bits) == [Fraction(c, d) for c in codes]
    assert ref.level_codes(bits, signed=False).tolist() == codes and len(codes) == 2**bits


@pytest.mark.parametrize(("bits", "n"), [(2, 3), (3, 7), (4, 15), (5, 31)])
def test_weight_sets_mirror_the_b_minus_1_set(bits, n):
    codes = ref.level_codes(bits, signed=True)
    assert len(codes) == n and codes.tolist() == sorted(set((-codes).tolist()))  # symmetric
    if bits > 2:
        pos = UNSIGNED[bits - 1][0]
        assert codes[codes >= 0].tolist() == pos and ref.denominator(bits, True) == UNSIGNED[bits - 1][1]
    assert abs(codes).max() <= 100  # fits int8


def test_projection_golden_and_ties_to_the_lower_level():
    levels = np.array([0, 1, 2, 4], dtype=np.float64)   # 2-bit set in units of 1/4
    assert ref.project([0.4, 0.5, 0.6, 2.9, 3.0, 3.1, 9.0, -3.0], levels).tolist() == [0, 0, 1, 2, 2, 3, 3, 0]


def test_normalize_weights_zero_mean_unit_variance_and_torch_equal():
    w = RNG.normal(0.3, 2.0, (16, 8, 3, 3))
    n = ref.normalize_weights(w)
    assert abs(n.mean()) < FLOAT64_TOL and abs(n.std() - 1) < FLOAT64_TOL
    np.testing.assert_allclose(normalize_weights(torch.tensor(w)).numpy(), n, rtol=0, atol=FLOAT64_TOL)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_weight_codes_torch_equal_reference(bits):
    w = RNG.normal(0, 1, 5000)
    alpha = 2.3
    expected = ref.weight_codes(w, alpha, bits)
    wn = normalize_weights(torch.tensor(w))
    got = codes_of(wn, torch.tensor(alpha, dtype=torch.float64), APoTSpec(bits, True))
    np.testing.assert_array_equal(got.numpy(), expected)
    assert set(np.unique(expected)) <= set(ref.level_codes(bits, True).tolist())


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_activation_codes_torch_equal_reference_and_stay_near_the_continuous_projection(bits):
    x = np.abs(RNG.normal(0, 3, 20000)).astype(np.float32)
    x[:5] = [0, 8, 9, 100, 4]
    alpha = 6.0
    expected = ref.activation_codes(x, alpha, bits)
    got = codes_of(torch.tensor(x), torch.tensor(alpha), APoTSpec(bits, False))
    np.testing.assert_array_equal(got.numpy(), expected)
    d = ref.denominator(bits, False)
    codes = ref.level_codes(bits, False).astype(np.float64)
    v = np.clip(x.astype(np.float64) / alpha, 0, 1) * d
    cont = codes[ref.project(v, codes)]
    # midpoints are fine-cell boundaries, so the two-step projection is the nearest level, except where x sits on
    # a midpoint to float32 precision (there it goes up, the continuous projection down)
    mids = (codes[1:] + codes[:-1]) / 2
    on_mid = np.min(np.abs(v[:, None] - mids[None]), axis=1) < ON_MIDPOINT
    np.testing.assert_array_equal(expected[~on_mid], cont[~on_mid])


@pytest.mark.parametrize(("bits", "signed"), [(2, True), (4, True), (3, False), (5, False)])
def test_alpha_gradient_and_ste_equal_reference(bits, signed):
    x = RNG.normal(0, 2, 3000) if signed else np.abs(RNG.normal(0, 4, 3000))
    alpha = 1.7 if signed else 5.0
    g = RNG.normal(0, 1, x.shape)
    xt = torch.tensor(x, requires_grad=True)
    at = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    y = apot_quantize(xt, at, APoTSpec(bits, signed))
    y.backward(torch.tensor(g))
    if signed:  # the weight path projects the continuous value; the reference gradient is defined on it
        want = ref.clip_alpha_grad(x, alpha, bits, signed, g)
        assert abs(float(at.grad) - want) < ALPHA_GRAD_RTOL * max(1, abs(float(at.grad)))
    lo = -1.0 if signed else 0.0
    inside = (x / alpha >= lo) & (x / alpha <= 1)
    np.testing.assert_array_equal(xt.grad.numpy(), g * inside)
    # the output is alpha times a level
    levels = ref.level_codes(bits, signed) / ref.denominator(bits, signed)
    assert np.all(np.isin(np.round(y.detach().numpy() / alpha, 12), np.round(levels, 12)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_onnx_apot_projection_equals_reference(bits):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    from qpipe.export import intops as X

    alpha = 5.5
    x = np.concatenate([RNG.normal(2, 3, 5000), [-1, 0, alpha, 2 * alpha]]).astype(np.float32)
    table = ref.fine_table(bits)
    step = np.array(ref.activation_step(alpha, bits), dtype=np.float32)
    node = helper.make_node("APoTProject", ["x", "step", "table"], ["y"], domain=X.DOMAIN)
    g = helper.make_graph([node], "apot", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
                                           helper.make_tensor_value_info("step", TensorProto.FLOAT, []),
                                           helper.make_tensor_value_info("table", TensorProto.INT64, table.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, x.shape)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", X.ONNX_OPSET), *X.opset_imports()],
                          functions=X.function_protos(), ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    feeds = {"x": x, "step": step, "table": table}
    expected = ref.activation_codes(x, alpha, bits)
    for got in (ReferenceEvaluator(m).run(None, feeds)[0],
                ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(codes_of(torch.tensor(x), torch.tensor(alpha), APoTSpec(bits, False)).numpy(),
                                  expected)
