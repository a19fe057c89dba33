"""AdaRound / BRECQ: the pieces against the NumPy reference, units on the traced graph, export of the learned
integers, refusal of malformed recipes, and resume after SIGKILL."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from helpers import FLOAT64_TOL, assert_one_line_error, run_cli
from safetensors.numpy import load_file

import qpipe
from qpipe.models import load_model
from qpipe.pipeline import adaround as ada
from qpipe.pipeline.qmodel import prepare, quantize_weights
from qpipe.pipeline.quant import lsq_fake_quantize
from qpipe.recipe import load_recipe
from qpipe.reference import adaround as ref
from qpipe.runtime.check import weight_codes

INIT_V_RTOL = 1e-10           # log near 0 in init_v: torch and NumPy are a few ulps apart
SOFT_WEIGHT_ATOL = 1e-9       # the soft weight at V0 against the float weight's fractional part (float64)
LSQ_GRAD_RTOL = 1e-5          # the step gradient in float32 against the hand-computed float64 value
ORT_TORCH_TOP1_GAP = 0.002    # "within 0.2 points"; one of the 450 test images is 0.0022, so the two counts agree
REFUSAL_SECONDS = 5           # a malformed recipe is refused before any work: well under the time of one unit


def test_rectified_sigmoid_and_its_initialisation_match_the_reference():
    v = np.linspace(-12, 12, 2001)
    np.testing.assert_allclose(ada.rectified_sigmoid(torch.tensor(v)).numpy(), ref.rectified_sigmoid(v), rtol=FLOAT64_TOL)
    assert ref.rectified_sigmoid(np.array([-50.0, 50.0])).tolist() == [0.0, 1.0]  # clipped, reaches 0 and 1
    rng = np.random.default_rng(0)
    w, s = rng.normal(0, 1, 5000), 0.07
    v0 = ada.init_v(torch.tensor(w), torch.tensor(s, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(v0, ref.init_v(w, s), rtol=INIT_V_RTOL)
    frac = w / s - np.floor(w / s)
    np.testing.assert_allclose(ref.rectified_sigmoid(v0), frac, atol=SOFT_WEIGHT_ATOL)  # starts at the float weight


@pytest.mark.parametrize("beta", [20.0, 8.0, 2.0])
def test_regulariser_matches_the_reference(beta):
    v = np.random.default_rng(1).normal(0, 3, 4000)
    got = float(ada.regularizer(torch.tensor(v), beta))
    assert got == pytest.approx(ref.regularizer(v, beta), rel=FLOAT64_TOL)
    assert ref.regularizer(np.array([-40.0, 40.0]), beta) == 0.0  # hardened values cost nothing
    assert ref.regularizer(np.array([0.0]), beta) == pytest.approx(1.0)  # h = 0.5 costs most


def test_beta_schedule_warmup_then_linear_20_to_2():
    s = ada.BetaSchedule(iters=1000, warmup=0.2, start=20, end=2)
    assert s(0) is None and s(199) is None
    assert s(200) == 20.0 and s(600) == pytest.approx(11.0) and s(999) == pytest.approx(2.0225)  # 2 + 18 * (1 - 799/800)
    for t in range(0, 1000, 7):
        assert s(t) == ref.beta_at(t, 1000, 0.2, 20, 2)


def test_hardening_matches_the_reference():
    rng = np.random.default_rng(2)
    m = torch.nn.Conv2d(4, 6, 3)
    p = prepare(torch.nn.Sequential(m).eval(), load_recipe("w4a32"))
    quantize_weights(p, load_recipe("w4a32"))
    q = p.gm.get_submodule("0")
    w = ada.AdaRoundWeight(q, "cpu", -8, 7)
    w.v.data = torch.tensor(rng.normal(0, 2, w.v.shape), dtype=torch.float32)
    s = q.weight_scale.double().numpy().reshape(-1, 1, 1, 1)
    expected = ref.harden(q.weight.detach().double().numpy(), s, 0, w.v.detach().numpy(), -8, 7)
    np.testing.assert_array_equal(w.hard().numpy(), expected)
    # V >= 0 rounds up, V < 0 rounds down: hardened integers are the floor or the ceiling, never further
    base = np.floor(q.weight.detach().double().numpy() / s)
    assert set(np.unique(expected - np.clip(base, -8, 7))) <= {-1, 0, 1}


def test_lsq_step_gradient():
    # inside the grid: d x_hat / d s = round(x/s) - x/s; below: qmin - z; above: qmax - z; all times g
    x = torch.tensor([[0.26, -1.0, 5.0]])
    s = torch.tensor(0.1, requires_grad=True)
    y = lsq_fake_quantize(x, s, 0.0, -8, 7)
    g = 1 / np.sqrt(3 * 7)
    for i, expected in enumerate([(3 - 2.6) * g, -8 * g, 7 * g]):
        s.grad = None
        y = lsq_fake_quantize(x, s, 0.0, -8, 7)
        y[0, i].backward()
        assert float(s.grad) == pytest.approx(expected, rel=LSQ_GRAD_RTOL)
    assert torch.allclose(y.detach(), torch.tensor([[0.3, -0.8, 0.7]]))


def test_units_follow_the_graph():
    model = load_model("digits-cnn")
    r = load_recipe("w4a8-brecq")
    p = prepare(model, r)
    quantize_weights(p, r)
    layer = ada.find_units(p, "layer")
    assert [u.name for u in layer] == p.layers  # one unit per conv/linear, in graph order
    assert all(len(u.layers) == 1 for u in layer)
    block = ada.find_units(p, "block")
    assert [sorted(u.layers) for u in block] == [
        ["conv1"], ["layer1.0.conv1", "layer1.0.conv2"],
        ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"],
        ["layer3.0.conv1", "layer3.0.conv2", "layer3.0.downsample.0"], ["fc"]]
    assert [sorted(u.layers) for u in ada.find_units(p, "encoder")] == [sorted(u.layers) for u in block]
    (whole,) = ada.find_units(p, "model")
    assert sorted(whole.layers) == sorted(p.layers)
    # a block unit computes exactly what the model computes between its cut points
    x = torch.randn(4, 1, 8, 8)
    seg = ada.segment_module(p.gm, block[2].start, block[2].nodes)
    with torch.no_grad():
        mid = ada.prefix_module(p.gm, block[2].start)(x)
        torch.testing.assert_close(seg(mid), ada.prefix_module(p.gm, block[2].end)(x), rtol=0, atol=0)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_streamed_unit_inputs_and_targets_equal_the_model_recomputed_from_the_images(granularity, tmp_path):
    """The caches are filled by one streaming pass per mode (values kept while a later node reads them, e.g.
    a residual block's input); each unit's input and target equal the prefix of the model run on the images."""
    from qpipe.pipeline.qmodel import calibrate_activations, mode

    r = load_recipe("w4a8", ["calibration.images=64"])
    p = prepare(load_model("digits-cnn"), r)
    quantize_weights(p, r)
    x = torch.randn(70, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate_activations(p, r, [(x[:64], None)])
    units = ada.find_units(p, granularity)
    qs = ada.Stream(p.gm, x, "quant", 32, 1 << 30, tmp_path, "cpu", "in")
    fs = ada.Stream(p.gm, x, "float", 32, 1 << 30, tmp_path, "cpu", "out")
    peak = 0
    for u in units:
        for stream, node, m in ((qs, u.start, "quant"), (fs, u.end, "float")):
            got = stream.value(node).data
            with torch.no_grad(), mode(p.gm, m):
                want = torch.cat([ada.prefix_module(p.gm, node)(x[i:i + 32]) for i in range(0, 70, 32)])
            # the kept values are channels-last: float sums in another order, so a rare quantizer tie moves
            d = (got - want).abs()
            assert float((d > 1e-5).float().mean()) < 1e-3 and float(d.max()) < 0.25, (node.name, float(d.max()))
        qs.release(u.start)
        fs.release(u.end)
        peak = max(peak, len(qs.kept), len(fs.kept))
    # never more than the images, the unit's boundary and a residual block's input per stream are kept
    assert peak <= 3
    qs.close()
    fs.close()


@pytest.fixture(scope="module")
def adarounded(tmp_path_factory):
    out = tmp_path_factory.mktemp("ada") / "w3"
    art = qpipe.calibrate("digits-cnn", "digits", "w4a32-adaround", out, progress=False,
                          overrides=["weights.bits=3", "adaround.iters=300", "calibration.images=256"])
    qpipe.export(art, "qdq")
    return art


def test_export_carries_the_learned_integers(adarounded):
    art = adarounded
    report = art.qparams["adaround"]
    assert len(report) == 10 and all(u["mse_after"] < u["mse_before"] for u in report)
    assert sum(u["changed_from_nearest"] for u in report) > 0  # learned rounding differs from nearest
    assert not art.path.with_name(art.path.name + ".partial").exists()  # the work area is cleaned up
    ints = load_file(str(art.file("quantized.safetensors")))
    model = onnx.load(str(art.file("model.qdq.onnx")))
    inits = {t.name: t for t in model.graph.initializer}
    for name in art.qparams["layers"]:
        np.testing.assert_array_equal(weight_codes(inits[f"{name}.weight_quantized"]),
                                      ints[f"{name}.weight_int"].astype(np.int32))


def test_onnxruntime_accuracy_equals_torch_within_0_2_points(adarounded):
    from qpipe.runtime.evaluate import evaluate

    m_ort = evaluate(adarounded.path, backend="ort", latency=False, progress=False)
    m_torch = evaluate(adarounded.path, backend="torch", latency=False, progress=False)
    assert abs(m_ort["accuracy"]["top1"] - m_torch["accuracy"]["top1"]) <= ORT_TORCH_TOP1_GAP
    assert m_ort["accuracy"]["top1"] >= 0.95


BAD = [
    pytest.param("adaround.iters=-5", "adaround.iters", id="negative-iterations"),
    pytest.param("adaround.beta=[2,20]", "adaround.beta", id="beta-reversed"),
    pytest.param("adaround.granularity=row", "adaround.granularity", id="unknown-granularity"),
    pytest.param("adaround.beta=20", "adaround.beta", id="beta-not-a-pair"),
    pytest.param("adaround.lr=0", "adaround.lr", id="zero-lr"),
]


@pytest.mark.parametrize(("override", "needle"), BAD)
def test_malformed_adaround_recipe_is_refused_before_any_work(capsys, tmp_path, override, needle):
    out = tmp_path / "out"
    t = time.perf_counter()
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-cnn", "--recipe", "w4a32-adaround", "--set",
                           override, "--out", str(out))
    assert_one_line_error(code, err, needle)
    assert time.perf_counter() - t < REFUSAL_SECONDS and list(tmp_path.iterdir()) == []


def test_resume_after_sigkill_gives_the_same_integers(tmp_path):
    def cmd(out):
        return [sys.executable, "-m", "qpipe", "calibrate", "--model", "digits-cnn", "--recipe", "w4a32-adaround",
                "--set", "adaround.iters=200", "--set", "calibration.images=128", "--out", str(out)]

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = tmp_path / "killed"
    work = tmp_path / "killed.partial"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (work / "unit-001.safetensors").exists():
        assert proc.poll() is None and time.time() < deadline, "calibrate ended before its second unit finished"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in work.glob("unit-*.safetensors"))
    assert not out.exists() and len(finished) >= 2
    mtimes = {p: os.stat(work / p).st_mtime_ns for p in finished}

    r = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "qparams.json").read_text())["adaround"]
    resumed = [u["resumed"] for u in report]
    assert resumed == [True] * len(finished) + [False] * (len(report) - len(finished))  # not recomputed
    assert not work.exists() and mtimes  # finished units were read, then the work area was removed

    ref_out = tmp_path / "uninterrupted"
    r = subprocess.run(cmd(ref_out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = load_file(str(out / "quantized.safetensors"))
    b = load_file(str(ref_out / "quantized.safetensors"))
    ints = [k for k in a if k.endswith("weight_int")]
    assert len(ints) == 10
    for k in ints:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_memory_mapped_cache_gives_the_same_integers(tmp_path):
    ints = {}
    for budget in (2048, 0):  # 0 MB: every unit's inputs and targets go to memory-mapped files
        art = qpipe.calibrate("digits-cnn", "digits", "w4a32-adaround", tmp_path / f"b{budget}", progress=False,
                              overrides=["adaround.iters=40", "calibration.images=64", f"adaround.cache_mb={budget}",
                                         "adaround.granularity=block"])
        ints[budget] = load_file(str(art.file("quantized.safetensors")))
    for k, v in ints[2048].items():
        np.testing.assert_array_equal(v, ints[0][k], err_msg=k)


def test_progress_shows_in_a_log_one_line_per_unit(tmp_path):
    """stderr is a pipe here (as in a log file), where progress bars are off: every unit still says it is done,
    how long it took and how long the rest will take."""
    done = subprocess.run([sys.executable, "-m", "qpipe", "calibrate", "--model", "digits-cnn", "--recipe",
                           "w4a32-adaround", "--set", "adaround.iters=20", "--set", "calibration.images=64",
                           "--out", str(tmp_path / "art")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("adaround: unit ")]
    assert len(lines) == 10 and lines[0].startswith("adaround: unit 1/10") and lines[-1].startswith("adaround: unit 10/10")
    iterations = [int(re.search(r"\((\d+) iterations", ln).group(1)) for ln in lines]
    assert all(" s left" in ln for ln in lines) and all(1 <= i <= 20 for i in iterations), lines


@pytest.mark.parametrize("bounds", [(0.0, 6.0), (0.0, None), (None, None)])
def test_fused_unit_tail_gives_the_op_by_op_loss_and_gradient(bounds):
    """A layer unit's tail (ReLU6 / ReLU / nothing, then the output quantizer, straight-through) runs as one
    fused loss in the learning step; loss and gradient equal those of the op-by-op graph."""
    from qpipe.pipeline.qmodel import ActQuant
    from qpipe.pipeline.quant import QuantSpec

    gen = torch.Generator().manual_seed(0)
    y = (torch.randn(4, 8, 6, 6, generator=gen) * 4).contiguous(memory_format=torch.channels_last)
    t = torch.randn(4, 8, 6, 6, generator=gen).abs() * 3
    aq = ActQuant(QuantSpec(bits=8, signed=False, symmetric=False))
    aq.scale, aq.zero_point = torch.tensor(0.03), torch.tensor(20, dtype=torch.int32)
    aq.ste = True
    lo, hi = bounds
    y1, y2 = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref_loss = ada.recon_loss(aq(y1 if lo is None else torch.clamp(y1, lo, hi)), t)
    ref_loss.backward()
    fused = ada.Tail(lo, hi, aq).loss(y2, t)
    fused.backward()
    np.testing.assert_allclose(float(fused.detach()), float(ref_loss.detach()), rtol=1e-6)
    np.testing.assert_allclose(y2.grad.numpy(), y1.grad.numpy(), rtol=1e-6, atol=1e-9)
    assert (y1.grad == 0).any() and (y1.grad != 0).any()   # the mask matters: some values are clipped


def test_reconstruction_of_token_sequences_sums_features_and_skips_padding():
    """(N, L, D) outputs: squared error summed over D (the channel axis of a Linear on tokens), averaged over the
    tokens the attention mask keeps; the fused tail loss agrees, value and gradient."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = ada.token_keep(mask, t)
    want = sum(float(((y.detach()[i, j] - t[i, j]) ** 2).sum()) for i in range(2) for j in range(5) if mask[i, j]) / 8
    loss = ada.recon_loss(y, t, keep)
    assert abs(float(loss.detach()) - want) < 1e-4
    assert abs(float(ada.recon_loss(y, t).detach()) - float(((y.detach() - t) ** 2).sum(-1).mean())) < 1e-5
    y2 = y.detach().clone().requires_grad_(True)
    fused = ada._ChainLoss.apply(y2, t, None, None, None, keep)
    loss.backward()
    fused.backward()
    assert abs(float(fused.detach()) - want) < 1e-4 and torch.allclose(y.grad, y2.grad, atol=1e-6)
    assert float(y2.grad[0, 3:].abs().sum()) == 0   # padding gets no gradient


def test_output_clip_search_matches_reference_and_protects_channels_that_meet_outlier_inputs():
    """A channel with one large weight on an input that is large (a transformer's outlier feature): a
    weight-MSE grid clips that weight and the output pays; the output-error search keeps it. The torch search
    picks the NumPy reference's scales, for a linear layer and for a convolution (on its patches)."""
    from qpipe.pipeline.adaround import output_clip
    from qpipe.pipeline.observers import estimate
    from qpipe.pipeline.qmodel import QConv2d, QLinear
    from qpipe.pipeline.quant import QuantSpec
    from qpipe.reference.observers import output_clip as ref_clip

    g = torch.Generator().manual_seed(0)
    lin = QLinear(16, 8)
    w = torch.randn(8, 16, generator=g) * 0.05
    w[:, 0] = 0.6                                      # every channel's largest weight reads input 0 ...
    lin.weight.data = w
    x = torch.randn(256, 16, generator=g)
    x[:, 0] *= 20                                      # ... which is an outlier feature
    spec = QuantSpec(4, True, True, 0)
    s, z = estimate(w.double(), "mse", spec)
    lin.weight_scale, lin.weight_zero_point = s.float(), z.to(torch.int32)
    picked = output_clip(lin, x, 4)
    ref = ref_clip(w.double().numpy(), x.double().numpy(), 4, s.float().double().numpy())
    np.testing.assert_array_equal(picked.numpy(), ref)

    def out_err(scale):
        q = torch.clamp(torch.round(w.double() / scale[:, None]), -8, 7) * scale[:, None]
        return float(((x.double() @ (w.double() - q).T) ** 2).sum())
    assert bool((picked > s.float().double()).any())   # the MSE grid clipped 0.6; the search does not
    assert out_err(picked) < 0.5 * out_err(s.float().double())

    conv = QConv2d(3, 4, 3, padding=1)
    wc = torch.randn(4, 3, 3, 3, generator=g) * 0.1
    conv.weight.data = wc
    rows = wc.double().reshape(4, -1)
    sc, zc = estimate(rows, "mse", spec)
    conv.weight_scale, conv.weight_zero_point = sc.float(), zc.to(torch.int32)
    img = torch.randn(2, 3, 6, 6, generator=g)
    patches = torch.nn.functional.unfold(img.double(), 3, padding=1).transpose(1, 2).reshape(-1, 27)
    np.testing.assert_allclose(output_clip(conv, img, 4).numpy(),
                               ref_clip(rows.numpy(), patches.numpy(), 4, sc.float().double().numpy()), rtol=0)
