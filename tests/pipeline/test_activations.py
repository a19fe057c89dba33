"""Activations and padding as users write them (issue 14, part 2): ReLU6 / Hardtanh / clamp fold into the producer's
output range (the quantizer sits after them, unsigned where they start at 0), zero padding (nn.ZeroPad2d, F.pad)
passes values through on their grid. A MobileNetV2-style model written that way calibrates, exports and passes
check; onnxruntime fuses every conv of its QDQ graph, and its integer-only graph equals the PyTorch integer model
exactly."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpipe
from qpipe.pipeline.inspect import quantization_points
from qpipe.runtime.session import make_session


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise 3x3, 1x1 project; the activation as the user chose it."""

    def __init__(self, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        hidden = cin * 2
        self.stride, self.act, self.residual = stride, act, stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, padding=1 if stride == 1 else 0, groups=hidden, bias=False)
        self.dw_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu6 = nn.ReLU6()

    def activation(self, x):
        if self.act == "module":
            return self.relu6(x)
        if self.act == "relu6":
            return F.relu6(x)
        return torch.clamp(x, 0.0, 6.0)

    def forward(self, x):
        y = self.activation(self.expand(x))
        if self.stride == 2:
            y = F.pad(y, (0, 1, 0, 1))          # TF "SAME" padding before a stride-2 depthwise conv
        y = self.project(self.activation(self.dw_bn(self.dw(y))))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 2, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, "module"), InvertedResidual(8, 16, 2, "relu6"),
                                    InvertedResidual(16, 16, 1, "clamp"))
        self.head = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(self.stem(self.pad(x)))
        x = F.hardtanh(self.head(x), 0.0, 6.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_mobilenet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyMobileNet()
    with torch.no_grad():   # BN statistics as a trained net has them, so activations reach the ReLU6 bound
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(0.0, 2.0)
    return model.eval()


CONVS = 11   # stem, 3 x (expand, depthwise, project), head


def test_every_conv_reads_a_quantized_input_and_bounded_activations_give_unsigned_grids():
    rows = quantization_points(tiny_mobilenet(), "w8a8")
    convs = [r for r in rows if r["op"] == "conv"]
    assert len(convs) == CONVS
    assert all("float" not in r["inputs"][0] for r in convs), [(r["name"], r["inputs"]) for r in convs]
    # the expand / depthwise convs end in ReLU6 or clamp(0, 6): their quantizer is unsigned
    bounded = [r for r in convs if ".expand" in r["name"] or ".dw" in r["name"] or r["name"].startswith("stem")]
    assert bounded and all("(uint8)" in r["output"] for r in bounded), [(r["name"], r["output"]) for r in bounded]


@pytest.fixture(scope="module")
def mobilenet_w8a8(tmp_path_factory):
    out = tmp_path_factory.mktemp("mobilenet") / "w8a8"
    art = qpipe.calibrate(tiny_mobilenet(), "digits", "w8a8", out, overrides=["calibration.images=128"],
                          progress=False)
    qpipe.export(art, "all")
    return art


def test_mobilenet_style_model_passes_check_with_exact_integer_graph(mobilenet_w8a8):
    art = mobilenet_w8a8
    model = tiny_mobilenet()
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False, model=model)
    assert m["parity"]["max_abs_diff_steps"] <= 2 and m["parity"]["top1_agreement"] >= 0.995
    # the optimised session against the Q-model in onnxruntime's fused-kernel arithmetic: bit for bit, with
    # ReLU6 / hardtanh folded away, zero padding and the depthwise kernels
    assert m["parity_optimized"]["max_abs_diff_steps"] == 0
    mi = qpipe.evaluate(art.path, backend="ort", format="int", latency=False, progress=False, model=model)
    assert mi["parity"]["max_abs_diff"] == 0 and mi["parity_optimized"]["max_abs_diff"] == 0
    failed = [r for r in qpipe.check(art) if not r.ok]
    assert not failed, failed


def test_mobilenet_style_qdq_graph_fuses_every_conv(mobilenet_w8a8, tmp_path):
    opt = tmp_path / "opt.onnx"
    make_session(mobilenet_w8a8.file("model.qdq.onnx"), optimized=True, optimized_model_path=opt)
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(opt)).graph.node)
    float_left = {k: v for k, v in ops.items() if k[1] in ("Conv", "FusedConv", "Clip", "Relu")}
    assert ops[("com.microsoft", "QLinearConv")] == CONVS and not float_left, ops


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class TinyEfficientNet(nn.Module):
    """EfficientNet-Lite / MobileNetV3-style: SiLU, Hardswish, a squeeze-excite block, LeakyReLU, Hardsigmoid."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.Hardswish())
        self.se = SqueezeExcite(8)
        self.project = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.project(self.se(self.dw(self.stem(x))))
        x = F.leaky_relu(self.head(F.hardsigmoid(x)), 0.1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_efficientnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyEfficientNet().eval()


EFFNET_CONVS = 6   # stem, depthwise, SE reduce / expand, project, head


def test_elementwise_activations_and_squeeze_excite_keep_every_conv_input_quantized():
    rows = quantization_points(tiny_efficientnet(), "w8a8")
    convs = [r for r in rows if r["op"] == "conv"]
    assert len(convs) == EFFNET_CONVS
    assert all("float" not in r["inputs"][0] for r in convs), [(r["name"], r["inputs"]) for r in convs]
    ops = collections.Counter(r["op"] for r in rows)
    assert ops["activation"] == 5 and ops["mul"] == 1, ops   # SiLU, Hardswish, sigmoid, hardsigmoid, leaky_relu


def test_efficientnet_style_model_passes_check_and_says_why_it_has_no_integer_graph(tmp_path):
    art = qpipe.calibrate(tiny_efficientnet(), "digits", "w8a8", tmp_path / "art",
                          overrides=["calibration.images=128"], progress=False)
    ig = art.record.int_graph
    assert not ig.available and "no integer form yet" in ig.reason
    qpipe.export(art, "qdq")
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False, model=tiny_efficientnet())
    assert m["parity"]["max_abs_diff_steps"] <= 2 and m["parity"]["top1_agreement"] >= 0.995
    failed = [r for r in qpipe.check(art) if not r.ok]
    assert not failed, failed
    opt = tmp_path / "opt.onnx"
    make_session(art.file("model.qdq.onnx"), optimized=True, optimized_model_path=opt)
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load(str(opt)).graph.node)
    assert ops[("com.microsoft", "QLinearConv")] == EFFNET_CONVS, ops


class UnknownActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(1, 4, 3), nn.SELU(), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv2(self.act(self.conv1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))


def test_inspect_warns_about_a_layer_left_with_a_float_input_and_says_why(capsys):
    rows = quantization_points(UnknownActivation(), "w8a8")
    warned = {r["name"]: r["warning"] for r in rows if r.get("warning")}
    assert list(warned) == ["conv2"] and "act (SELU)" in warned["conv2"] and "float" in warned["conv2"]
    assert not [r for r in quantization_points(UnknownActivation(), "w4a32") if r.get("warning")]  # weights only
    from qpipe.pipeline.inspect import format_points

    assert format_points(rows).splitlines()[-1].startswith("warning: conv2 (conv) has a float input")


def test_adaround_layer_units_end_at_the_quantizer_after_a_bounded_activation():
    """A layer unit reconstructs what its output quantizer sees: conv, ReLU6 (or hardtanh), quantizer; its tail
    is the fused loss of the learning step."""
    from qpipe.kinds import Kind
    from qpipe.pipeline import adaround as ada
    from qpipe.pipeline.qmodel import ActQuant, kind_of, prepare, quantize_weights
    from qpipe.recipe import load_recipe

    r = load_recipe("w4a8-adaround")
    p = prepare(tiny_mobilenet(), r)
    quantize_weights(p, r)
    modules = dict(p.gm.named_modules())
    units = {u.name: u for u in ada.find_units(p, "layer")}
    bounded = [u for name, u in units.items() if ".expand" in name or ".dw" in name or name.startswith("stem")
               or name == "head"]
    assert len(bounded) == 8
    for u in bounded:
        assert kind_of(u.nodes[1], modules) == Kind.RELU and isinstance(modules[u.nodes[-1].target], ActQuant), u.nodes
        tail = ada._tail(p.gm, u)
        assert tail is not None and tail.hi == 6.0 and tail.lo == 0.0
