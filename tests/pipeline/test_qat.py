"""Quantization-aware training (APoT and uniform learned clipping): recipes, freezing to exact integer codes, the
QDQ export in onnxruntime against the PyTorch Q-model, resuming after a kill, divergence, and CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ONE_STEP, PARITY_TOP1, assert_one_line_error, digits_test_split, run_cli, write_cifar
from onnx import numpy_helper
from safetensors.numpy import load_file

import qpipe
from qpipe.data import load_data
from qpipe.errors import QpipeError
from qpipe.models import load_model
from qpipe.pipeline.apot import codes_of
from qpipe.pipeline.calibrate import load_quantized
from qpipe.pipeline.qat import QATModel, _bn_after, default_recipe, freeze
from qpipe.pipeline.qmodel import prepare
from qpipe.recipe import load_recipe
from qpipe.reference import apot as ref
from qpipe.runtime.check import weight_codes

ONE_STEP_IN_FLOAT32 = 1.0001   # one output step, with room for the float32 rounding of the step itself
FROZEN_MIN_SQNR_DB = 5         # frozen weights against the float weights: 4-bit APoT keeps the layer's signal
FOLDED_BN_FLOAT_ATOL = 1e-5    # float32 rounding of conv + BN against the folded conv, beyond half a bias step
FROZEN_TOP1_AGREEMENT = 0.95   # the frozen model's predictions against the training model's (rare bias flips)


@pytest.mark.parametrize("method", ["apot", "uniform"])
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_recipes(method, bits):
    r = load_recipe(default_recipe(method, bits, "digits-cnn"))
    assert (r.qat.method, r.weights.bits, r.activations.bits) == (method, bits, bits)
    assert (r.weights.first_bits, r.weights.last_bits) == (8, 8)
    r20 = load_recipe(default_recipe(method, bits, "resnet20"))
    assert r20.name == f"{method}-w{bits}a{bits}-resnet20"
    # the paper's CIFAR-10 ResNet20 settings (ALGORITHMS.md section 5)
    assert (r20.qat.lr, r20.qat.weight_decay, r20.qat.momentum, r20.qat.batch_size, r20.qat.act_alpha_init) == (
        0.04, 1e-4 if bits > 2 else 3e-5, 0.9, 128, 8.0)
    assert (r20.qat.alpha_lr_acts, r20.qat.alpha_lr_weights) == (0.1, 0.02)


@pytest.mark.parametrize(("over", "needle"), [
    (["weights.bits=6"], "APoT levels exist for 2..5 bits"),
    (["activations.symmetric=false"], "activations.symmetric"),
    (["fold_bn=false"], "fold_bn must be true"),
    (["qat.lr=0"], "qat.lr"),
    (["qat.method=lsq"], "qat.method"),
])
def test_bad_qat_recipes(over, needle):
    with pytest.raises(QpipeError, match=needle):
        load_recipe("apot-w4a4", over)


def test_apot_needs_unsigned_inputs():
    """A middle layer reading a tensor that can be negative cannot take unsigned APoT levels: one clear error."""
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(QpipeError, match="APoT activation levels are unsigned.*qat.method: uniform"):
        prepare(model, load_recipe("apot-w4a4"))
    prepare(model, load_recipe("uniform-w4a4"))   # uniform levels are signed there


def test_qat_placement_on_the_digits_cnn():
    """Quantizers on the inputs of every Conv/Linear and on the output; 8-bit uniform at the edges, APoT elsewhere."""
    r = load_recipe("apot-w3a3")
    p = prepare(load_model("digits-cnn"), r)
    kinds = {}
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is None:
            kinds[name] = (aq.levels.kind, aq.spec.bits, aq.spec.signed)
    assert kinds["aq_x"] == ("uniform", 8, True)         # the image, read by the first conv
    assert kinds["aq_avgpool"] == ("uniform", 8, False)  # read by the last layer
    assert kinds["aq_fc"] == ("uniform", 8, True)        # the logits
    apot = [k for k, v in kinds.items() if v == ("apot", 3, False)]
    assert len(apot) == 6 and len(kinds) == 9
    # every layer reads a quantized tensor; the block outputs before the residual add stay float
    assert all(p.layer_input[name] is not None for name in p.layers)


def _trained(tmp_path_factory, method, bits, epochs=2):
    out = tmp_path_factory.mktemp("qat") / f"{method}{bits}"
    art = qpipe.train_qat("digits-cnn", "digits", out, method=method, bits=bits, overrides=[f"qat.epochs={epochs}"],
                          progress=False)
    qpipe.export(art, "qdq")
    return art


@pytest.fixture(scope="module")
def apot3(tmp_path_factory):
    return _trained(tmp_path_factory, "apot", 3)


def _ort_logits(path, x, **extra_outputs):
    model = onnx.load(str(path))
    for name in extra_outputs.get("outputs", []):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})


def test_onnxruntime_reproduces_the_pytorch_apot_model(apot3):
    """Logits within one output step and top-1 identical on the whole digits test split."""
    art = apot3
    x, _ = digits_test_split()
    with torch.no_grad():
        want = load_quantized(art)(x).numpy()
    got = _ort_logits(art.file("model.qdq.onnx"), x)[0]
    step = art.qparams["tensors"][art.qparams["output_quantizer"]]["scale"]
    assert np.abs(got - want).max() <= step * ONE_STEP_IN_FLOAT32
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False)
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["max_abs_diff_steps"] <= ONE_STEP
    assert m["accuracy"]["top1"] > 0.9   # two epochs of 3-bit APoT already keep the digits


def test_onnx_integers_equal_the_pytorch_codes(apot3):
    """Weights: the initializers are the frozen codes, and those are the training codes (sign-flipped where BN's
    gamma is negative) on the APoT level set. Activations: the file's APoTProject gives torch's codes."""
    art = apot3
    model = onnx.load(str(art.file("model.qdq.onnx")))
    inits = {t.name: t for t in model.graph.initializer}
    ints = load_file(str(art.file("quantized.safetensors")))
    tensors = art.qparams["tensors"]
    allowed = set(ref.level_codes(3, signed=True).tolist())
    n_apot = 0
    for name, rec in tensors.items():
        if rec["kind"] != "weight":
            continue
        got = weight_codes(inits[f"{name}_quantized"])
        np.testing.assert_array_equal(got, ints[f"{name}_int"].astype(np.int32))
        if rec["levels"] == "apot":
            n_apot += 1
            assert set(np.unique(got).tolist()) <= allowed
            assert rec["denominator"] == 4   # 3-bit weights: the 2-bit set {0, 1/4, 1/2, 1} mirrored
    assert n_apot == 8
    x = digits_test_split()[0][:64]
    gm = load_quantized(art)
    seen = {}
    for name, mod in gm.named_modules():
        if name.startswith("aq_") and mod.apot and mod.source is None:
            mod.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, i[0].detach()))
    gm(x)
    assert len(seen) == 6
    for name, xin in seen.items():
        want = codes_of(xin, gm.get_submodule(name).alpha, gm.get_submodule(name).levels).numpy()
        rec = tensors[name]
        # the file's constants, run through its own APoTProject function in onnxruntime
        node = next(n for n in model.graph.node if n.op_type == "APoTProject" and n.input[1] == f"{name}_fine_step")
        step = numpy_helper.to_array(inits[node.input[1]])
        table = numpy_helper.to_array(inits[node.input[2]])
        assert float(step) == np.float32(rec["fine_step"]) and table.tolist() == ref.fine_table(3).tolist()
        g = onnx.helper.make_graph(
            [onnx.helper.make_node("APoTProject", ["x", "step", "table"], ["codes"], domain="ai.qpipe")], "p",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
            [onnx.helper.make_tensor_value_info("codes", onnx.TensorProto.INT64, None)],
            [numpy_helper.from_array(step, "step"), numpy_helper.from_array(table, "table")])
        one = onnx.helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                     functions=list(model.functions))
        s = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(s.run(None, {"x": xin.numpy()})[0], want)


def test_freeze_keeps_the_training_codes():
    """Frozen weight codes are the training codes (times sign(gamma / sigma)); the frozen model (BN folded, int32
    biases) computes what the training model computes in eval mode, up to the bias rounding."""
    import copy
    import dataclasses

    torch.manual_seed(0)
    r = load_recipe("apot-w4a4")
    template = load_model("digits-cnn")
    p = prepare(copy.deepcopy(template), dataclasses.replace(r, fold_bn=False))
    qm = QATModel(p, r)
    x = torch.cat([xb for xb, _ in load_data("digits").batches("calib", 256)])
    qm.init_act_alphas(x, 64)
    bns = _bn_after(qm.gm)
    bns["conv1"].weight.data[:3] *= -1     # negative gammas flip the codes' signs
    for m in qm.gm.modules():              # BN statistics of the quantized model (normalised weights)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    qm.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            qm(x[i : i + 64])
    qm.eval()
    frozen, info, _ = freeze(qm, template, r)
    for name in frozen.layers:
        codes = qm.wq[name].codes(qm.gm.get_submodule(name).weight)
        bn = bns.get(name)
        sign = torch.ones(codes.shape[0], dtype=torch.long) if bn is None else torch.where(bn.weight < 0, -1, 1)
        got = frozen.gm.get_submodule(name).weight_int.long()
        torch.testing.assert_close(got, codes * sign.reshape(-1, *[1] * (codes.ndim - 1)), rtol=0, atol=0)
        assert info[name] > FROZEN_MIN_SQNR_DB   # the weight SQNR (dB) freeze reports per layer
    seen = {}
    for tag, gm in (("train", qm.gm), ("frozen", frozen.gm)):
        gm.get_submodule("aq_relu").register_forward_hook(lambda m, i, o, t=tag: seen.__setitem__(t, i[0]))
    with torch.no_grad():
        want, got = qm(x), frozen.gm(x)
    # the first APoT quantizer's input: conv1 + BN in float against the folded conv with its int32 bias
    bias_step = float(frozen.gm.get_submodule("conv1").bias_scale.max())
    assert (seen["train"] - seen["frozen"]).abs().max() <= 0.5 * bias_step + FOLDED_BN_FLOAT_ATOL
    # 4-bit levels pass the rare bias-rounding flip on; the logits still agree almost everywhere
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= FROZEN_TOP1_AGREEMENT


def test_uniform_qat_exports_plain_qdq(tmp_path_factory):
    """Uniform levels are an ordinary Q/DQ grid at alpha / D: no ai.qpipe op in the file, onnxruntime agrees."""
    art = _trained(tmp_path_factory, "uniform", 4, epochs=1)
    model = onnx.load(str(art.file("model.qdq.onnx")))
    assert not [n for n in model.graph.node if n.domain == "ai.qpipe"]
    rec = art.qparams["tensors"]["aq_relu"]
    assert rec["levels"] == "uniform" and rec["bits"] == 4 and rec["zero_point"] == 0
    assert np.float32(rec["scale"]) == np.float32(np.float32(rec["alpha"]) / np.float32(15))
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False)
    assert m["parity"]["top1_agreement"] >= PARITY_TOP1


def _cmd(out, epochs=4):
    return [sys.executable, "-m", "qpipe", "train", "--model", "digits-cnn", "--qat", "apot", "--bits", "4",
            "--epochs", str(epochs), "--out", str(out)]


def test_resume_after_sigkill_gives_the_same_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    state = tmp_path / "killed.partial" / "qat-state.pt"
    proc = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not state.exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first epoch was saved"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    saved = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= saved < 4
    r = subprocess.run(_cmd(out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    qat = json.loads((out / "qparams.json").read_text())["qat"]
    assert qat["resumed_from_epoch"] == saved and [h["epoch"] for h in qat["history"]] == [1, 2, 3, 4]
    assert not state.parent.exists()

    ref_out = tmp_path / "uninterrupted"
    r = subprocess.run(_cmd(ref_out), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = load_file(str(out / "quantized.safetensors"))
    b = load_file(str(ref_out / "quantized.safetensors"))
    assert a.keys() == b.keys() and sum(k.endswith("weight_int") for k in a) == 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_non_finite_loss_stops_without_an_artifact(tmp_path, capsys):
    out = tmp_path / "diverged"
    code, _, err = run_cli(capsys, "train", "--model", "digits-cnn", "--qat", "apot", "--bits", "4", "--epochs", "2",
                        "--set", "qat.alpha_lr_weights=1e30", "--lr", "1e30", "--out", str(out))
    assert_one_line_error(code, err, "training diverged", "lower qat.lr", "no artifact written")
    assert not out.exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--qat", "apot", "--bits", "7"], "APoT levels exist for 2..5 bits"),
    (["--qat", "apot", "--bits", "4", "--init", "missing.safetensors"], "does not exist"),
    (["--bits", "4"], "add --qat"),
    (["--qat", "apot", "--bits", "4", "--set", "qat.nope=1"], "unknown recipe key 'qat.nope'"),
    (["--qat", "apot", "--bits", "4", "--model", "resnet20", "--data", "digits"], "ships no checkpoint"),
])
def test_cli_errors(tmp_path, capsys, args, needle):
    model = [] if "--model" in args else ["--model", "digits-cnn"]
    code, _, err = run_cli(capsys, "train", *model, *args, "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_init_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run_cli(capsys, "train", "--model", "digits-cnn", "--qat", "uniform", "--bits", "4", "--init",
                        str(bad), "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "could not be read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_resnet20_recipe_on_a_cifar_format_file(tmp_path):
    """resnet20 with the paper's settings trains (one epoch) on CIFAR-10 binary batches, exports, and onnxruntime
    reproduces it: what a user with CIFAR-10 runs for the 300-epoch table."""
    from safetensors.torch import save_file

    from qpipe.models import build_model

    write_cifar(tmp_path / "c", n_train=(24, 8), n_test=16)
    torch.manual_seed(0)
    save_file(build_model("resnet20").state_dict(), str(tmp_path / "r20.safetensors"))
    out = tmp_path / "r20-apot-w2a2"
    art = qpipe.train_qat("resnet20", f"cifar10:{tmp_path / 'c'}", out, method="apot", bits=2,
                          init=str(tmp_path / "r20.safetensors"), overrides=["qat.epochs=1", "qat.batch_size=16"],
                          progress=False)
    assert art.recipe.name == "apot-w2a2-resnet20" and art.recipe.qat.act_alpha_init == 8.0
    assert (art.path / "trained.safetensors").is_file()
    qpipe.export(art, "qdq")
    n_apot = sum(1 for v in art.qparams["tensors"].values() if v.get("levels") == "apot" and v["kind"] == "weight")
    assert n_apot == 20   # 22 Conv/Linear layers; the first conv and the fc stay 8-bit uniform
    m = qpipe.evaluate(art.path, f"cifar10:{tmp_path / 'c'}", backend="ort", latency=False, progress=False)
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["max_abs_diff_steps"] <= ONE_STEP


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    for args in (["--qat", "apot", "--bits", "4"], ["--epochs", "1"]):
        code, _, err = run_cli(capsys, "train", "--model", "digits-cnn", *args, "--device", "cuda",
                            "--out", str(tmp_path / "a.safetensors"))
        assert_one_line_error(code, err, "no CUDA GPU")
    assert list(tmp_path.iterdir()) == []
