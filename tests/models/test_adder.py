"""AdderNet layers: forward against the NumPy reference (float and exact integers), the AdderNet backward against
the reference and against finite differences of its surrogates, blocking, and the adder models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FLOAT64_TOL

from qpipe.models import adder as A
from qpipe.models import build_model
from qpipe.reference import adder as R

RNG = np.random.default_rng(0)
FD_RTOL, FD_ATOL = 1e-6, 1e-8   # central differences with eps = 1e-6: O(eps^2) error, float64 cancellation
FLOAT32_RTOL = 1e-5             # a float32 sum of 144 terms against torch's own float32 sum
SHAPES = [  # n, c, h, o, k, stride, padding
    (2, 3, 7, 4, 3, 1, 1), (3, 2, 9, 5, 3, 2, 1), (2, 4, 6, 3, 1, 2, 0), (1, 2, 5, 2, 3, 1, 0)]


@pytest.mark.parametrize(("n", "c", "h", "o", "k", "s", "p"), SHAPES)
def test_forward_equals_reference(n, c, h, o, k, s, p):
    x, w = RNG.normal(size=(n, c, h, h)), RNG.normal(size=(o, c, k, k))
    y = A.adder2d_forward(torch.tensor(x), torch.tensor(w), s, p).numpy()
    want = R.adder2d(x, w, s, p)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    # integers: exact, in int64
    xi, wi = RNG.integers(0, 256, (n, c, h, h)), RNG.integers(-128, 128, (o, c, k, k))
    yi = A.adder2d_forward(torch.tensor(xi), torch.tensor(wi), s, p)
    assert yi.dtype == torch.int64
    np.testing.assert_array_equal(yi.numpy(), R.adder2d(xi, wi, s, p))
    # a direct check of one output: -sum |patch - w|
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    assert y[0, o - 1, 0, 0] == pytest.approx(-np.abs(xp[0, :, :k, :k] - w[o - 1]).sum(), rel=FLOAT64_TOL)


@pytest.mark.parametrize(("n", "c", "h", "o", "k", "s", "p"), SHAPES)
def test_backward_equals_reference(n, c, h, o, k, s, p):
    x, w = RNG.normal(size=(n, c, h, h)), RNG.normal(size=(o, c, k, k))
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = A.adder2d(xt, wt, s, p)
    g = RNG.normal(size=y.shape)
    y.backward(torch.tensor(g))
    gx, gw = R.adder2d_grads(x, w, g, s, p)
    np.testing.assert_allclose(xt.grad.numpy(), gx, atol=FLOAT64_TOL)
    np.testing.assert_allclose(wt.grad.numpy(), gw, atol=FLOAT64_TOL)
    # the adaptive scaling: ||grad W|| = eta * sqrt(k)
    assert float(wt.grad.norm()) == pytest.approx(R.ETA * np.sqrt(w.size), rel=FLOAT64_TOL)


def test_backward_is_the_gradient_of_the_surrogates():
    """grad W = d/dW sum g * (-1/2 (X - W)^2), grad X = d/dX sum g * (-huber_1(X - W)), by central differences."""
    n, c, h, o, k, s, p = 2, 2, 5, 3, 3, 1, 1
    x, w = RNG.normal(size=(n, c, h, h)), RNG.normal(size=(o, c, k, k))
    g = RNG.normal(size=(n, o, h, h))

    def surrogate(x, w, kind):
        d = R.patches(x, (k, k), s, p)[:, :, :, None, :] - w.reshape(o, -1)[None, None, None]
        f = 0.5 * d**2 if kind == "w" else np.where(np.abs(d) <= 1, 0.5 * d**2, np.abs(d) - 0.5)
        return float((-f.sum(-1) * g.transpose(0, 2, 3, 1)).sum())

    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    A.adder2d(xt, wt, s, p, eta=None).backward(torch.tensor(g))
    eps = 1e-6
    for idx in [(0, 0, 1, 1), (1, 1, 2, 0), (2, 0, 0, 2)]:
        e = np.zeros_like(w)
        e[idx] = eps
        fd = (surrogate(x, w + e, "w") - surrogate(x, w - e, "w")) / (2 * eps)
        assert float(wt.grad[idx]) == pytest.approx(fd, rel=FD_RTOL, abs=FD_ATOL)
    for idx in [(0, 0, 0, 0), (1, 1, 2, 3), (0, 1, 4, 4)]:
        e = np.zeros_like(x)
        e[idx] = eps
        fd = (surrogate(x + e, w, "x") - surrogate(x - e, w, "x")) / (2 * eps)
        assert float(xt.grad[idx]) == pytest.approx(fd, rel=FD_RTOL, abs=FD_ATOL)


def test_blocks_bound_the_patch_tensors(monkeypatch):
    """Small blocks give the same results; no block holds more than BLOCK_ELEMS patch elements."""
    x, w = RNG.normal(size=(3, 4, 9, 9)), RNG.normal(size=(5, 4, 3, 3))
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = A.adder2d(xt, wt, 1, 1)
    g = torch.tensor(RNG.normal(size=y.shape))
    y.backward(g)
    monkeypatch.setattr(A, "BLOCK_ELEMS", 200)
    blocks = list(A._blocks(3, 9, 9 * 36))
    assert len(blocks) == 27 and all((n1 - n0) * (r1 - r0) * 9 * 36 <= 9 * 36 for n0, n1, r0, r1 in blocks)
    xb, wb = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yb = A.adder2d(xb, wb, 1, 1)
    yb.backward(g)
    torch.testing.assert_close(yb, y, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    torch.testing.assert_close(xb.grad, xt.grad, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    torch.testing.assert_close(wb.grad, wt.grad, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)


def test_large_input_runs_in_blocks():
    """A 224x224 input: 50 176 patches of 144 values would be 29 MB at once; blocks keep each under 16 MiB."""
    x = torch.randn(1, 16, 224, 224)
    w = torch.randn(8, 16, 3, 3)
    y = A.adder2d_forward(x, w, 1, 1)
    assert y.shape == (1, 8, 224, 224)
    want = -(torch.nn.functional.pad(x, (1, 1, 1, 1))[0, :, 100:103, 50:53] - w[3]).abs().sum()
    assert float(y[0, 3, 100, 50]) == pytest.approx(float(want), rel=FLOAT32_RTOL)


@pytest.mark.parametrize(("spec", "shape", "n_adders"), [("digits-adder", (1, 8, 8), 8),
                                                          ("resnet20-adder", (3, 32, 32), 20)])
def test_adder_models(spec, shape, n_adders):
    torch.manual_seed(0)
    m = build_model(spec)
    assert sum(isinstance(x, A.AdderConv2d) for x in m.modules()) == n_adders
    assert isinstance(m.conv1, torch.nn.Conv2d) and isinstance(m.fc, torch.nn.Linear)  # multiplicative ends
    x = torch.randn(4, *shape)
    loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    from qpipe.pipeline.capture import capture

    gm = capture(m.eval())   # AdderConv2d stays one module in the traced graph
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                  A.AdderConv2d)) == n_adders
    torch.testing.assert_close(gm(x), m(x))
