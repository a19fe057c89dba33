"""The CNN path end to end on the bundled digits: calibrate -> QDQ ONNX -> onnxruntime -> check."""

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import PARITY_TOP1, QDQ_PARITY_STEPS
from onnx import TensorProto, numpy_helper
from safetensors.numpy import load_file

import qpipe
from qpipe.runtime.check import check
from qpipe.runtime.evaluate import evaluate

W8A8_TOP1_DROP = 0.005  # "within half a point of FP32": 2 of the 450 test images


@pytest.fixture(scope="module")
def runs(tmp_path_factory, artifacts, cnn_w8a8):
    """FP32 and W8A8 (the recipes' defaults), exported to QDQ and evaluated in onnxruntime; the W8A8 artifact is a
    copy of the session's shared one (export and evaluate write into it)."""
    root = tmp_path_factory.mktemp("runs")
    fp32 = qpipe.calibrate("digits-cnn", "digits", "fp32", root / "fp32", progress=False)
    w8a8 = artifacts.copy(cnn_w8a8, root / "w8a8")
    out = {}
    for recipe, path in (("fp32", fp32.path), ("w8a8", w8a8)):
        qpipe.export(path, "qdq")
        out[recipe] = evaluate(path, backend="ort", progress=False, latency=False)
        out[recipe + "_art"] = path
    return out


def test_fp32_demo_cnn_reaches_97_percent(runs):
    assert runs["fp32"]["accuracy"]["top1"] >= 0.97
    assert runs["fp32"]["accuracy"]["n"] == 450


def test_w8a8_per_channel_within_half_a_point_of_fp32_in_onnxruntime(runs):
    m = runs["w8a8"]
    assert m["provider"] == "CPUExecutionProvider"
    assert m["accuracy"]["top1"] >= runs["fp32"]["accuracy"]["top1"] - W8A8_TOP1_DROP
    assert m["accuracy_optimized"]["top1"] >= runs["fp32"]["accuracy"]["top1"] - W8A8_TOP1_DROP


def test_w8a8_onnxruntime_agrees_with_torch_quantized_model(runs):
    m = runs["w8a8"]
    for key in ("parity", "parity_optimized"):
        assert m[key]["top1_agreement"] >= PARITY_TOP1
        assert m[key]["max_abs_diff_steps"] <= QDQ_PARITY_STEPS


def test_check_passes_and_catches_a_tampered_file(runs, tmp_path):
    art = runs["w8a8_art"]
    assert all(r.ok for r in check(art)), [r for r in check(art) if not r.ok]
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    q = json.loads((copy / "qparams.json").read_text())
    q["format"] = 99
    (copy / "qparams.json").write_text(json.dumps(q))
    bad = [r.name for r in check(copy) if not r.ok]
    assert bad == ["manifest hashes"]


def _codes(model, name):
    inits = {t.name: t for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}_quantized")
    t, z = inits[dq.input[0]], inits[dq.input[2]]  # onnxsim may share equal zero-point tensors
    q, zp = numpy_helper.to_array(t).astype(np.int32), numpy_helper.to_array(z).astype(np.int32)
    if t.data_type == TensorProto.UINT8:  # uint8 container: the same codes shifted by 128
        q, zp = q - 128, zp - 128
    return t.data_type, q, zp


@pytest.mark.parametrize("rounding", ["nearest", "floor", "ceil", "stochastic"])
def test_onnx_integer_weights_equal_safetensors_for_every_bit_width(rounding, tmp_path):
    for bits in range(2, 9):
        art = qpipe.calibrate("digits-cnn", "digits", "w8a8", tmp_path / f"b{bits}", progress=False,
                              overrides=[f"weights.bits={bits}", f"weights.rounding={rounding}",
                                         "calibration.images=64"])
        (path,) = qpipe.export(art, "qdq", weight_layout="portable")   # the uint8 container on every CPU
        model = onnx.load(str(path))
        ints = load_file(str(art.file("quantized.safetensors")))
        q = json.loads(art.file("qparams.json").read_text())
        weights = [k for k, v in q["tensors"].items() if v["kind"] == "weight"]
        assert len(weights) == 10
        dtypes = set()
        for name in weights:
            dtype, codes, zp = _codes(model, name)
            dtypes.add(dtype)
            np.testing.assert_array_equal(codes, ints[f"{name}_int"].astype(np.int32), err_msg=f"{bits} {name}")
            np.testing.assert_array_equal(zp, np.asarray(q["tensors"][name]["zero_point"]))
            assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        if bits <= 4:
            assert TensorProto.INT4 in dtypes  # conv weights stored as ONNX INT4 at opset 21
        if bits == 8 and rounding == "nearest":
            assert TensorProto.UINT8 in dtypes  # full-range 8-bit weights take the exact u8 x u8 kernel


def test_rounding_modes_differ_where_they_should(tmp_path):
    codes = {}
    for mode in ["nearest", "floor", "ceil"]:
        art = qpipe.calibrate("digits-cnn", "digits", "w4a32", tmp_path / mode, progress=False,
                              overrides=[f"weights.rounding={mode}", "weights.granularity=per_tensor"])
        codes[mode] = load_file(str(art.file("quantized.safetensors")))["conv1.weight_int"].astype(int)
    assert (codes["floor"] <= codes["nearest"]).all() and (codes["ceil"] >= codes["nearest"]).all()
    assert (codes["ceil"] - codes["floor"]).max() == 1 and (codes["floor"] != codes["ceil"]).any()
