"""The integer-only graph (model.int.onnx) of the demo CNN and ViT: integer tensors only, the ai.qpipe op counts,
onnxruntime equal to the PyTorch integer simulation on the whole test split, and the accuracy it keeps."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from helpers import ONE_POINT, assert_one_line_error, digits_test_split, run_cli
from onnx import TensorProto, helper

import qpipe
from qpipe.pipeline.calibrate import load_int_model, load_quantized
from qpipe.runtime.check import integer_only
from qpipe.runtime.session import make_session

INT_SIM_TOP1_AGREEMENT = 0.99  # dyadic (round half up) against float (half to even) requantisation: see the test
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "Softmax", "LayerNormalization", "Gelu", "Erf", "Div", "Sqrt", "Pow"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("int")
    out = {}
    for model in ("digits-vit", "digits-cnn"):
        art = qpipe.calibrate(model, "digits", "w8a8-int", out=root / model, progress=False)
        qpipe.export(art, format="all")
        out[model] = art
    return out


def _ops(path) -> Counter:
    m = onnx.load(str(path))
    return Counter((n.domain or "", n.op_type) for n in m.graph.node)


def test_vit_int_graph_is_integer_only_with_one_int_op_per_site(artifacts):
    model = onnx.load(str(artifacts["digits-vit"].file("model.int.onnx")))
    ok, detail = integer_only(model)
    assert ok, detail
    ops = _ops(artifacts["digits-vit"].file("model.int.onnx"))
    # 4 encoder blocks: one IntSoftmax and one IntGELU each; LayerNorm twice per block plus the final one
    assert ops[("ai.qpipe", "IntSoftmax")] == 4
    assert ops[("ai.qpipe", "IntGELU")] == 4
    assert ops[("ai.qpipe", "IntLayerNorm")] == 9
    assert ops[("ai.qpipe", "IntAdd")] == 9            # position embedding + 2 residual adds per block
    assert ops[("", "MatMulInteger")] == 4 * 6 + 1     # qkv, QK^T, attn.V, out_proj, fc1, fc2; the head
    assert ops[("", "ConvInteger")] == 1               # the patch embedding
    assert ops[("", "QuantizeLinear")] == 1 and ops[("", "DequantizeLinear")] == 1
    assert not {op for _, op in ops} & FLOAT_OPS
    # the functions travel inside the file
    assert {f.name for f in model.functions} >= {"IntSoftmax", "IntGELU", "IntLayerNorm", "Requant", "IntAdd"}


def test_cnn_int_graph_is_integer_only(artifacts):
    model = onnx.load(str(artifacts["digits-cnn"].file("model.int.onnx")))
    ok, detail = integer_only(model)
    assert ok, detail
    ops = _ops(artifacts["digits-cnn"].file("model.int.onnx"))
    assert ops[("", "ConvInteger")] == 9 and ops[("", "MatMulInteger")] == 1
    assert ops[("ai.qpipe", "IntAdd")] == 3            # one residual add per block
    assert not {op for _, op in ops} & FLOAT_OPS


def test_integer_walk_catches_a_float_tensor(artifacts):
    model = onnx.load(str(artifacts["digits-vit"].file("model.int.onnx")))
    i, node = next((i, n) for i, n in enumerate(model.graph.node) if n.op_type == "IntSoftmax")
    out = node.output[0]
    node.output[0] = out + "/pre"
    model.graph.node.insert(i + 1, helper.make_node("Cast", [out + "/pre"], [out + "/f"], to=TensorProto.FLOAT))
    model.graph.node.insert(i + 2, helper.make_node("Cast", [out + "/f"], [out], to=TensorProto.INT64))
    onnx.checker.check_model(model)
    ok, detail = integer_only(model)
    assert not ok and "/f" in detail and "FLOAT" in detail


@pytest.mark.parametrize("name", ["digits-vit", "digits-cnn"])
def test_onnxruntime_int_graph_equals_the_torch_integer_model_exactly(artifacts, name):
    art = artifacts[name]
    sim = load_int_model(art)
    step = art.qparams["tensors"][art.qparams["output_quantizer"]]["scale"]
    x, _ = digits_test_split()
    assert len(x) == 450
    with torch.no_grad():
        ref = sim(x).numpy()
    for optimized in (False, True):
        got = make_session(art.file("model.int.onnx"), optimized=optimized).run(None, {"input": x.numpy()})[0]
        np.testing.assert_array_equal(got, ref)
        # and the integers themselves: logits / step are integers, identical
        np.testing.assert_array_equal(np.round(got / step), np.round(ref / step))
    m = qpipe.evaluate(art.path, format="int", latency=False, progress=False)
    assert m["parity"]["reference"] == "torch integer model"
    assert m["parity"]["top1_agreement"] == 1.0 and m["parity"]["max_abs_diff"] == 0.0
    assert m["parity_optimized"]["max_abs_diff"] == 0.0


def test_digits_vit_w8a8_int_ops_within_1_point_of_fp32(artifacts):
    fp32 = json.loads(open(qpipe.models.ROOT / "artifacts/models/digits-vit.json").read())["test_top1"]
    m = qpipe.evaluate(artifacts["digits-vit"].path, format="int", latency=False, progress=False)
    assert m["backend"] == "ort" and m["model_file"] == "model.int.onnx"
    assert m["accuracy"]["top1"] >= fp32 - ONE_POINT, (m["accuracy"], fp32)


def test_integer_simulation_tracks_the_fake_quantized_model(artifacts):
    """Dyadic requantisation (round half up) vs float requantisation (half to even) may move a value by one step
    here and there; the predictions must stay the same almost everywhere."""
    art = artifacts["digits-vit"]
    q, sim = load_quantized(art), load_int_model(art)
    x, _ = digits_test_split()
    with torch.no_grad():
        agree = (q(x).argmax(1) == sim(x).argmax(1)).float().mean()
    assert agree >= INT_SIM_TOP1_AGREEMENT


def test_check_gates_the_int_graph(artifacts, capsys):
    art = artifacts["digits-vit"]
    qpipe.evaluate(art.path, format="int", latency=False, progress=False)
    qpipe.evaluate(art.path, format="qdq", latency=False, progress=False)
    code, out, _ = run_cli(capsys, "check", str(art.path))
    assert "PASS  integer-only model.int.onnx" in out and "PASS  int parity.max_abs_diff == 0" in out
    assert code == 0, out


def test_fp32_export_of_an_int_op_artifact_uses_the_float_ops(artifacts):
    ops = _ops(artifacts["digits-vit"].file("model.fp32.onnx"))
    assert ops[("", "Softmax")] == 4 and ops[("", "LayerNormalization")] == 9 and ops[("", "Gelu")] == 4
    assert not any(d == "ai.qpipe" for d, _ in ops)
    m = qpipe.evaluate(artifacts["digits-vit"].path, format="fp32", latency=False, progress=False, write=False)
    assert m["accuracy"]["top1"] >= 0.98


def test_qdq_with_int_ops_carries_the_functions(artifacts):
    path = artifacts["digits-vit"].file("model.qdq.onnx")
    ops = _ops(path)
    assert ops[("ai.qpipe", "IntSoftmax")] == 4 and ops[("", "Softmax")] == 0
    assert {f.name for f in onnx.load(str(path)).functions} >= {"IntSoftmax", "IntLayerNorm"}


def test_int_export_of_a_float_op_vit_says_why(tmp_path, capsys):
    art = qpipe.calibrate("digits-vit", "digits", "w8a8", out=tmp_path / "fp-ops", progress=False,
                          overrides=["calibration.images=64"])
    code, _, err = run_cli(capsys, "export", str(art.path), "--format", "int")
    assert_one_line_error(code, err, "no integer-only graph", "ops.layernorm: int")
    assert not art.file("model.int.onnx").exists()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--set", "ops.softmax=int", "--set", "activations.bits=32"], "needs quantized activations"),
    (["--set", "activations.residual_bits=17"], "outside 2..16"),
    (["--set", "ops.gelu=fast"], "ops.gelu"),
], ids=["int-op-float-acts", "residual-17", "unknown-op-mode"])
def test_bad_int_recipes_are_one_line_errors(tmp_path, capsys, extra, needle):
    code, _, err = run_cli(capsys, "calibrate", "--model", "digits-vit", "--recipe", "w8a8-int", "--out",
                           str(tmp_path / "o"), *extra)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_vit_b_16_exports_both_formats_and_runs_in_onnxruntime(tmp_path):
    """Random-weight ViT-B/16 (86M parameters): QDQ and integer-only graphs pass onnx.checker and run (~70 s)."""
    art = qpipe.calibrate("vit_b_16", "synthetic:3x224x224:8", "w8a8-int", out=tmp_path / "vitb", progress=False,
                          overrides=["calibration.images=4", "calibration.batch_size=2"])
    paths = qpipe.export(art, format="all")
    assert {p.name for p in paths} == {"model.qdq.onnx", "model.fp32.onnx", "model.int.onnx"}
    x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
    for p in paths:
        onnx.checker.check_model(str(p), full_check=True)
        assert make_session(p, optimized=True).run(None, {"input": x})[0].shape == (1, 1000)
    ok, detail = integer_only(onnx.load(str(art.file("model.int.onnx"))))
    assert ok, detail
    ops = _ops(art.file("model.int.onnx"))
    assert ops[("ai.qpipe", "IntSoftmax")] == 12 and ops[("ai.qpipe", "IntLayerNorm")] == 25
    sim = load_int_model(art)
    with torch.no_grad():
        ref = sim(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(make_session(art.file("model.int.onnx")).run(None, {"input": x})[0], ref)


def test_brecq_lsq_keeps_the_int_softmax_grid_and_the_int_graph(tmp_path):
    """LSQ learns activation steps, but not IntSoftmax's output grid (2^-8, part of the op); the integer graph of
    the reconstructed model is still exact."""
    art = qpipe.calibrate("digits-vit", "digits", "w4a8-int", out=tmp_path / "brecq", progress=False,
                          overrides=["weights.rounding=adaround", "adaround.granularity=block", "adaround.lsq=true",
                                     "adaround.iters=5", "calibration.images=32"])
    t = art.qparams["tensors"]
    soft = [k for k in t if k.endswith("softmax")]
    assert len(soft) == 4 and all(t[k]["scale"] == 2.0**-8 for k in soft)
    qpipe.export(art, format="int")
    m = qpipe.evaluate(art.path, format="int", latency=False, progress=False, limit=128)
    assert m["parity"]["max_abs_diff"] == 0.0 and m["parity_optimized"]["max_abs_diff"] == 0.0


def test_int_graph_carries_only_the_functions_it_calls(artifacts):
    model = onnx.load(str(artifacts["digits-cnn"].file("model.int.onnx")))
    names = {f.name for f in model.functions}
    assert "Requant" in names and "IntAdd" in names
    assert not names & {"IntSoftmax", "IntGELU", "IntLayerNorm", "APoTProject"}  # the CNN has none of these
