"""The parity reference for onnxruntime's optimised session: the Q-model with the fused kernels' arithmetic
(qpipe.pipeline.ortexact), checked against onnxruntime itself, kernel by kernel and on whole models."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qpipe
from qpipe.pipeline.ortexact import FusedAdd, FusedGlobalAvgPool, Grid8
from qpipe.pipeline.qmodel import ActQuant
from qpipe.pipeline.quant import QuantSpec
from qpipe.runtime.evaluate import evaluate

OPSET = 21


def _grid(scale: float, zp: int) -> Grid8:
    aq = ActQuant(QuantSpec(bits=8, signed=False, symmetric=False))
    aq.scale, aq.zero_point = torch.tensor(scale, dtype=torch.float32), torch.tensor(zp, dtype=torch.int32)
    return Grid8(aq)


def _session(nodes, inits, inputs, output):
    g = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL   # the fused kernels
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qdq_params(name, scale, zp):
    return [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
            numpy_helper.from_array(np.array(zp, np.uint8), f"{name}_z")]


@pytest.mark.parametrize("seed", range(4))
def test_fused_add_equals_onnxruntimes_qlinearadd_bit_for_bit(seed):
    """DQ, DQ -> Add -> Q fuses into QLinearAdd, whose float steps (scale ratios, an FMA per input) are not
    dequantize-add-quantize; 100 000 random uint8 pairs at random scales land on the same codes."""
    rng = np.random.default_rng(seed)
    sa, sb = rng.uniform(0.005, 0.2, 2)
    za, zb = (int(z) for z in rng.integers(0, 256, 2))
    sc = (sa + sb) * rng.uniform(0.8, 1.2)   # an output grid that the sums fill, as calibration would choose
    zc = int(np.clip(round((za * sa + zb * sb) / sc), 0, 255))
    a = rng.integers(0, 256, (1, 100_000)).astype(np.uint8)
    b = rng.integers(0, 256, (1, 100_000)).astype(np.uint8)
    nodes = [helper.make_node("DequantizeLinear", ["a", "a_s", "a_z"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "b_s", "b_z"], ["bf"]),
             helper.make_node("Add", ["af", "bf"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "c_s", "c_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "c_s", "c_z"], ["out"])]
    inits = _qdq_params("a", sa, za) + _qdq_params("b", sb, zb) + _qdq_params("c", sc, zc)
    inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, [1, 100_000]) for n in ("a", "b")]
    sess = _session(nodes, inits, inputs, "out")
    ort_out = sess.run(None, {"a": a, "b": b})[0]
    ga, gb, gc = _grid(sa, za), _grid(sb, zb), _grid(sc, zc)
    xa, xb = ga.values(torch.tensor(a, dtype=torch.float64) - za), gb.values(torch.tensor(b, dtype=torch.float64) - zb)
    ours = FusedAdd(ga, gb, gc)(xa, xb).numpy()
    np.testing.assert_array_equal(ours, ort_out)
    assert 0.5 < np.mean((ort_out > ort_out.min()) & (ort_out < ort_out.max()))   # most sums inside the grid


def test_fused_global_average_pool_equals_onnxruntime():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 16, 7, 7)).astype(np.uint8)
    sx, zx, sy, zy = 0.031, 7, 0.0123, 3
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf"]),
             helper.make_node("GlobalAveragePool", ["xf"], ["p"]),
             helper.make_node("QuantizeLinear", ["p", "y_s", "y_z"], ["pq"]),
             helper.make_node("DequantizeLinear", ["pq", "y_s", "y_z"], ["out"])]
    sess = _session(nodes, _qdq_params("x", sx, zx) + _qdq_params("y", sy, zy),
                    [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))], "out")
    gx, gy = _grid(sx, zx), _grid(sy, zy)
    ours = FusedGlobalAvgPool(gx, gy)(gx.values(torch.tensor(x, dtype=torch.float64) - zx)).numpy()
    np.testing.assert_array_equal(ours, sess.run(None, {"x": x})[0])


def test_demo_cnn_optimised_session_equals_the_fused_arithmetic_exactly(artifacts, cnn_w8a8, tmp_path):
    art = artifacts.copy(cnn_w8a8, tmp_path / "a")
    qpipe.export(art, "qdq")
    m = evaluate(art, progress=False, latency=False)
    assert m["parity_optimized"]["max_abs_diff_steps"] == 0
    assert "fused groups" in m["parity_optimized"]["reference"]
    n_groups = int(m["parity_optimized"]["reference"].split("(")[1].split()[0])
    ops = [n.op_type for n in onnx.load(str(art / "model.qdq.onnx")).graph.node]
    # every Conv, Gemm and residual Add of the demo CNN is a fused group (and its global average pool)
    assert n_groups == ops.count("Conv") + ops.count("Gemm") + ops.count("Add") + ops.count("GlobalAveragePool")


def test_check_allows_the_validation_session_the_float_noise_onnxruntime_itself_shows(
        artifacts, cnn_w8a8_64_qdq, tmp_path):
    """The validation session's ceiling is 2 steps plus the distance between onnxruntime's own two sessions;
    the optimised session's stays 2."""
    import json

    from qpipe.artifact import Artifact
    from qpipe.runtime.check import check

    art = Artifact(artifacts.copy(cnn_w8a8_64_qdq, tmp_path / "a"))
    m = evaluate(art.path, progress=False, latency=False)
    assert m["ort_optimized_vs_validation"]["max_abs_diff_steps"] is not None

    def verdict(val_steps, ort_steps, opt_steps):
        m["parity"]["max_abs_diff_steps"] = val_steps
        m["parity_optimized"]["max_abs_diff_steps"] = opt_steps
        m["ort_optimized_vs_validation"]["max_abs_diff_steps"] = ort_steps
        art.add_file("metrics-ort-qdq.json", json.dumps(m))
        return {r.name.split(" <=")[0]: r.ok for r in check(art) if "max_abs_diff_steps" in r.name}

    assert verdict(6, 4, 0) == {"parity.max_abs_diff_steps": True, "parity_optimized.max_abs_diff_steps": True}
    assert verdict(7, 4, 0)["parity.max_abs_diff_steps"] is False
    assert verdict(2, 0, 0)["parity.max_abs_diff_steps"] is True
    assert verdict(3, 0, 0)["parity.max_abs_diff_steps"] is False
    assert verdict(1, 4, 3)["parity_optimized.max_abs_diff_steps"] is False
