"""AdderQuant: the lossless weight clamp, grouping, the quantized adder layer against its NumPy reference, the
ai.qpipe adder functions in onnxruntime and onnx.reference, and the digits / resnet20 AdderNets through
calibrate -> export (QDQ and integer-only) -> onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ONE_POINT, PARITY_TOP1, digits_test_split, write_cifar
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import qpipe
from qpipe.errors import QpipeError
from qpipe.export import intops as X
from qpipe.pipeline.calibrate import load_int_model, load_quantized
from qpipe.pipeline.qmodel import QAdder2d
from qpipe.recipe import load_recipe
from qpipe.reference import adder as R

RNG = np.random.default_rng(1)
CLAMP_RTOL = 1e-5       # equal in exact arithmetic; float64 sums in a different grouping (the docstring's bound)
SCALE_RTOL = 1e-6       # group scales and clamp biases are float32
FLOAT_OP_RTOL, FLOAT_OP_ATOL = 1e-5, 1e-4  # the float Adder2d function runs in float32, the reference in float64
DIGITS_ADDER_FP32_TOP1 = 0.9844  # the shipped digits-adder checkpoint in FP32
NAIVE_MARGIN = 0.05     # grouped AdderQuant scales against one shared scale: a clear gap, not noise


def test_lossless_clamp_leaves_the_float_output_unchanged():
    """Weights beyond the activation range r: clipping them to +-r plus the bias -sum max(|w| - r, 0) gives the
    same -sum |x - w| for every input in [0, r] (to 1e-5 relative)."""
    r = 0.8
    x = RNG.uniform(0, r, (3, 4, 6, 6))
    w = RNG.normal(0, 1.0, (5, 4, 3, 3))
    assert (np.abs(w) > r).mean() > 0.3
    ids = np.zeros(5, dtype=np.int64)
    s = np.array([r], dtype=np.float32)
    bias = -np.maximum(np.abs(w) - r, 0).reshape(5, -1).sum(1)
    clipped = R.adder2d(x, np.clip(w, -r, r), 1, 1)
    # zero padding: a padded 0 lies in [0, r] too
    np.testing.assert_allclose(clipped + bias.reshape(1, -1, 1, 1), R.adder2d(x, w, 1, 1), rtol=CLAMP_RTOL)
    _, b = R.weight_codes(w, ids, s, 8)
    np.testing.assert_allclose(b, bias, rtol=SCALE_RTOL)


def test_group_scales_and_kmeans():
    wmax = np.array([0.1, 0.11, 0.12, 0.5, 0.52, 1.0, 1.05, 3.0])
    w = wmax.reshape(-1, 1, 1, 1) * np.ones((1, 2, 3, 3))
    ids = R.kmeans_1d(wmax, 4, seed=0)
    assert ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]          # ascending centres, no empty group
    ids, s = R.group_scales(w, r=1.02, groups=4, seed=0)
    np.testing.assert_allclose(s, [0.12, 0.52, 1.02, 1.02], rtol=SCALE_RTOL)   # min(max |w| of the group, r)
    ids, s = R.group_scales(w, r=1.02, groups=4, method="naive")
    assert ids.tolist() == [0] * 8 and s.tolist() == [np.float32(3.0)]  # one scale covering both ranges
    assert R.kmeans_1d(np.array([0.5, 0.5, 0.5]), 4).tolist() == [0, 0, 0]


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantized_adder_equals_reference(bits):
    torch.manual_seed(0)
    m = QAdder2d(6, 7, 3, 2, 1)
    m._init_qbuffers(99.94)
    w = m.weight.detach().numpy()
    ids, s = R.group_scales(w, r=0.7 * np.abs(w).max(), groups=3, seed=2)
    codes, bias = R.weight_codes(w, ids, s, bits)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1 and (bias < 0).any()
    m.weight_int, m.group = torch.as_tensor(codes, dtype=torch.int8), torch.as_tensor(ids)
    m.group_scale, m.clamp_bias = torch.as_tensor(s), torch.as_tensor(bias)
    m.bits = torch.tensor(bits)
    x = np.abs(RNG.normal(0, 1, (2, 6, 9, 9))).astype(np.float32)
    want = R.quantized_adder(x, codes, ids, s, bias, bits, 2, 1)
    got = m(torch.tensor(x)).detach().numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize(("n", "c", "h", "o", "k", "s", "p"), [(2, 3, 7, 4, 3, 1, 1), (3, 2, 9, 5, 3, 2, 1),
                                                               (2, 4, 6, 3, 1, 2, 0)])
def test_onnx_adder_functions(integer, n, c, h, o, k, s, p):
    """ai.qpipe Adder2d (float) and AdderInteger (exact) in onnxruntime and onnx.reference against NumPy."""
    inits = []
    if integer:
        x = RNG.integers(0, 256, (n, c, h, h)).astype(np.uint8)
        w = RNG.integers(-128, 128, (o, c, k, k)).astype(np.int8)
        op_type, tx, ty, inputs = "AdderInteger", TensorProto.UINT8, TensorProto.INT32, ["x", "w", "two"]
        inits = [numpy_helper.from_array(np.array(2, dtype=np.int32), "two")]
        wv = 2 * w.astype(np.int64)      # weight codes at twice the activation step
    else:
        x = RNG.normal(size=(n, c, h, h)).astype(np.float32)
        w = RNG.normal(size=(o, c, k, k)).astype(np.float32)
        op_type, tx, ty, inputs = "Adder2d", TensorProto.FLOAT, TensorProto.FLOAT, ["x", "w"]
        wv = w.astype(np.float64)
    node = helper.make_node(op_type, inputs, ["y"], domain=X.DOMAIN, strides=[s, s], pads=[p] * 4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", tx, x.shape)],
                          [helper.make_tensor_value_info("y", ty, [None] * 4)],
                          [numpy_helper.from_array(w, "w"), *inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", X.ONNX_OPSET), *X.opset_imports()],
                          ir_version=10, functions=X.function_protos(X.ONNX_OPSET, {op_type}))
    onnx.checker.check_model(m, full_check=True)
    want = R.adder2d(x.astype(np.int64 if integer else np.float64), wv, s, p)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    if integer:
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ref, want)
    else:
        np.testing.assert_allclose(got, want, rtol=FLOAT_OP_RTOL, atol=FLOAT_OP_ATOL)
        np.testing.assert_allclose(ref, want, rtol=FLOAT_OP_RTOL, atol=FLOAT_OP_ATOL)


@pytest.fixture(scope="module")
def digits_w4(tmp_path_factory):
    root = tmp_path_factory.mktemp("adder")
    arts = {}
    for recipe in ("adderquant-w4", "adder-naive-w4"):
        arts[recipe] = qpipe.calibrate("digits-adder", "digits", recipe, root / recipe, progress=False)
        qpipe.export(arts[recipe], "all")
    return arts


def test_adderquant_record(digits_w4):
    art = digits_w4["adderquant-w4"]
    adders = art.qparams["adders"]
    assert len(adders) == 8 and art.qparams["int_graph"]["available"]
    for rec in adders.values():
        assert 1 <= len(rec["groups"]) <= 4 and rec["bits"] == 4 and rec["range"] > 0
        assert all(g["scale"] <= rec["range"] * (1 + SCALE_RTOL) for g in rec["groups"])
    assert len(digits_w4["adder-naive-w4"].qparams["adders"]["layer1.0.conv1"]["groups"]) == 1


def test_integer_graph_is_exact_and_accurate(digits_w4):
    """onnxruntime's integer logits equal the PyTorch integer simulation exactly on the whole test split;
    AdderQuant at 4 bits stays within a point of FP32 (98.44 %) and far above the naive shared scale."""
    x, y = digits_test_split()
    acc = {}
    for recipe, art in digits_w4.items():
        with torch.no_grad():
            want = load_int_model(art)(x).numpy()
        s = ort.InferenceSession(str(art.file("model.int.onnx")), providers=["CPUExecutionProvider"])
        got = s.run(None, {"input": x.numpy()})[0]
        np.testing.assert_array_equal(got, want)
        acc[recipe] = float((torch.tensor(got).argmax(1) == y).float().mean())
    assert acc["adderquant-w4"] >= DIGITS_ADDER_FP32_TOP1 - ONE_POINT
    assert acc["adderquant-w4"] >= acc["adder-naive-w4"] + NAIVE_MARGIN
    art = digits_w4["adderquant-w4"]
    model = onnx.load(str(art.file("model.int.onnx")))
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    groups = sum(len(r["groups"]) for r in art.qparams["adders"].values())
    assert ops.count((X.DOMAIN, "AdderInteger")) == groups and not any(op == "Adder2d" for _, op in ops)
    results = qpipe.check(digits_w4["adderquant-w4"])
    assert all(r.ok for r in results if "op set" in r.name or "integer-only" in r.name), results


def test_qdq_graph_follows_the_pytorch_model(digits_w4):
    art = digits_w4["adderquant-w4"]
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False, format="qdq")
    assert m["parity"]["top1_agreement"] >= PARITY_TOP1 and m["accuracy"]["top1"] >= 0.97
    model = onnx.load(str(art.file("model.qdq.onnx")))
    n_adder = sum(1 for nd in model.graph.node if nd.op_type == "Adder2d")
    groups = sum(len(r["groups"]) for r in art.qparams["adders"].values())
    assert n_adder == groups    # one Adder2d per group of filters
    with torch.no_grad():
        frozen = load_quantized(art)
    assert sum(isinstance(mod, QAdder2d) and mod.weight_int is not None for mod in frozen.modules()) == 8


@pytest.mark.parametrize(("over", "needle"), [(["adder.bits=9"], "adder.bits"), (["adder.groups=0"], "adder.groups"),
                                              (["adder.method=kmeans"], "adder.method"),
                                              (["adder.input_bits=4"], "adder.input_bits")])
def test_bad_adder_recipes(over, needle):
    with pytest.raises(QpipeError, match=needle):
        load_recipe("adderquant-w4", over)


def test_resnet20_adder_on_a_cifar_format_file(tmp_path):
    """resnet20-adder trains one step (SGD) on CIFAR-10 binary batches, quantizes with AdderQuant, exports QDQ and
    integer graphs, and onnxruntime's integers equal PyTorch's: the command users with CIFAR-10 run."""
    from qpipe.pipeline.train import train

    write_cifar(tmp_path / "c", n_train=(12, 4), n_test=8)
    data = f"cifar10:{tmp_path / 'c'}"
    ckpt = tmp_path / "r20a.safetensors"
    note = train("resnet20-adder", data, 1, ckpt, lr=0.1, batch_size=16, optimizer="sgd", progress=False)
    assert note["optimizer"] == "sgd" and ckpt.is_file()
    art = qpipe.calibrate("resnet20-adder", data, "adderquant-w4", tmp_path / "art", weights=str(ckpt),
                          overrides=["calibration.images=16"], progress=False)
    assert len(art.qparams["adders"]) == 20
    qpipe.export(art, "all")
    m = qpipe.evaluate(art.path, data, backend="ort", latency=False, progress=False, format="int")
    assert m["parity"]["max_abs_diff"] == 0 and m["parity_optimized"]["max_abs_diff"] == 0
