"""Activation/weight containers: uint8 and int8 layouts carry the same numbers, and the parity gate catches
onnxruntime's saturating u8 x s8 kernels when full-range int8 weights are forced."""

import numpy as np
from helpers import ONE_STEP, QDQ_PARITY_STEPS

import qpipe
from qpipe.data import digits
from qpipe.runtime.check import check
from qpipe.runtime.evaluate import evaluate
from qpipe.runtime.session import make_session


def test_uint8_and_int8_activation_layouts_compute_the_same_logits(artifacts, cnn_w8a8, tmp_path):
    x = digits().splits["test"][0].numpy()
    logits = {}
    for layout in ("u8", "s8"):
        copy = artifacts.copy(cnn_w8a8, tmp_path / layout)
        (path,) = qpipe.export(copy, "qdq", layout=layout)
        logits[layout] = make_session(path, optimized=False).run(None, {"input": x})[0]
    np.testing.assert_array_equal(logits["u8"], logits["s8"])


def _cpu_has_vnni() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def test_parity_gate_catches_saturating_full_range_int8_weights(artifacts, cnn_w8a8, tmp_path):
    bad = artifacts.copy(cnn_w8a8, tmp_path / "bad")
    qpipe.export(bad, "qdq", weight_layout="int8")  # int8 weights up to +-127 against uint8 activations
    m = evaluate(bad, progress=False, latency=False)
    assert m["parity"]["max_abs_diff_steps"] <= ONE_STEP    # the graph as written is right ...
    failed = [r.name for r in check(bad) if not r.ok]
    if _cpu_has_vnni():
        # ... and VNNI's u8 x s8 dot product (VPDPBUSD) sums in int32: no saturation on such CPUs
        assert m["parity_optimized"]["max_abs_diff_steps"] <= ONE_STEP and failed == []
    else:
        # ... but AVX2's VPMADDUBSW adds pairs of products in int16 with saturation
        assert m["parity_optimized"]["max_abs_diff_steps"] > QDQ_PARITY_STEPS
        assert failed == [f"parity_optimized.max_abs_diff_steps <= {QDQ_PARITY_STEPS}"]

    good = artifacts.copy(cnn_w8a8, tmp_path / "good")
    qpipe.export(good, "qdq")  # auto: those weights go to uint8 + 128 and the exact u8 x u8 kernel
    m = evaluate(good, progress=False, latency=False)
    assert m["parity_optimized"]["max_abs_diff_steps"] <= ONE_STEP
    assert all(r.ok for r in check(good))


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
