"""The parity reference for onnxruntime's optimised session: the Q-model with the fused kernels' arithmetic
(qpipe.pipeline.ortexact), checked against onnxruntime itself, kernel by kernel and on whole models."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qpipe
from qpipe.pipeline.ortexact import FusedAdd, FusedGlobalAvgPool, FusedLayer, Grid8
from qpipe.pipeline.qmodel import ActQuant
from qpipe.pipeline.quant import QuantSpec
from qpipe.reference import ortkernels as ref
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
    codes = ref.qlinear_add(a, sa, za, b, sb, zb, sc, zc)      # the NumPy reference, in uint8 codes
    np.testing.assert_array_equal((codes - zc).astype(np.float32) * np.float32(sc), ort_out)
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
    ort_out = sess.run(None, {"x": x})[0]
    np.testing.assert_array_equal(ours, ort_out)
    codes = ref.qlinear_global_avg_pool(x, sx, zx, sy, zy)
    np.testing.assert_array_equal((codes - zy).astype(np.float32) * np.float32(sy), ort_out)


@pytest.mark.parametrize("groups", [1, 8])
def test_fused_conv_equals_onnxruntimes_qlinearconv_bit_for_bit(groups):
    """DQ(x), DQ(w per channel), DQ(int32 bias) -> Conv -> Q fuses into QLinearConv (a depthwise kernel for
    groups = channels): the exact accumulator requantized at f32(f32(s_x s_w) / s_y); padding reads x's zero
    point. The NumPy reference, FusedLayer and onnxruntime agree on every code."""
    from qpipe.pipeline.qmodel import QConv2d

    rng = np.random.default_rng(groups)
    cin, cout, k = 8, 8, 3
    x = rng.integers(0, 256, (4, cin, 9, 9)).astype(np.uint8)
    w = rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(np.int8)
    sx, zx, sy, zy = 0.02, 11, 0.05, 128
    sw = rng.uniform(0.001, 0.01, cout).astype(np.float32)
    b = rng.integers(-3000, 3000, cout).astype(np.int32)
    bs = (np.float32(sx) * sw).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "w_s", "w_z"], ["wf"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "b_s", "b_z"], ["bf"], axis=0),
             helper.make_node("Conv", ["xf", "wf", "bf"], ["y"], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("QuantizeLinear", ["y", "y_s", "y_z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_s", "y_z"], ["out"])]
    inits = _qdq_params("x", sx, zx) + _qdq_params("y", sy, zy) + [
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(sw, "w_s"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "w_z"), numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(bs, "b_s"), numpy_helper.from_array(np.zeros(cout, np.int32), "b_z")]
    sess = _session(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))], "out")
    ort_out = sess.run(None, {"x": x})[0]

    layer = QConv2d(cin, cout, k, padding=1, groups=groups)
    layer._init_qbuffers()
    layer.weight_int, layer.weight_scale = torch.tensor(w), torch.tensor(sw)
    layer.weight_zero_point, layer.bias_int = torch.zeros(cout, dtype=torch.int32), torch.tensor(b)
    gx, gy = _grid(sx, zx), _grid(sy, zy)
    ours = FusedLayer(layer, gx, gy)(gx.values(torch.tensor(x, dtype=torch.float64) - zx)).numpy()
    np.testing.assert_array_equal(ours, ort_out)

    acc = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64) - zx, torch.tensor(w, dtype=torch.float64),
                                     torch.tensor(b, dtype=torch.float64), padding=1, groups=groups).numpy()
    codes = ref.requantize(acc.astype(np.int64), ref.requant_multiplier(sx, sw, sy)[:, None, None], zy)
    np.testing.assert_array_equal((codes - zy).astype(np.float32) * np.float32(sy), ort_out)
    inside = (codes > 0) & (codes < 255)
    assert 0.5 < np.mean(inside)   # most outputs inside the grid
    exact = acc * (sx * sw.astype(np.float64))[:, None, None] / sy   # the real-valued output, in output steps
    assert np.abs((codes - zy) - exact)[inside].max() <= 0.5 + 1e-4    # the reference rounds it to nearest


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

    def gate(field, val, opt, ort, float_layers=0):
        """check's verdicts on ``field`` of both sessions, with the session numbers set to these."""
        m["parity"][field], m["parity_optimized"][field], m["ort_optimized_vs_validation"][field] = val, opt, ort
        m["parity_optimized"]["float_layers"] = float_layers
        art.add_file("metrics-ort-qdq.json", json.dumps(m))
        return {r.name.split(" ")[0]: r.ok for r in check(art) if f".{field} " in r.name}

    def verdict(val_steps, ort_steps, opt_steps, float_layers=0):
        return gate("max_abs_diff_steps", val_steps, opt_steps, ort_steps, float_layers)

    assert verdict(6, 4, 0) == {"parity.max_abs_diff_steps": True, "parity_optimized.max_abs_diff_steps": True}
    assert verdict(7, 4, 0)["parity.max_abs_diff_steps"] is False
    assert verdict(2, 0, 0)["parity.max_abs_diff_steps"] is True
    assert verdict(3, 0, 0)["parity.max_abs_diff_steps"] is False
    assert verdict(1, 4, 3)["parity_optimized.max_abs_diff_steps"] is False
    # INT4 weights: onnxruntime runs those convs float in the optimised session too, which then gets the same room
    assert verdict(1, 4, 6, float_layers=3)["parity_optimized.max_abs_diff_steps"] is True

    def agreement(val, opt, ort, float_layers=0):
        return gate("top1_agreement", val, opt, ort, float_layers)

    # near-tied logits: onnxruntime agrees with itself on 97.5 %; the validation session may be one point below
    assert agreement(0.97, 1.0, 0.975) == {"parity.top1_agreement": True, "parity_optimized.top1_agreement": True}
    assert agreement(0.96, 1.0, 0.975)["parity.top1_agreement"] is False
    assert agreement(0.97, 0.97, 0.975)["parity_optimized.top1_agreement"] is False   # fused: 99.5 % floor
    assert agreement(0.97, 0.97, 0.975, float_layers=3)["parity_optimized.top1_agreement"] is True
