"""Graph capture on models written the way users write them (tests/models/user_models.py): the captured model
computes the same function, the quantization points follow from the graph, the same recipes quantize and export
them (QDQ and integer-only) and onnxruntime runs them; untraceable modules fail with one line and can be excluded."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import (
    ONE_POINT,
    PARITY_TOP1,
    assert_ok,
    assert_one_line_error,
    digits_test_split,
    run_cli,
    user_model,
)

import qpipe
from qpipe.data import load_data
from qpipe.errors import QpipeError
from qpipe.models import build_model, load_weights
from qpipe.pipeline.calibrate import load_int_model
from qpipe.pipeline.capture import capture
from qpipe.pipeline.train import accuracy, train
from qpipe.recipe import load_recipe

CAPTURE_RTOL = 1e-6  # the captured graph runs the same float32 ops; modules for functional calls may reorder sums
SAME_ACCURACY = 1e-9  # the training note's test top-1 and the same model's accuracy recomputed: the same number


@pytest.mark.parametrize("name", ["timm_vit", "plain_resnet", "masked_encoder"])
def test_capture_computes_the_same_function(name):
    torch.manual_seed(0)
    model = build_model(user_model(name)).eval()
    x = torch.randn(8, 1, 8, 8)
    gm = capture(model)
    with torch.no_grad():
        want, got = model(x), gm(x)
    torch.testing.assert_close(got, want, rtol=CAPTURE_RTOL, atol=CAPTURE_RTOL * float(want.abs().max()))
    functional = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                  and str(n.target).split(".")[-1] in ("softmax", "gelu", "layer_norm")]
    assert not functional, functional  # every functional softmax / GELU / layer_norm is a module now


def test_registry_models_capture_unchanged():
    for name in ("digits-cnn", "digits-vit", "digits-adder"):
        torch.manual_seed(0)
        model = build_model(name).eval()
        x = torch.randn(4, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(capture(model)(x), model(x), rtol=CAPTURE_RTOL, atol=CAPTURE_RTOL)


def _inspect(capsys, name, recipe="w8a8-int"):
    code, out, err = run_cli(capsys, "inspect", "--model", user_model(name), "--recipe", recipe, "--json")
    assert_ok(code, err)
    return json.loads(out)


@pytest.mark.parametrize(("name", "counts"), [
    ("timm_vit", {"IntSoftmax": 2, "IntGELU": 2, "IntLayerNorm": 5, "matmul": 4, "add": 5, "linear": 9}),
    ("masked_encoder", {"IntSoftmax": 2, "IntGELU": 2, "IntLayerNorm": 5, "matmul": 4, "add": 5, "linear": 14}),
    ("plain_resnet", {"add": 2, "conv": 5, "linear": 1, "pool": 1}),
])
def test_inspect_lists_every_point(capsys, name, counts):
    rows = _inspect(capsys, name)
    got = {}
    for r in rows:
        got[r["op"]] = got.get(r["op"], 0) + 1
    for op, n in counts.items():
        assert got.get(op) == n, (op, got)
    by_op = {r["op"]: r for r in rows}
    if name != "plain_resnet":
        sm = by_op["IntSoftmax"]
        assert sm["output"].endswith("(uint8)") and sm["inputs"][0].startswith("aq_")
        mm = [r for r in rows if r["op"] == "matmul"]
        assert all(len(r["inputs"]) == 2 and all(i.startswith("aq_") for i in r["inputs"]) for r in mm)
    # float ops in the QDQ recipe
    rows = _inspect(capsys, name, "w8a8")
    assert not any(r["op"].startswith("Int") for r in rows)


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """The timm-style ViT trained briefly on digits (40 epochs)."""
    ckpt = tmp_path_factory.mktemp("vit") / "timm_vit.safetensors"
    torch.manual_seed(0)
    note = train(user_model("timm_vit"), "digits", 40, ckpt, progress=False)
    model = load_weights(build_model(user_model("timm_vit")), ckpt).eval()
    return model, note["test_top1"]


def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x.numpy()})[0]


def test_timm_vit_w8a8_integer_graph(timm_vit, tmp_path):
    """W8A8 with the I-ViT integer ops, from the integer-only graph: within 1.0 point of FP32, bit-exact."""
    model, fp32 = timm_vit
    assert fp32 > 0.8
    art = qpipe.calibrate(model, "digits", "w8a8-int", tmp_path / "vit", progress=False)
    qpipe.export(art, "all")
    src = load_data("digits")
    x, y = digits_test_split()
    got = _ort(art.file("model.int.onnx"), x)
    with torch.no_grad():
        want = load_int_model(art, model)(x).numpy()
    np.testing.assert_array_equal(got, want)
    top1 = float((torch.tensor(got).argmax(1) == y).float().mean())
    assert top1 >= fp32 - ONE_POINT, (top1, fp32)
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False, format="qdq", model=model)
    assert m["parity"]["top1_agreement"] >= PARITY_TOP1
    assert abs(accuracy(model, src) - fp32) < SAME_ACCURACY


@pytest.mark.parametrize(("name", "recipe"), [("plain_resnet", "w8a8"), ("masked_encoder", "w8a8-int")])
def test_user_models_export_and_run(name, recipe, tmp_path):
    torch.manual_seed(0)
    model = build_model(user_model(name)).eval()
    art = qpipe.calibrate(model, "digits", recipe, tmp_path / name, progress=False)
    assert art.qparams["int_graph"]["available"], art.qparams["int_graph"]
    qpipe.export(art, "all")
    for fmt in ("qdq", "int"):
        m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False, format=fmt, model=model)
        assert m["parity"]["top1_agreement"] >= PARITY_TOP1
        if fmt == "int":
            assert m["parity"]["max_abs_diff"] == 0 and m["parity_optimized"]["max_abs_diff"] == 0


def test_control_flow_names_the_module_and_exclude_keeps_it_float(capsys, tmp_path):
    out = tmp_path / "gated"
    code, _, err = run_cli(capsys, "calibrate", "--model", user_model("gated_net"), "--recipe", "w8a8", "--out", str(out))
    assert_one_line_error(code, err, "module gate (Gate)", "data-dependent control flow", "exclude: [gate]")
    assert not out.exists()
    code, _, err = run_cli(capsys, "calibrate", "--model", user_model("gated_net"), "--recipe", "w8a8", "--out", str(out),
                           "--set", "exclude=[gate]")
    assert_ok(code, err)
    art = qpipe.export(str(out), "qdq") and qpipe.evaluate(str(out), backend="ort", latency=False, progress=False)
    assert art["parity"]["top1_agreement"] >= PARITY_TOP1
    q = json.loads((out / "qparams.json").read_text())
    assert {"conv.weight", "fc.weight"} <= set(q["tensors"]) and "aq_gate" in q["tensors"]   # the rest is quantized
    assert not q["int_graph"]["available"] and "gate" in q["int_graph"]["reason"]


def test_exclude_unknown_module():
    with pytest.raises(QpipeError, match="no module named 'nope'"):
        capture(build_model("digits-cnn"), exclude=["nope"])
    with pytest.raises(QpipeError, match="exclude must be a list of module names"):
        load_recipe("w8a8", ["exclude=3"])


def test_iterating_a_shape_is_named_as_such_and_calibrate_goes_on_through_torch_export(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", "--model", user_model("shape_unpack"))
    assert_one_line_error(code, err, "iteration over a tensor")   # not mistaken for control flow
    out = tmp_path / "art"
    code, _, err = run_cli(capsys, "calibrate", "--model", user_model("shape_unpack"), "--out", str(out))
    assert_ok(code, err)   # with the data's first batch as the example, torch.export captures it
    assert_ok(*run_cli(capsys, "export", str(out))[::2])
    m = qpipe.evaluate(str(out), latency=False, progress=False)
    assert m["parity"]["max_abs_diff_steps"] <= 2 and m["parity"]["top1_agreement"] >= PARITY_TOP1
