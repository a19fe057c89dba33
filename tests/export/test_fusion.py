"""The QDQ export of ResNet18 fuses in onnxruntime and is small on disk.

ResNet18 (random weights, BN default statistics) is calibrated on 16 synthetic images once per recipe
(the session's shared artifacts) and exported; the W8A8 QDQ file is loaded with every graph optimisation on, and the
optimised graph onnxruntime saves must run every Conv and every residual Add as a fused integer kernel.
"""

from __future__ import annotations

import collections

import onnx
import pytest

from qpipe.runtime.session import make_session

DATA = "synthetic:3x224x224:16"
OVERRIDES = ["calibration.images=16", "calibration.batch_size=8"]
RESNET18_CONVS = 20  # 17 in the stem and the blocks, 3 downsample 1x1
RESNET18_ADDS = 8    # one residual Add per BasicBlock


@pytest.fixture(scope="module")
def w8a8(artifacts):
    return artifacts.get("resnet18", DATA, "w8a8", *OVERRIDES, export="all")


@pytest.fixture(scope="module")
def w4a32(artifacts):
    return artifacts.get("resnet18", DATA, "w4a32", *OVERRIDES, export="all")


def test_w8a8_resnet18_fuses_every_conv_and_add(w8a8, tmp_path):
    opt = tmp_path / "opt.onnx"
    make_session(w8a8.file("model.qdq.onnx"), optimized=True, optimized_model_path=opt)
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(opt)).graph.node)
    assert ops[("com.microsoft", "QLinearConv")] == RESNET18_CONVS, ops
    assert ops[("com.microsoft", "QLinearAdd")] == RESNET18_ADDS, ops
    float_left = {k: v for k, v in ops.items() if k[1] in ("Conv", "Add", "FusedConv")}
    assert not float_left, f"float Conv/Add left in the optimised graph: {float_left}"


@pytest.mark.parametrize(("recipe", "limit"), [("w8a8", 0.27), ("w4a32", 0.15)])
def test_qdq_file_size_vs_fp32(recipe, limit, request):
    art = request.getfixturevalue(recipe)
    qdq = art.file("model.qdq.onnx").stat().st_size
    fp32 = art.file("model.fp32.onnx").stat().st_size
    assert qdq / fp32 <= limit, f"{recipe}: model.qdq.onnx is {100 * qdq / fp32:.1f}% of model.fp32.onnx"


def test_check_fails_when_onnxruntime_leaves_a_quantized_conv_float(cnn_w8a8_64_qdq):
    """Fusion is a contract: check's census passes the demo CNN (every conv a QLinearConv) and fails the same
    file when onnxruntime's QDQ fusion is switched off, naming the convs left float."""
    from qpipe.runtime.check import fusion_census

    path = cnn_w8a8_64_qdq.file("model.qdq.onnx")
    ok = fusion_census(path, activations_quantized=True)
    assert ok.ok and "9 QLinearConv" in ok.detail, ok
    off = fusion_census(path, activations_quantized=True, config={"session.disable_quant_qdq": "1"})
    assert not off.ok and off.detail.startswith("left float: /conv1/Conv"), off
