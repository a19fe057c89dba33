"""Export reads only the record and the integers: an artifact written by hand (no calibration, no PyTorch model)
exports to a QDQ graph that onnxruntime runs, with the integers and scales it was given."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from qpipe.artifact import Artifact
from qpipe.export import export
from qpipe.onnx_names import MARK, MARK_DOMAIN
from qpipe.recipe import dump_recipe, load_recipe
from qpipe.record import (
    BIAS_INT,
    WEIGHT_INT,
    Encoding,
    IntGraph,
    LayerRecord,
    QuantRecord,
    TensorKind,
    state_key,
)

S_X, S_OUT = 1 / 64, 1 / 16
RNG = np.random.default_rng(0)
W_INT = RNG.integers(-127, 128, size=(3, 2, 3, 3)).astype(np.int8)
S_W = (0.011, 0.007, 0.019)
B_INT = RNG.integers(-2000, 2000, size=3).astype(np.int32)
S_B = tuple(float(np.float32(S_X) * np.float32(s)) for s in S_W)


def mark(x: str, y: str, name: str) -> onnx.NodeProto:
    """A qpipe.mark::Mark node, as the TorchScript exporter writes one (its attribute ``name`` is the tensor's)."""
    node = helper.make_node(MARK, [x], [y], domain=MARK_DOMAIN)
    node.attribute.append(helper.make_attribute("name", name))
    return node


def hand_made_artifact(folder) -> Artifact:
    """input -> Mark(aq_x) -> Conv(Mark(conv.weight), Mark(conv.bias)) -> Relu -> Mark(aq_relu) -> output."""
    folder.mkdir()
    nodes = [mark("input", "x", "aq_x"), mark("conv.weight", "w", "conv.weight"), mark("conv.bias", "b", "conv.bias"),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), mark("r", "logits", "aq_relu")]
    w_float = W_INT.astype(np.float32) * np.asarray(S_W, np.float32).reshape(-1, 1, 1, 1)
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 5, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 5, 5])],
        [numpy_helper.from_array(w_float, "conv.weight"),
         numpy_helper.from_array((B_INT * np.asarray(S_B)).astype(np.float32), "conv.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(MARK_DOMAIN, 1)])
    model.ir_version = 10
    onnx.save(model, str(folder / "graph.onnx"))
    act = lambda s: Encoding(TensorKind.ACTIVATION, 8, signed=False, symmetric=True, axis=None, scale=s, zero_point=0)
    record = QuantRecord(
        input_shape=(2, 5, 5), output_quantizer="aq_relu",
        tensors={"aq_x": act(S_X),
                 "conv.weight": Encoding(TensorKind.WEIGHT, 8, True, True, 0, S_W, (0, 0, 0), "nearest", "absmax",
                                         (3, 2, 3, 3)),
                 "conv.bias": Encoding(TensorKind.BIAS, 32, True, True, 0, S_B, 0, "nearest"),
                 "aq_relu": act(S_OUT)},
        layers={"conv": LayerRecord("Conv", "aq_x")}, int_graph=IntGraph(False, "written by hand"))
    (folder / "qparams.json").write_text(json.dumps(record.to_json()))
    save_file({state_key("conv", WEIGHT_INT): W_INT, state_key("conv", BIAS_INT): B_INT},
              str(folder / "quantized.safetensors"))
    (folder / "recipe.yaml").write_text(dump_recipe(load_recipe("w8a8")))
    (folder / "manifest.json").write_text(json.dumps({"recipe": "hand-made", "files": {}}))
    return Artifact(folder)


def reference(x: np.ndarray) -> np.ndarray:
    """The same quantized conv in float64: QuantizeLinear rounds half to even (np.rint)."""
    xq = np.clip(np.rint(x / np.float32(S_X)), 0, 255) * np.float32(S_X)
    w = W_INT.astype(np.float64) * np.asarray(S_W, np.float32).astype(np.float64).reshape(-1, 1, 1, 1)
    b = B_INT * np.asarray(S_B, np.float32).astype(np.float64)
    y = F.conv2d(torch.from_numpy(xq.astype(np.float64)), torch.from_numpy(w), torch.from_numpy(b), padding=1)
    y = np.maximum(y.numpy(), 0)
    return np.clip(np.rint(y / np.float32(S_OUT)), 0, 255) * np.float32(S_OUT)


def test_a_hand_made_record_exports_and_runs_in_onnxruntime(tmp_path):
    art = hand_made_artifact(tmp_path / "hand")
    (path,) = export(art, "qdq")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4 and "Conv" in ops
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    codes = inits["conv.weight_quantized"].astype(np.int16) - inits["conv.weight_zero_point"].reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(codes, W_INT)   # the integers it was given (in whatever container)
    np.testing.assert_array_equal(inits["conv.bias_quantized"], B_INT)
    np.testing.assert_array_equal(inits["conv.weight_scale"], np.asarray(S_W, np.float32))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = RNG.uniform(-1, 3, size=(4, 2, 5, 5)).astype(np.float32)
    got = sess.run(None, {"input": x})[0]
    want = reference(x)
    steps = np.abs(got - want) / S_OUT
    # float32 sums in onnxruntime against float64 here: a value on a rounding tie may land one step away
    assert steps.max() <= 1 and (steps == 0).mean() >= 0.99
    assert (got > 0).mean() > 0.2   # the test data reaches the grid, not only the ReLU's zero


def test_a_record_of_an_unknown_format_is_one_line(tmp_path, capsys):
    art = hand_made_artifact(tmp_path / "hand")
    q = json.loads(art.file("qparams.json").read_text())
    q["format"] = 99
    art.file("qparams.json").write_text(json.dumps(q))
    code, _, err = run_cli(capsys, "export", str(art.path))
    assert_one_line_error(code, err, "qparams.json", "format 99")


@pytest.mark.parametrize("key", ["tensors", "input_shape"], ids=["no-tensors", "no-input-shape"])
def test_a_record_missing_a_field_is_one_line(tmp_path, capsys, key):
    art = hand_made_artifact(tmp_path / "hand")
    q = json.loads(art.file("qparams.json").read_text())
    del q[key]
    art.file("qparams.json").write_text(json.dumps(q))
    code, _, err = run_cli(capsys, "export", str(art.path))
    assert_one_line_error(code, err, "qparams.json", "not a valid quantization record")
