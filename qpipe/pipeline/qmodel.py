"""The quantized model: Q-modules, quantization points found on the traced graph, calibration and freezing.

Quantization points (onnxruntime's QDQ layout, so every Conv/Gemm/Add fuses into an integer kernel):
the model input; the output of every Conv/Linear, residual add and average pool, taken after a following
(BatchNorm and) ReLU; and after pass-through ops (max-pool, flatten) the same quantizer again.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpipe.errors import QpipeError
from qpipe.recipe import FLOAT_BITS, Recipe

from .fold import fold_batchnorm, trace
from .observers import ActivationObserver, estimate
from .quant import QuantSpec, dequantize, fake_quantize, fake_quantize_ste, lsq_fake_quantize, quantize

MARK_DOMAIN = "qpipe.mark"


class Mark(torch.autograd.Function):
    """Identity that the TorchScript ONNX exporter writes as a ``qpipe.mark::Mark(name=...)`` node, so the
    QDQ exporter can find each quantized tensor in the float graph by name."""

    @staticmethod
    def forward(ctx, x, name):
        return x

    @staticmethod
    def symbolic(g, x, name):
        out = g.op(f"{MARK_DOMAIN}::Mark", x, name_s=name)
        out.setType(x.type())
        return out


_STATE = {"mode": "quant"}   # float | observe | quant | mark


@contextlib.contextmanager
def mode(m: str):
    prev = _STATE["mode"]
    _STATE["mode"] = m
    try:
        yield
    finally:
        _STATE["mode"] = prev


class _QWeightMixin:
    """Integer weights (int8 container), per-channel or per-tensor scale, and an int32 bias."""

    def _init_qbuffers(self):
        self.register_buffer("weight_int", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("bias_int", None)
        self.register_buffer("bias_scale", None)
        self.qname = ""

    def qweight(self) -> torch.Tensor:
        # mark mode writes the float graph: float weights, marked where integers replace them on export
        if self.weight_int is None or _STATE["mode"] in ("float", "observe"):
            return self.weight
        if _STATE["mode"] == "mark":
            return Mark.apply(self.weight, f"{self.qname}.weight")
        ada = self.__dict__.get("ada")  # AdaRound: soft weights while the rounding is learned
        if ada is not None:
            return ada.soft()
        return dequantize(self.weight_int, self.weight_scale, self.weight_zero_point, 0)

    def qbias(self) -> torch.Tensor | None:
        if self.bias_int is None or _STATE["mode"] in ("float", "observe"):
            return self.bias
        if _STATE["mode"] == "mark":
            return Mark.apply(self.bias, f"{self.qname}.bias")
        return self.bias_int.float() * self.bias_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in ("weight_int", "weight_scale", "weight_zero_point", "bias_int", "bias_scale"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QConv2d(_QWeightMixin, nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.qweight(), self.qbias(), self.stride, self.padding, self.dilation, self.groups)


class QLinear(_QWeightMixin, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.qweight(), self.qbias())


def _to_q(m: nn.Module) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise QpipeError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported")
        q = QConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                    bias=m.bias is not None)
    else:
        q = QLinear(m.in_features, m.out_features, bias=m.bias is not None)
    q._init_qbuffers()
    q.load_state_dict(m.state_dict())
    return q


class ActQuant(nn.Module):
    """One activation quantization point. ``source`` names the quantizer whose parameters it reuses
    (after pass-through ops like max-pool); its own observer is then unused."""

    def __init__(self, spec: QuantSpec, source: str | None = None):
        super().__init__()
        self.spec, self.source = spec, source
        self.register_buffer("scale", torch.tensor(0.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observer: ActivationObserver | None = None
        self.qname = ""

    def forward(self, x):
        m = _STATE["mode"]
        if m == "observe":
            if self.observer is not None and self.source is None:
                self.observer.observe(x)
            return x
        if m == "float" or not self.scale > 0:
            return x
        if m == "mark":
            return Mark.apply(x, self.source or self.qname)
        if "lsq_scale" in self.__dict__:  # LSQ step being learned during reconstruction
            return lsq_fake_quantize(x, self.lsq_scale, float(self.zero_point), self.spec.qmin, self.spec.qmax)
        if self.__dict__.get("ste"):     # inside a reconstruction unit: let gradients through
            return fake_quantize_ste(x, self.scale, float(self.zero_point), self.spec.qmin, self.spec.qmax)
        return fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax)


RELU_MODULES = (nn.ReLU,)
RELU_FUNCS = (F.relu, torch.relu)
PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
PASS_FUNCS = (torch.flatten, F.max_pool2d, F.dropout)
PASS_METHODS = ("flatten", "view", "reshape", "contiguous")
ADD_FUNCS = (operator.add, torch.add, operator.iadd)
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
POOL_FUNCS = (F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean)


@dataclass
class Prepared:
    gm: fx.GraphModule
    layers: list[str]          # quantizable Conv/Linear modules in graph order
    act: list[str]             # activation quantizer module names in graph order
    layer_input: dict[str, str | None]  # layer -> quantizer feeding it (through pass-through ops)


def _kind(node: fx.Node, modules) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (QConv2d, QLinear, nn.Conv2d, nn.Linear)):
            return "layer"
        if isinstance(m, RELU_MODULES):
            return "relu"
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
        if isinstance(m, PASS_MODULES):
            return "pass"
        if isinstance(m, POOL_MODULES):
            return "pool"
        if isinstance(m, ActQuant):
            return "aq"
    if node.op == "call_function":
        if node.target in RELU_FUNCS:
            return "relu"
        if node.target in ADD_FUNCS:
            return "add"
        if node.target in PASS_FUNCS:
            return "pass"
        if node.target in POOL_FUNCS:
            return "pool"
    if node.op == "call_method":
        if node.target == "relu":
            return "relu"
        if node.target == "add":
            return "add"
        if node.target in PASS_METHODS:
            return "pass"
        if node.target == "mean":
            return "pool"
    return "other"


def prepare(model: nn.Module, recipe: Recipe) -> Prepared:
    """Trace, fold BN (if the recipe says so), swap in Q-modules and insert activation quantizers."""
    gm = trace(model.eval())
    if recipe.fold_bn:
        fold_batchnorm(gm)
    modules = dict(gm.named_modules())
    layers = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            if node.target in layers:
                raise QpipeError(f"module {node.target} is called twice; qpipe needs one call per Conv/Linear")
            layers.append(node.target)
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        q = _to_q(modules[name])
        q.qname = name
        setattr(gm.get_submodule(parent) if parent else gm, leaf, q)
    modules = dict(gm.named_modules())

    act: list[str] = []
    a = recipe.activations
    if a.bits != FLOAT_BITS:
        nonneg: dict[fx.Node, bool] = {}
        owner: dict[fx.Node, str] = {}   # node -> quantizer whose grid its values lie on

        def insert(after: fx.Node, source: str | None, is_nonneg: bool) -> None:
            name = f"aq_{after.name}"
            spec = QuantSpec(a.bits, signed=not (is_nonneg or not a.symmetric), symmetric=a.symmetric)
            aq = ActQuant(spec, source)
            aq.qname = source or name
            gm.add_submodule(name, aq)
            modules[name] = aq
            with gm.graph.inserting_after(after):
                new = gm.graph.call_module(name, (after,))
            after.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            owner[new] = source or name
            nonneg[new] = is_nonneg
            act.append(name)

        for node in list(gm.graph.nodes):
            k = _kind(node, modules)
            if k in ("input", "layer", "add", "pool"):
                if k == "input" and not node.users:
                    continue
                tail, nn_flag = node, (k == "pool" and all(nonneg.get(x, False) for x in node.all_input_nodes))
                while len(tail.users) == 1:
                    user = next(iter(tail.users))
                    uk = _kind(user, modules)
                    if uk == "bn":
                        tail = user
                    elif uk == "relu":
                        tail, nn_flag = user, True
                        break
                    else:
                        break
                insert(tail, None, nn_flag)
            elif k == "pass" and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in owner:
                src = node.args[0]
                insert(node, owner[src], nonneg.get(src, False))

    layer_input: dict[str, str | None] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in layers:
            src = node.args[0]
            layer_input[node.target] = None
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], ActQuant):
                layer_input[node.target] = modules[src.target].qname
    gm.graph.lint()
    gm.recompile()
    return Prepared(gm, layers, act, layer_input)


def weight_bits(recipe: Recipe, index: int, n_layers: int) -> int:
    w = recipe.weights
    if w.only_first and index > 0:
        return FLOAT_BITS
    if index == 0 and w.first_bits is not None:
        return w.first_bits
    if index == n_layers - 1 and w.last_bits is not None:
        return w.last_bits
    return w.bits


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    x, xq = x.detach().double(), xq.detach().double()
    noise = (x - xq).pow(2).sum()
    sig = x.pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(sig / noise))


def quantize_weights(p: Prepared, recipe: Recipe) -> dict[str, dict]:
    """Choose scales and round every layer's weights to integers (frozen in the Q-modules)."""
    w = recipe.weights
    info = {}
    for i, name in enumerate(p.layers):
        m = p.gm.get_submodule(name)
        bits = weight_bits(recipe, i, len(p.layers))
        if bits == FLOAT_BITS:
            continue
        per_channel = w.granularity == "per_channel"
        spec = QuantSpec(bits, signed=True, symmetric=w.symmetric, axis=0 if per_channel else None)
        wt = m.weight.detach().double()
        rows = wt.reshape(wt.shape[0], -1) if per_channel else wt.reshape(1, -1)
        s, z = estimate(rows, w.observer, spec, p=w.p)
        s = s.float().double()  # scales live as float32 in ONNX
        gen = torch.Generator().manual_seed(recipe.seed * 100_003 + i)
        axis = 0 if per_channel else None
        sz = (s, z.double()) if per_channel else (s[0], z[0].double())
        rounding = "nearest" if w.rounding == "adaround" else w.rounding  # AdaRound starts from nearest
        q = quantize(wt, sz[0], sz[1], spec.qmin, spec.qmax, axis, rounding, gen)
        m.weight_int = q.to(torch.int8)
        m.weight_bits = bits
        m.weight_scale = s.float() if per_channel else s[0].float().reshape(())
        m.weight_zero_point = z.to(torch.int32) if per_channel else z[0].to(torch.int32).reshape(())
        info[name] = {"bits": bits, "sqnr_db": weight_sqnr(m)}
    return info


def weight_sqnr(m) -> float:
    """SQNR (dB) of a layer's dequantized integer weights against its float weights."""
    wq = dequantize(m.weight_int, m.weight_scale, m.weight_zero_point, 0 if m.weight_scale.ndim else None)
    return sqnr_db(m.weight, wq)


def quantize_biases(p: Prepared) -> None:
    """int32 bias with scale s_in * s_w (what onnxruntime's integer kernels add to the accumulator)."""
    for name in p.layers:
        m = p.gm.get_submodule(name)
        src = p.layer_input.get(name)
        if m.weight_int is None or src is None or m.bias is None:
            continue
        s_in = p.gm.get_submodule(src).scale
        bs = (s_in.float() * m.weight_scale.float()).reshape(-1) if m.weight_scale.ndim else s_in * m.weight_scale
        bs = bs.float()
        b = m.bias.detach().double()
        bq = torch.round(b / bs.double())
        if bq.abs().max() > 2**31 - 1:
            raise QpipeError(f"layer {name}: bias does not fit in int32 at scale s_in*s_w")
        m.bias_int = bq.to(torch.int32)
        m.bias_scale = bs if bs.ndim else bs.expand_as(b).float().clone()


@torch.no_grad()
def calibrate_activations(p: Prepared, recipe: Recipe, batches) -> int:
    """Observe activations on calibration batches (float forward), then freeze each quantizer."""
    a = recipe.activations
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is None:
            aq.observer = ActivationObserver(a.observer, aq.spec, a.momentum, a.percentile, a.p, recipe.seed)
    n = 0
    with mode("observe"):
        for x, _ in batches:
            p.gm(x)
            n += len(x)
    if p.act and n == 0:
        raise QpipeError("calibration data is empty")
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is None:
            s, z = aq.observer.qparams()
            aq.scale = torch.tensor(s, dtype=torch.float32)
            aq.zero_point = torch.tensor(z, dtype=torch.int32)
            aq.observer = None
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is not None:
            src = p.gm.get_submodule(aq.source)
            aq.scale, aq.zero_point = src.scale.clone(), src.zero_point.clone()
    return n
