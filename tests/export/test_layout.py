"""Activation/weight containers: uint8 and int8 layouts carry the same numbers, and the parity gate catches
onnxruntime's saturating u8 x s8 kernels when full-range int8 weights are forced."""

import numpy as np
import onnx
import pytest
from helpers import ONE_STEP, QDQ_PARITY_STEPS, assert_one_line_error, run_cli
from onnx import TensorProto

import qpipe
from qpipe.data import digits
from qpipe.runtime.check import check
from qpipe.runtime.evaluate import evaluate
from qpipe.runtime.session import make_session, u8s8_exact


def test_uint8_and_int8_activation_layouts_compute_the_same_logits(artifacts, cnn_w8a8, tmp_path):
    x = digits().splits["test"][0].numpy()
    logits = {}
    for layout in ("u8", "s8"):
        copy = artifacts.copy(cnn_w8a8, tmp_path / layout)
        (path,) = qpipe.export(copy, "qdq", layout=layout)
        logits[layout] = make_session(path, optimized=False).run(None, {"input": x})[0]
    np.testing.assert_array_equal(logits["u8"], logits["s8"])


def test_parity_gate_catches_saturating_full_range_int8_weights(artifacts, cnn_w8a8, tmp_path):
    bad = artifacts.copy(cnn_w8a8, tmp_path / "bad")
    qpipe.export(bad, "qdq", weight_layout="int8")  # int8 weights up to +-127 against uint8 activations
    m = evaluate(bad, progress=False, latency=False)
    assert m["parity"]["max_abs_diff_steps"] <= ONE_STEP    # the graph as written is right ...
    failed = [r.name for r in check(bad) if not r.ok]
    if u8s8_exact():
        # ... and VNNI's u8 x s8 dot product (VPDPBUSD) sums in int32: no saturation on such CPUs
        assert m["parity_optimized"]["max_abs_diff_steps"] <= ONE_STEP and failed == []
    else:
        # ... but AVX2's VPMADDUBSW adds pairs of products in int16 with saturation: parity and the layout
        # check both fail
        assert m["parity_optimized"]["max_abs_diff_steps"] > QDQ_PARITY_STEPS
        assert failed == ["weight layout exact on this CPU", f"parity_optimized.max_abs_diff_steps <= {QDQ_PARITY_STEPS}"]

    good = artifacts.copy(cnn_w8a8, tmp_path / "good")
    qpipe.export(good, "qdq")  # auto: int8 on VNNI, else those weights go to uint8 + 128 (exact u8 x u8 kernel)
    m = evaluate(good, progress=False, latency=False)
    assert m["parity_optimized"]["max_abs_diff_steps"] <= ONE_STEP
    assert all(r.ok for r in check(good))


def _weight_dtypes(path) -> set[int]:
    m = onnx.load(str(path))
    return {t.data_type for t in m.graph.initializer if t.name.endswith(".weight_quantized")}


@pytest.mark.parametrize("vnni", [True, False])
def test_auto_weight_layout_follows_the_cpu_and_check_refuses_int8_files_where_they_saturate(
        artifacts, cnn_w8a8, tmp_path, monkeypatch, vnni):
    """auto = int8 weights (the u8 x s8 kernel, twice as fast on VNNI) where the CPU sums int8 dot products in
    int32, uint8 + 128 for the wide ones elsewhere; an int8 file checked on a CPU without VNNI fails by name."""
    from qpipe.runtime import session

    flags = frozenset({"avx2", "avx512_vnni"} if vnni else {"avx2", "avx512f"})
    monkeypatch.setattr(session, "cpu_flags", lambda: flags)
    art = artifacts.copy(cnn_w8a8, tmp_path / "auto")
    (path,) = qpipe.export(art, "qdq")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["qpipe.weight_layout"] == ("int8" if vnni else "portable")
    assert (TensorProto.UINT8 in _weight_dtypes(path)) == (not vnni)
    res = {r.name: r for r in check(art)}["weight layout exact on this CPU"]
    assert res.ok

    # the same int8 file, checked on the other kind of CPU
    forced = artifacts.copy(cnn_w8a8, tmp_path / "int8")
    qpipe.export(forced, "qdq", weight_layout="int8")
    assert _weight_dtypes(forced / "model.qdq.onnx") == {TensorProto.INT8}
    res = {r.name: r for r in check(forced)}["weight layout exact on this CPU"]
    assert res.ok == vnni
    if not vnni:
        assert "--weight-layout portable" in res.detail and "saturate" in res.detail


def test_export_cli_rejects_an_unknown_weight_layout(artifacts, cnn_w8a8, tmp_path, capsys):
    art = artifacts.copy(cnn_w8a8, tmp_path / "a")
    code, _, err = run_cli(capsys, "export", str(art), "--weight-layout", "fast")
    assert_one_line_error(code, err, "--weight-layout")


def test_activations_below_8_bits_clip_to_their_grid_in_onnx(tmp_path):
    art = qpipe.calibrate("digits-cnn", "digits", "w8a8", tmp_path / "a4", progress=False,
                          overrides=["activations.bits=4", "calibration.images=128"])
    (path,) = qpipe.export(art, "qdq")
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Clip") == ops.count("QuantizeLinear")  # every 4-bit activation is clipped to 16 levels
    m = evaluate(art.path, progress=False, latency=False)
    assert m["parity"]["max_abs_diff_steps"] <= ONE_STEP and m["parity_optimized"]["max_abs_diff_steps"] <= ONE_STEP
    assert m["accuracy"]["top1"] >= 0.95
