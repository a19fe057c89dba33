"""Rounding rules and range estimators: PyTorch (qpipe.pipeline) against the NumPy reference."""

import numpy as np
import pytest
import torch
from helpers import FLOAT64_TOL

from qpipe.pipeline import observers as tobs
from qpipe.pipeline.quant import QuantSpec, quantize, round_values
from qpipe.reference import observers as robs
from qpipe.reference import quant as rq

STOCHASTIC_MEAN_ATOL = 0.005  # 200 000 draws of 0.3: five standard errors (sqrt(0.21 / 200 000) = 0.001)
FLOAT32_SCALE_RTOL = 1e-6     # the observer's scale is float32


def test_golden_quantize_half_to_even_and_clamp():
    # hand-computed: x / 0.5 = [-300, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.2, 300]
    x = np.array([-150, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.6, 150])
    expected = [-128, -2, -2, 0, 0, 2, 2, 3, 127]
    assert rq.quantize(x, 0.5, 0, -128, 127).tolist() == expected
    got = quantize(torch.tensor(x, dtype=torch.float64), torch.tensor(0.5), torch.tensor(0), -128, 127)
    assert got.long().tolist() == expected


@pytest.mark.parametrize("mode", ["nearest", "floor", "ceil"])
def test_rounding_torch_equals_reference(mode):
    v = np.random.default_rng(0).normal(0, 10, 10_000)
    v[:100] = np.round(v[:100]) + 0.5  # exact ties
    got = round_values(torch.tensor(v), mode).numpy()
    np.testing.assert_array_equal(got, rq.round_values(v, mode))


def test_stochastic_rounding_matches_reference_for_the_same_uniforms():
    v = np.random.default_rng(1).normal(0, 5, 5000)
    v[:50] = np.round(v[:50])  # exact integers never move
    g = torch.Generator().manual_seed(7)
    got = round_values(torch.tensor(v), "stochastic", g).numpy()
    u = torch.rand(v.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    np.testing.assert_array_equal(got, rq.round_values(v, "stochastic", u))
    np.testing.assert_array_equal(got[:50], v[:50])
    assert np.all((got == np.floor(v)) | (got == np.ceil(v)))


def test_stochastic_rounding_is_unbiased_and_seeded():
    v = torch.full((200_000,), 0.3, dtype=torch.float64)
    r = round_values(v, "stochastic", torch.Generator().manual_seed(0))
    assert abs(float(r.mean()) - 0.3) < STOCHASTIC_MEAN_ATOL
    r2 = round_values(v, "stochastic", torch.Generator().manual_seed(0))
    assert torch.equal(r, r2)


SPECS = [
    pytest.param(QuantSpec(8, True, True), id="int8-sym"),
    pytest.param(QuantSpec(4, True, True), id="int4-sym"),
    pytest.param(QuantSpec(4, True, False), id="int4-asym"),
    pytest.param(QuantSpec(8, False, False), id="uint8-asym"),
    pytest.param(QuantSpec(3, False, True), id="uint3-sym"),
]


def _data(kind, rows=6, n=700):
    rng = np.random.default_rng(3)
    if kind == "gauss":
        return rng.normal(0.1, 1.0, (rows, n)) * rng.uniform(0.2, 3, (rows, 1))
    if kind == "relu":
        return np.maximum(rng.normal(0, 1, (rows, n)), 0)
    return rng.laplace(0, 1, (rows, n))  # heavy tails: clipping matters


@pytest.mark.parametrize("kind", ["gauss", "relu", "laplace"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", ["absmax", "minmax", "lp_norm", "mse", "sqnr"])
def test_estimator_torch_equals_reference(method, spec, kind):
    x = _data(kind, rows=2 if method == "sqnr" else 6)  # the reference SQNR search is slow
    kwargs = {"p": 2.4} if method == "lp_norm" else {}
    s_t, z_t = tobs.estimate(torch.tensor(x), method, spec, **kwargs)
    s_r, z_r = getattr(robs, method)(x, spec.bits, spec.signed, spec.symmetric, **kwargs)
    np.testing.assert_allclose(s_t.numpy(), s_r, rtol=FLOAT64_TOL)
    np.testing.assert_array_equal(z_t.numpy(), z_r)


def test_percentile_torch_equals_reference():
    x = _data("laplace")
    spec = QuantSpec(8, True, True)
    s_t, _ = tobs.estimate(torch.tensor(x), "percentile", spec, pct=99.0)
    s_r, _ = robs.percentile(x, 8, True, True, 99.0)
    np.testing.assert_allclose(s_t.numpy(), s_r, rtol=FLOAT64_TOL)


def test_clipping_estimators_beat_minmax_on_heavy_tails_at_4_bits():
    x = _data("laplace", rows=1, n=20_000)
    err = {}
    for m in ["minmax", "lp_norm", "mse", "sqnr"]:
        s, z = getattr(robs, m)(x, 4, True, True, *([2.4] if m == "lp_norm" else []))
        err[m] = np.mean((rq.fake_quantize(x[0], s[0], z[0], -8, 7) - x[0]) ** 2)
    assert err["mse"] < err["minmax"] and err["sqnr"] < err["minmax"] and err["lp_norm"] < err["minmax"]


def test_asymmetric_range_keeps_zero_exact():
    s, z = robs.qparams_from_range(0.3, 2.0, 8, False, False)   # all-positive data: range widened to 0
    assert rq.dequantize(rq.quantize(0.0, s, z, 0, 255), s, z) == 0.0
    s, z = robs.qparams_from_range(-1.0, 3.0, 8, False, False)
    assert rq.dequantize(rq.quantize(0.0, s, z, 0, 255), s, z) == 0.0


def test_ema_observer_uses_momentum_095():
    obs = tobs.ActivationObserver("ema_minmax", QuantSpec(8, True, True))
    maxes = [1.0, 3.0, 2.0]
    for m in maxes:
        obs.observe(torch.tensor([-0.5, m]))
    s, z = obs.qparams()
    expected = robs.ema(maxes, 0.95)  # 1.0 -> 1.1 -> 1.145
    assert expected == pytest.approx(1.145)
    assert s == pytest.approx(np.float32(expected / 127), rel=FLOAT32_SCALE_RTOL) and z == 0
