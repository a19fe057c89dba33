"""The quantized model: Q-modules, quantization points found on the traced graph, calibration and freezing.

Quantization points (onnxruntime's QDQ layout, so every Conv/Gemm/Add fuses into an integer kernel):
the model input; the output of every Conv/Linear, residual add and average pool, taken after a following
(BatchNorm and) ReLU; and after pass-through ops (max-pool, flatten) the same quantizer again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import operator
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpipe import inputs
from qpipe.errors import QpipeError
from qpipe.intvalues import MASK_FILL_MAGNITUDE, RELU, masked_below
from qpipe.kinds import QUANTIZED_KINDS, REGISTRY, Kind, resolve
from qpipe.models.adder import AdderConv2d, adder2d, adder2d_forward
from qpipe.onnx_names import MARK, MARK_ADDER, MARK_DOMAIN, MARK_INT_OP
from qpipe.recipe import FLOAT_BITS, Recipe
from qpipe.record import IntOpRecord
from qpipe.reference.intops import MASKED, OUT_BITS

from . import intops
from .apot import Levels, codes_of
from .capture import capture
from .fold import fold_batchnorm
from .observers import ActivationObserver, estimate
from .quant import QuantSpec, dequantize, fake_quantize, lsq_fake_quantize, quantize


def _marker(op_type: str, doc: str) -> type[torch.autograd.Function]:
    """An identity that the TorchScript ONNX exporter writes as a ``qpipe.mark::<op_type>(name=...)`` node."""

    def symbolic(g, x, name):
        out = g.op(f"{MARK_DOMAIN}::{op_type}", x, name_s=name)
        out.setType(x.type())
        return out

    return type(op_type, (torch.autograd.Function,), {
        "__doc__": doc, "forward": staticmethod(lambda ctx, x, name: x), "symbolic": staticmethod(symbolic)})


Mark = _marker(MARK, "Marks a quantized tensor in the float graph, so the QDQ exporter finds it by name.")
MarkAdder = _marker(MARK_ADDER, "Marks the weights of a quantized adder layer: the QDQ exporter replaces the Adder2d "
                             "that reads them by per-group Q/DQ inputs, integer weights and Adder2d ops.")
MarkOp = _marker(MARK_INT_OP, "Marks where an integer op replaces a float one: the QDQ exporter puts Q -> ai.qpipe op "
                          "-> scale in its place with the constants of qparams.json['intops'].")


class Mode(str, enum.Enum):
    """What the Q-modules of a prepared model compute."""

    FLOAT = "float"      # the float model (quantizers and integer weights bypassed)
    OBSERVE = "observe"  # the float model, observers collect statistics
    QUANT = "quant"      # the quantized model (fake-quantized activations, dequantized integer weights)
    MARK = "mark"        # the float graph with qpipe.mark nodes, for the TorchScript exporter

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class QState:
    """The quantization state of one prepared model, shared by all of its Q-modules (``prepare`` hands the same
    object to each). It changes only through the context managers below."""

    mode: Mode = Mode.QUANT
    only: frozenset[str] | None = None   # diagnosis: quantize only these layers / quantizers (see only_quantize)
    batch: int | None = None             # the global index of the calibration batch being observed
    tokens: torch.Tensor | None = None   # its attention mask (N x L): observers skip padded tokens
    quantizers: dict[str, ActQuant] = dataclasses.field(default_factory=dict, repr=False)  # qname -> quantizer

    def active(self, qname: str) -> bool:
        return self.only is None or qname in self.only


def state_of(model: nn.Module) -> QState:
    """The quantization state of a prepared model (or of any module that holds Q-modules)."""
    state = getattr(model, "qstate", None)
    if isinstance(state, QState):
        return state
    return next((m.qstate for m in model.modules() if isinstance(getattr(m, "qstate", None), QState)), QState())


@contextlib.contextmanager
def mode(model: nn.Module, m: Mode | str):
    """Run ``model``'s Q-modules in mode ``m`` inside the block."""
    state = state_of(model)
    prev, state.mode = state.mode, Mode(m)
    try:
        yield state
    finally:
        state.mode = prev


@contextlib.contextmanager
def only_quantize(model: nn.Module, names):
    """Quantize only the named layers (weights) and quantizers; everything else runs float (diagnosis)."""
    state = state_of(model)
    prev, state.only = state.only, frozenset(names)
    try:
        yield state
    finally:
        state.only = prev


@contextlib.contextmanager
def observing(model: nn.Module):
    """Observe mode; the block sets ``state.batch`` to each batch's global index before running it."""
    with mode(model, Mode.OBSERVE) as state:
        try:
            yield state
        finally:
            state.batch = state.tokens = None


class _QWeightMixin:
    """Integer weights (int8 container), per-channel or per-tensor scale, and an int32 bias."""

    def _init_qbuffers(self):
        self.register_buffer("weight_int", None)
        self.register_buffer("weight_scale", None)
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("bias_int", None)
        self.register_buffer("bias_scale", None)
        self.qname = ""
        self.qstate = QState()

    def qweight(self) -> torch.Tensor:
        m = self.qstate.mode
        qat = getattr(self, "qat", None)  # QAT (attached submodule): levels of the float weight, learned alpha
        if qat is not None and m == Mode.QUANT:
            return qat(self.weight)
        # mark mode writes the float graph: float weights, marked where integers replace them on export
        if self.weight_int is None or m in (Mode.FLOAT, Mode.OBSERVE) or not self.qstate.active(self.qname):
            return self.weight
        if m == Mode.MARK:
            return Mark.apply(self.weight, f"{self.qname}.weight")
        ada = getattr(self, "ada", None)  # AdaRound (attached submodule): soft weights while rounding is learned
        if ada is not None:
            return ada.soft()
        return dequantize(self.weight_int, self.weight_scale, self.weight_zero_point, 0)

    def qbias(self) -> torch.Tensor | None:
        m = self.qstate.mode
        if self.bias_int is None or m in (Mode.FLOAT, Mode.OBSERVE) or not self.qstate.active(self.qname):
            return self.bias
        if m == Mode.MARK:
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


class QEmbedding(_QWeightMixin, nn.Embedding):
    """An embedding table of integer rows: int8 container, one scale per row (axis 0), no bias."""

    def forward(self, ids):
        return F.embedding(ids, self.qweight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


def to_q_embedding(m: nn.Embedding, name: str, recipe: Recipe) -> QEmbedding:
    """The Q-module of an nn.Embedding (``Kind.EMBEDDING``)."""
    if m.max_norm is not None:
        raise QpipeError(f"{name}: nn.Embedding with max_norm changes its table while it runs; not supported")
    q = QEmbedding(m.num_embeddings, m.embedding_dim, m.padding_idx)
    q._init_qbuffers()
    q.load_state_dict(m.state_dict())
    q.qname = name
    return q


def embedding_bits(recipe: Recipe) -> int:
    """Bits of the embedding tables: ``weights.embedding_bits``, else 8 where weights are quantized."""
    w = recipe.weights
    if w.embedding_bits is not None:
        return w.embedding_bits
    return FLOAT_BITS if w.bits == FLOAT_BITS else 8


class AdderRangeObserver:
    """AdderQuant's activation range r of one adder layer: the running max over batches of the ``percentile``
    of |x| (collect with ``observe``, conclude with ``range``)."""

    def __init__(self, percentile: float):
        self.percentile = percentile
        self.value = torch.tensor(0.0)

    def observe(self, x: torch.Tensor) -> None:
        v = x.detach().abs().flatten()
        k = max(int(math.ceil(self.percentile / 100.0 * v.numel())), 1)
        self.value = torch.maximum(self.value.to(v.device), v.kthvalue(k).values.float())

    def range(self) -> torch.Tensor:
        return self.value


class QAdder2d(AdderConv2d):
    """An adder layer quantized by AdderQuant once frozen (``freeze_adder``): output filters in groups, each group
    re-quantizes the input to unsigned b-bit codes at step S/(2^b-1) and holds signed b-bit weight codes at step
    2S/(2^b-1), so ``-sum |x_int - 2 w_int|`` is exact in integers; plus the lossless-clamp bias per filter.
    In observe mode it hands its input to its range observer, where ``adderquant.observe_ranges`` attached one."""

    def _init_qbuffers(self, percentile: float):
        self.register_buffer("weight_int", None)    # (O, C, kh, kw) int8 codes
        self.register_buffer("group", None)         # (O,) group of each filter
        self.register_buffer("group_scale", None)   # (G,) S per group, float32
        self.register_buffer("clamp_bias", None)    # (O,) float32: -sum max(|w| - S, 0)
        self.register_buffer("act_range", torch.tensor(0.0))
        self.register_buffer("bits", torch.tensor(8))
        self.percentile = percentile
        self.range_observer: AdderRangeObserver | None = None
        self.qname = ""
        self.qstate = QState()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in ("weight_int", "group", "group_scale", "clamp_bias"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        m = self.qstate.mode
        frozen = self.weight_int is not None
        if m == Mode.OBSERVE and not frozen and self.range_observer is not None:
            self.range_observer.observe(x)
        if not frozen or m == Mode.FLOAT or not self.qstate.active(self.qname):
            return super().forward(x)
        if m == Mode.MARK:  # the float adder on marked weights: the QDQ exporter expands it per group
            return adder2d(x, MarkAdder.apply(self.weight, self.qname), self.stride, self.padding, None)
        return self.int_forward(x)

    def steps(self) -> torch.Tensor:
        """Activation step S / (2^b - 1) of each group, float32."""
        return self.group_scale.float() / torch.tensor(float(2 ** int(self.bits) - 1))

    def codes(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Group g's unsigned b-bit input codes (float32 division, round half to even, as QuantizeLinear)."""
        return torch.clamp(torch.round(x.float() / self.steps()[g]), 0, 2 ** int(self.bits) - 1).to(torch.int64)

    def int_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for g in range(len(self.group_scale)):
            sel = self.group == g
            acc = adder2d_forward(self.codes(x, g), 2 * self.weight_int[sel].to(torch.int64), self.stride,
                                  self.padding)
            y = acc.float() * self.steps()[g] + self.clamp_bias[sel].reshape(1, -1, 1, 1)
            if out is None:
                out = x.new_zeros((x.shape[0], self.out_channels, *y.shape[2:]))
            out[:, sel] = y
        return out


def to_q_adder(m: AdderConv2d, name: str, recipe: Recipe) -> QAdder2d:
    """The Q-module of an adder layer (``Kind.ADDER``)."""
    q = QAdder2d(m.in_channels, m.out_channels, m.kernel_size[0], m.stride, m.padding, m.eta)
    q._init_qbuffers(recipe.adder.percentile)
    q.load_state_dict(m.state_dict(), strict=False)
    q.qname = name
    return q


def to_q_layer(m: nn.Module, name: str, recipe: Recipe) -> nn.Module:
    """The Q-module of a Conv2d / Linear (``Kind.LAYER``)."""
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise QpipeError(f"Conv2d with padding_mode={m.padding_mode!r} is not supported")
        q = QConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                    bias=m.bias is not None)
    else:
        q = QLinear(m.in_features, m.out_features, bias=m.bias is not None)
    q._init_qbuffers()
    q.load_state_dict(m.state_dict())
    q.qname = name
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
        self.qstate = QState()
        self.ste = False   # inside a reconstruction unit (adaround.attached): gradients pass straight through
        self.fixed = False  # scale set by the op before it (IntSoftmax: 2^-8), never calibrated or learned
        self.levels: Levels | None = None  # QAT recipes: the level set (APoT: non-uniform, with an alpha buffer)

    def make_apot(self, levels: Levels) -> None:
        self.levels = levels
        if levels.kind == "apot" and "alpha" not in self._buffers:
            self.register_buffer("alpha", torch.tensor(0.0))

    @property
    def apot(self) -> bool:
        return self.levels is not None and self.levels.kind == "apot"

    def forward(self, x):
        m = self.qstate.mode
        if m == Mode.OBSERVE:
            if self.observer is not None and self.source is None:
                self.observer.observe(inputs.real_tokens(x, self.qstate.tokens), self.qstate.batch)
            return x
        if self.apot and self.source is not None:
            return x  # after max-pool / flatten: already on the source's levels (projecting again could move them)
        qat = getattr(self, "qat", None)   # QAT (attached submodule): learned-clipping levels, before any scale
        if qat is not None and m == Mode.QUANT:
            return qat(x)
        if m == Mode.FLOAT or not self.scale > 0 or not self.qstate.active(self.qname):
            return x
        if m == Mode.MARK:
            return Mark.apply(x, self.source or self.qname)
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized values on the frozen grid, or with what reconstruction attached: a learned LSQ step,
        or the straight-through estimator; APoT levels project to their codes."""
        lsq_scale = getattr(self, "lsq_scale", None)  # LSQ step (attached parameter) learned in reconstruction
        if lsq_scale is not None:
            return lsq_fake_quantize(x, lsq_scale, float(self.zero_point), self.spec.qmin, self.spec.qmax)
        if self.apot:
            return codes_of(x, self.alpha, self.levels).float() * self.scale
        if self.ste:     # inside a reconstruction unit: let gradients through (one fused kernel each way)
            return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.spec.qmin,
                                                         self.spec.qmax)
        return fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax)


class _IntOpMixin:
    """A transformer non-linearity that runs as an I-ViT integer op once frozen (``recipe.ops.<op> = int``):
    it reads the integers of its input quantizer and returns the op's output at its exact scale.
    Float in ``float``/``observe`` modes, so calibration observes the float model."""

    def _init_int(self, kind: str):
        self.kind = kind
        self.qname = ""
        self.in_q: str | None = None     # quantizer feeding the op
        self.out_q: str | None = None    # quantizer after it
        self.qstate = QState()
        self.register_buffer("x0", None)        # IntSoftmax / IntGELU: floor(-1 / s)
        self.register_buffer("ln_m", None)      # IntLayerNorm: per-channel multiplier, shift, bias
        self.register_buffer("ln_k", None)
        self.register_buffer("ln_b", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in ("x0", "ln_m", "ln_k", "ln_b"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def int_forward(self, x: torch.Tensor, float_forward) -> torch.Tensor:
        m = self.qstate.mode
        frozen = self.x0 is not None or self.ln_m is not None
        if m in (Mode.FLOAT, Mode.OBSERVE) or not frozen or not self.qstate.active(self.qname):
            return float_forward(x)
        if m == Mode.MARK:
            return MarkOp.apply(x, self.qname)
        y = self._int_values(x)
        if torch.is_grad_enabled() and x.requires_grad:  # reconstruction: the float op's gradient (straight through)
            f = float_forward(x)
            return f + (y - f).detach()
        return y

    def _int_values(self, x: torch.Tensor) -> torch.Tensor:
        src = self.qstate.quantizers[self.in_q]
        with torch.no_grad():
            q = torch.round(x / src.scale).to(torch.int64) - src.zero_point.to(torch.int64)
        if self.kind == "softmax":
            low = masked_below(float(src.scale), int(src.zero_point), src.spec.qmin)
            q = torch.where(x < low, MASKED, q)   # masked_fill(mask, -inf) after the quantizer: no weight
            return intops.softmax(q, int(self.x0)).float() * 2.0**-OUT_BITS
        if self.kind == "gelu":
            return intops.gelu(q, int(self.x0)).float() * (src.scale * 2.0**-OUT_BITS)
        dst = self.qstate.quantizers[self.out_q]
        y = intops.layernorm(q, self.ln_params())
        return (y - dst.zero_point.to(torch.int64)).float() * dst.scale

    def ln_params(self):
        from qpipe.reference.intops import LayerNormParams

        dst = self.qstate.quantizers[self.out_q]
        return LayerNormParams(tuple(self.ln_m.tolist()), int(self.ln_k), tuple(self.ln_b.tolist()),
                               int(dst.zero_point), dst.spec.qmin, dst.spec.qmax)

    def freeze_int(self) -> IntOpRecord:
        """Integer constants from the frozen quantizers, kept in the op's buffers and returned as its record."""
        from qpipe.reference import intops as ref

        src, dst = self.qstate.quantizers[self.in_q], self.qstate.quantizers[self.out_q]
        s_in = float(src.scale)
        rec = IntOpRecord(REGISTRY[self.kind].int_op,
                          self.in_q, self.out_q, s_in, int(src.zero_point), output_scale=float(dst.scale))
        if self.kind in ("softmax", "gelu"):
            x0 = ref.shiftexp_x0(s_in) if self.kind == "softmax" else ref.gelu_x0(s_in)
            self.x0 = torch.tensor(x0, dtype=torch.int64)
            out_scale = 2.0**-OUT_BITS if self.kind == "softmax" else s_in * 2.0**-OUT_BITS
            return dataclasses.replace(rec, x0=x0, output_scale=out_scale)
        d = self.normalized_shape[-1]
        w = self.weight.detach().double().cpu().numpy() if self.weight is not None else [1.0] * d
        b = self.bias.detach().double().cpu().numpy() if self.bias is not None else [0.0] * d
        p = ref.layernorm_params(w, b, float(dst.scale), int(dst.zero_point), dst.spec.qmin, dst.spec.qmax)
        self.ln_m = torch.tensor(p.m, dtype=torch.int64)
        self.ln_k = torch.tensor(p.k, dtype=torch.int64)
        self.ln_b = torch.tensor(p.b, dtype=torch.int64)
        return dataclasses.replace(rec, m=tuple(int(v) for v in p.m), k=int(p.k), b=tuple(int(v) for v in p.b),
                                   zero_point=int(p.zero_point), qmin=int(p.qmin), qmax=int(p.qmax),
                                   eps=float(self.eps))


class QSoftmax(_IntOpMixin, nn.Softmax):
    def forward(self, x):
        return self.int_forward(x, super().forward)


class QGELU(_IntOpMixin, nn.GELU):
    def forward(self, x):
        return self.int_forward(x, super().forward)


class QLayerNorm(_IntOpMixin, nn.LayerNorm):
    def forward(self, x):
        return self.int_forward(x, super().forward)


def to_int_op(m: nn.Module, name: str, recipe: Recipe) -> nn.Module:
    """The Q-module of a Softmax / GELU / LayerNorm that runs as an I-ViT integer op (``recipe.ops.<op>: int``)."""
    kind = next(k for cls, k in OP_MODULES.items() if isinstance(m, cls))
    if kind == Kind.SOFTMAX:
        if m.dim not in (-1, None):
            raise QpipeError(f"{name}: integer softmax needs dim=-1, got dim={m.dim}")
        q = QSoftmax(dim=-1)
    elif kind == Kind.GELU:
        q = QGELU(approximate=m.approximate)
    else:
        if len(m.normalized_shape) != 1:
            raise QpipeError(f"{name}: integer LayerNorm normalises one (the last) axis, got {m.normalized_shape}")
        q = QLayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                       bias=m.bias is not None)
        q.load_state_dict(m.state_dict())
    q._init_int(kind)
    q.qname = name
    return q


# ReLU and the bounded activations (ReLU6, Hardtanh, clamp with constant bounds): folded into the producer's
# output range -- the quantizer after them sees their output (``activation_bounds`` says the range)
RELU_MODULES = (nn.ReLU, nn.Hardtanh)   # nn.ReLU6 is a Hardtanh
RELU_FUNCS = (F.relu, torch.relu, F.relu6, F.hardtanh)
CLAMP_FUNCS = (torch.clamp, torch.clip)
CLAMP_METHODS = ("clamp", "clip")
# elementwise activations without a bound to fold: a quantizer after them (DQ -> op -> Q in the QDQ graph)
ACTIVATION_MODULES = (nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.Tanh, nn.ELU,
                      nn.Mish)
ACTIVATION_FUNCS = (F.silu, F.hardswish, torch.sigmoid, F.sigmoid, F.hardsigmoid, F.leaky_relu, torch.tanh,
                    F.tanh, F.elu, F.mish)
ACTIVATION_METHODS = ("sigmoid", "tanh")
UNIT_RANGE = (nn.Sigmoid, nn.Hardsigmoid, torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid")  # outputs in [0, 1]
# values pass through on their grid: no requantisation (zero padding pads with the grid's zero point)
PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.ZeroPad2d, nn.ReflectionPad2d,
                nn.ReplicationPad2d)
PASS_FUNCS = (torch.flatten, F.max_pool2d, F.dropout, operator.getitem, torch.permute, torch.transpose,
              torch.reshape, torch.select)
PASS_METHODS = ("flatten", "view", "reshape", "contiguous", "permute", "transpose", "expand", "squeeze",
                "unsqueeze", "masked_fill")   # masked_fill(mask, -inf) before softmax: the quantizer after clamps
ADD_FUNCS = (operator.add, torch.add, operator.iadd)
POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
POOL_FUNCS = (F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean)
MATMUL_FUNCS = (torch.matmul, operator.matmul, torch.bmm)
SPLIT_FUNCS = (torch.unbind, torch.chunk, torch.split)   # tuple outputs: their items (getitem) get the quantizer
SPLIT_METHODS = ("unbind", "chunk", "split")
MUL_FUNCS = (operator.mul, torch.mul)
DIV_FUNCS = (operator.truediv, torch.div)
OP_MODULES = MappingProxyType({nn.Softmax: Kind.SOFTMAX, nn.GELU: Kind.GELU, nn.LayerNorm: Kind.LAYERNORM})  # read-only
# producers whose output gets its own quantizer (a following BatchNorm / ReLU / constant scale taken with it)


@dataclass
class Prepared:
    gm: fx.GraphModule
    layers: list[str]          # quantizable Conv/Linear modules in graph order
    act: list[str]             # activation quantizer module names in graph order
    layer_input: dict[str, str | None]  # layer -> quantizer feeding it (through pass-through ops)
    int_ops: list[str]         # integer Softmax / GELU / LayerNorm modules (recipe.ops)
    adders: list[str] = dataclasses.field(default_factory=list)  # AdderQuant layers (recipe.adder)
    weight_bits: dict[str, int] = dataclasses.field(default_factory=dict)  # layer -> bits (layer_bits)
    embeddings: list[str] = dataclasses.field(default_factory=list)  # quantized nn.Embedding tables


SCALAR_OPS = (operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv, operator.pow,
              operator.getitem, operator.neg)


def _is_scalar(node: fx.Node) -> bool:
    """Shape arithmetic (``B * heads`` from ``x.shape``): a Python number while tracing, not a tensor."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] == "shape":
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target in SCALAR_OPS:
        nodes = [a for a in node.args if isinstance(a, fx.Node)]
        return bool(nodes) and all(_is_scalar(a) for a in nodes)
    return False


def _constant_bounds(node: fx.Node) -> tuple[float, float] | None:
    """(min, max) of ``clamp(x, min, max)`` with numbers (missing: -inf / inf); None when a bound is a tensor."""
    args = list(node.args[1:]) + [None] * 2
    lo = node.kwargs.get("min", args[0])
    hi = node.kwargs.get("max", args[1])
    if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)) or (lo is None and hi is None):
        return None
    return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


def _zero_padding(node: fx.Node) -> bool:
    """``F.pad`` that keeps values on their grid: constant 0 (the zero point), reflect or replicate."""
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode in ("reflect", "replicate") or (mode == "constant" and value in (None, 0, 0.0))


def activation_bounds(node: fx.Node, modules) -> tuple[float, float]:
    """The output range of a ReLU-kind node: ReLU (0, inf), ReLU6 (0, 6), Hardtanh (min_val, max_val), clamp."""
    if node.op == "call_module":
        m = modules[node.target]
        return (float(m.min_val), float(m.max_val)) if isinstance(m, nn.Hardtanh) else RELU
    if node.target is F.relu6:
        return 0.0, 6.0
    if node.target is F.hardtanh:
        args = list(node.args[1:]) + [None] * 2
        lo, hi = node.kwargs.get("min_val", args[0]), node.kwargs.get("max_val", args[1])
        return -1.0 if lo is None else float(lo), 1.0 if hi is None else float(hi)
    if node.target in CLAMP_FUNCS or (node.op == "call_method" and node.target in CLAMP_METHODS):
        return _constant_bounds(node)
    return RELU


def _unit_range(node: fx.Node, modules) -> bool:
    """A sigmoid-like activation: its outputs lie in [0, 1] (an unsigned quantizer)."""
    target = type(modules[node.target]) if node.op == "call_module" else node.target
    return target in UNIT_RANGE


def _nonneg_activation(node: fx.Node, modules) -> bool:
    """A ReLU-kind node whose output is never negative (its quantizer can be unsigned)."""
    return kind_of(node, modules) == Kind.RELU and activation_bounds(node, modules)[0] >= 0


def kind_of(node: fx.Node, modules) -> Kind:
    """The kind of a node of the captured graph (``qpipe.kinds``); ``modules``: the graph's named modules."""
    val = node.meta.get("val")   # known where capture went through torch.export
    if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
        return Kind.OTHER        # token ids, masks, positions and arithmetic on them: never quantized
    if node.op == "placeholder":
        return Kind.INPUT
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (QConv2d, QLinear, nn.Conv2d, nn.Linear)):
            return Kind.LAYER
        if isinstance(m, nn.Embedding):
            return Kind.EMBEDDING
        if isinstance(m, AdderConv2d):
            return Kind.ADDER
        if isinstance(m, RELU_MODULES):
            return Kind.RELU
        if isinstance(m, ACTIVATION_MODULES):
            return Kind.ACTIVATION
        if isinstance(m, nn.BatchNorm2d):
            return Kind.BN
        if isinstance(m, PASS_MODULES):
            return Kind.PASS
        if isinstance(m, POOL_MODULES):
            return Kind.POOL
        if isinstance(m, ActQuant):
            return Kind.QUANTIZER
        for cls, kind in OP_MODULES.items():
            if isinstance(m, cls):
                return kind
    if node.op == "call_function":
        if node.target in RELU_FUNCS or (node.target in CLAMP_FUNCS and _constant_bounds(node) is not None):
            return Kind.RELU
        if node.target is F.pad and _zero_padding(node):
            return Kind.PASS
        if node.target in ACTIVATION_FUNCS:
            return Kind.ACTIVATION
        if node.target in ADD_FUNCS:
            return Kind.ADD
        if node.target in PASS_FUNCS:
            return Kind.PASS
        if node.target in POOL_FUNCS:
            return Kind.POOL
        if node.target in MATMUL_FUNCS:
            return Kind.MATMUL
        if node.target is torch.cat:
            return Kind.CAT
        if node.target in SPLIT_FUNCS:
            return Kind.SPLIT
        if node.target in MUL_FUNCS and any(isinstance(a, (int, float)) for a in node.args) \
                and not any(isinstance(a, fx.Node) and _is_scalar(a) for a in node.args):
            return Kind.SCALE  # multiplication by a constant number
        if node.target in MUL_FUNCS and len(node.args) == 2 and all(
                isinstance(a, fx.Node) and not _is_scalar(a) and a.op != "get_attr" for a in node.args):
            return Kind.MUL    # two tensors (squeeze-excite)
        if node.target in DIV_FUNCS and len(node.args) == 2 and isinstance(node.args[1], (int, float)) \
                and isinstance(node.args[0], fx.Node) and not _is_scalar(node.args[0]):
            return Kind.SCALE  # division by a constant number (BERT's scores / sqrt(d))
    if node.op == "call_method":
        if node.target == "relu" or (node.target in CLAMP_METHODS and _constant_bounds(node) is not None):
            return Kind.RELU
        if node.target in ACTIVATION_METHODS:
            return Kind.ACTIVATION
        if node.target == "add":
            return Kind.ADD
        if node.target in PASS_METHODS:
            return Kind.PASS
        if node.target in SPLIT_METHODS:
            return Kind.SPLIT
        if node.target == "mean":
            return Kind.POOL
    return Kind.OTHER


def _swap_in(gm: fx.GraphModule, kind: Kind, name: str, module: nn.Module, recipe: Recipe) -> None:
    """Replace module ``name`` by the Q-module its kind's registry entry makes."""
    factory = resolve(REGISTRY[kind].q_module)
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, factory(module, name, recipe))


def share_state(gm: fx.GraphModule) -> QState:
    """One QState for all Q-modules of ``gm``, knowing every activation quantizer by its qname."""
    state = QState()
    for m in gm.modules():
        if isinstance(getattr(m, "qstate", None), QState):
            m.qstate = state
    state.quantizers = {name: m for name, m in gm.named_modules() if isinstance(m, ActQuant) and m.source is None}
    gm.qstate = state
    return state


def prepare(model: nn.Module, recipe: Recipe, example: dict[str, torch.Tensor] | None = None) -> Prepared:
    """Trace, fold BN (if the recipe says so), swap in Q-modules and insert activation quantizers. ``example``:
    the model's inputs by name, for models captured through torch.export (``capture``)."""
    gm = capture(model.eval(), recipe.exclude, example)
    if recipe.fold_bn:
        fold_batchnorm(gm)
    modules = dict(gm.named_modules())
    floats = {n for n in gm.graph.nodes if _in_excluded(n, recipe.exclude)}   # kept float (``exclude:``)
    layers = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)) \
                and node not in floats:
            if node.target in layers:
                raise QpipeError(f"module {node.target} is called twice; qpipe needs one call per Conv/Linear")
            layers.append(node.target)
    for name in layers:
        _swap_in(gm, Kind.LAYER, name, modules[name], recipe)
    embeddings = []
    if embedding_bits(recipe) != FLOAT_BITS:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], nn.Embedding) \
                    and node not in floats and node.target not in embeddings:
                _swap_in(gm, Kind.EMBEDDING, node.target, modules[node.target], recipe)
                embeddings.append(node.target)
    adders = []
    if recipe.adder.method != "none":
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], AdderConv2d):
                if node.target in adders:
                    raise QpipeError(f"module {node.target} is called twice; qpipe needs one call per adder layer")
                _swap_in(gm, Kind.ADDER, node.target, modules[node.target], recipe)
                adders.append(node.target)
        modules = dict(gm.named_modules())
    int_ops = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = modules[node.target]
            kind = next((k for cls, k in OP_MODULES.items() if isinstance(m, cls)), None)
            if kind and node in floats:
                continue
            if kind and getattr(recipe.ops, kind.value) == "int" and recipe.quantizes_activations:
                _swap_in(gm, kind, node.target, m, recipe)
                int_ops.append(node.target)
    modules = dict(gm.named_modules())

    act: list[str] = []
    a = recipe.activations
    qat = recipe.qat.method != "none"
    residual_bits = a.residual_bits
    if residual_bits is None and a.bits < TRANSFORMER_RESIDUAL_BITS and _layernorm_residual(gm, modules):
        residual_bits = TRANSFORMER_RESIDUAL_BITS
    if a.bits != FLOAT_BITS:
        nonneg: dict[fx.Node, bool] = {}
        owner: dict[fx.Node, str] = {}   # node -> quantizer whose grid its values lie on

        specs: dict[str, int] = {}   # quantizer -> bits

        def insert(after: fx.Node, source: str | None, is_nonneg: bool, bits: int, fixed: bool = False,
                   redirect=lambda u: True) -> fx.Node:
            name = f"aq_{after.name}"
            spec = QuantSpec(bits, signed=not (is_nonneg or not a.symmetric), symmetric=a.symmetric)
            specs[source or name] = bits
            aq = ActQuant(spec, source)
            aq.fixed = fixed
            aq.qname = source or name
            gm.add_submodule(name, aq)
            modules[name] = aq
            with gm.graph.inserting_after(after):
                new = gm.graph.call_module(name, (after,))
            after.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new and redirect(u))
            owner[new] = source or name
            nonneg[new] = is_nonneg
            act.append(name)
            return new

        for node in list(gm.graph.nodes):
            k = kind_of(node, modules)
            if node in floats:   # a float region: its output is quantized again where a layer outside reads it
                if not any(u not in floats for u in node.users):
                    continue
                k = Kind.EXCLUDED
            if k in QUANTIZED_KINDS or (k == Kind.EXCLUDED and _read_by_layer(node, modules)):
                if k == Kind.INPUT and not node.users:
                    continue
                if k == Kind.LAYER and isinstance(modules[node.target], nn.Linear) and _feeds_add(node, modules):
                    continue  # a Linear read only by a residual add: the add's quantizer takes its accumulator
                if qat and not _qat_point(node, modules):
                    continue
                nn_flag = (k in (Kind.POOL, Kind.CAT) and all(nonneg.get(x, False) or _nonneg_activation(x, modules)
                                                                   for x in node.all_input_nodes))
                tail, relu = _tail(node, modules, scale=k in (Kind.LAYER, Kind.MATMUL))
                nn_flag = nn_flag or relu or k == Kind.SOFTMAX or (k == Kind.ACTIVATION and _unit_range(node, modules))
                bits = a.bits
                if k == Kind.ADD and residual_bits is not None and not _read_by_layer(tail, modules):
                    bits = residual_bits
                if adders and _read_by_adder(tail, modules):
                    bits = recipe.adder.input_bits  # each group re-quantizes it to its own b-bit grid
                fixed = k == "softmax" and recipe.ops.softmax == "int"
                if fixed:
                    bits = OUT_BITS  # IntSoftmax writes 8-bit probabilities at the fixed scale 2^-8
                # post-LN blocks (BERT): a LayerNorm's output is the residual stream and a layer's input at once;
                # the residual keeps residual_bits, the layer reads it requantised to activations.bits
                split = (k == Kind.LAYERNORM and residual_bits is not None and residual_bits > bits
                         and _feeds_add(tail, modules, any_user=True) and _read_by_layer(tail, modules))
                q = insert(tail, None, nn_flag, residual_bits if split else bits, fixed)
                if split:
                    insert(q, None, nn_flag, bits, redirect=lambda u: kind_of(u, modules) != Kind.ADD)
            elif k == Kind.SPLIT and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in owner:
                src = node.args[0]   # a tuple: its items (getitem, a pass-through op) take the quantizer
                owner[node], nonneg[node] = owner[src], nonneg.get(src, False)
            elif k == Kind.PASS and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in owner:
                src = node.args[0]
                if _masks_scores(node):
                    continue   # masked scores: -inf stays -inf for the softmax (no quantizer clamps it)
                insert(node, owner[src], nonneg.get(src, False), specs[owner[src]])

    layer_input: dict[str, str | None] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and (node.target in layers or node.target in adders):
            src = node.args[0]
            layer_input[node.target] = None
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], ActQuant):
                layer_input[node.target] = modules[src.target].qname
    if qat:
        _qat_levels(gm, recipe, layers, act, layer_input)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in int_ops:
            op = modules[node.target]
            src, users = node.args[0], list(node.users)
            if isinstance(src, fx.Node) and _masks_scores(src) and op.kind == Kind.SOFTMAX:
                src = src.args[0]   # masked scores: the integers of the grid before the mask (MASKED where masked)
            if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), ActQuant)):
                raise QpipeError(f"{node.target}: an integer {op.kind} needs a quantized input")
            if not (len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(users[0].target), ActQuant)):
                raise QpipeError(f"{node.target}: an integer {op.kind} needs one quantizer after it")
            op.in_q, op.out_q = modules[src.target].qname, modules[users[0].target].qname
    gm.graph.lint()
    gm.recompile()
    share_state(gm)
    return Prepared(gm, layers, act, layer_input, int_ops, adders, layer_bits(recipe, layers), embeddings)


def _masks_scores(node: fx.Node) -> bool:
    """``scores.masked_fill(mask, -inf)`` (or a fill as low as ``-MASK_FILL_MAGNITUDE``): the masked positions
    must get no probability, which a quantizer after it would undo (it clamps -inf to the grid's lowest score,
    so padded keys take weight from the real ones and a real token's output depends on its batch's padding)."""
    if not ((node.op == "call_method" and node.target == "masked_fill")
            or (node.op == "call_function" and node.target is torch.masked_fill)):
        return False
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    return isinstance(value, (int, float)) and value <= -MASK_FILL_MAGNITUDE


def _tail(node: fx.Node, modules, scale: bool = True) -> tuple[fx.Node, bool]:
    """(the node whose value a quantizer after ``node`` reads, whether its values are never negative): past a
    following BN, a constant scale (``scale``) and at most one ReLU-kind activation (ReLU, ReLU6, clamp, ...)."""
    tail = node
    while len(tail.users) == 1:
        user = next(iter(tail.users))
        uk = kind_of(user, modules)
        if uk == Kind.RELU:
            return user, activation_bounds(user, modules)[0] >= 0
        if not (uk == Kind.BN or (uk == Kind.SCALE and scale)):
            break
        tail = user
    return tail, False


def _qat_point(node: fx.Node, modules) -> bool:
    """QAT placement: a tensor is quantized when a Conv/Linear reads it, or when it is the model output."""
    tail, _ = _tail(node, modules)
    return _read_by_layer(tail, modules) or any(u.op == "output" for u in tail.users)


def edge_layers(recipe: Recipe, layers: list[str]) -> dict[str, int]:
    """QAT: the first / last layers that ``weights.first_bits`` / ``last_bits`` keep at uniform levels -> bits."""
    w, bits = recipe.weights, layer_bits(recipe, layers)
    if not layers:
        return {}
    edges = ([layers[0]] if w.first_bits is not None else []) + ([layers[-1]] if w.last_bits is not None else [])
    return {name: bits[name] for name in edges}


def _qat_levels(gm: fx.GraphModule, recipe: Recipe, layers, act, layer_input) -> None:
    """Bits and level set of every QAT activation quantizer: read by a middle layer -> the method's levels at
    ``activations.bits``; read only by first / last layers -> uniform at their bits; the output -> uniform at
    ``weights.last_bits`` (or ``activations.bits``)."""
    a, edges = recipe.activations, edge_layers(recipe, layers)
    for name in act:
        aq = gm.get_submodule(name)
        if aq.source is not None:
            continue
        readers = [lay for lay, q in layer_input.items() if q == aq.qname]
        if any(r not in edges for r in readers):
            bits, kind = a.bits, recipe.qat.method
        elif readers:
            bits, kind = max(edges[r] for r in readers), "uniform"
        else:
            bits, kind = recipe.weights.last_bits or a.bits, "uniform"
        signed = aq.spec.signed
        if kind == "apot" and signed:
            raise QpipeError(f"{aq.qname}: APoT activation levels are unsigned, but this tensor can be negative "
                             "(no ReLU before the layer reading it); use qat.method: uniform for this model")
        aq.spec = QuantSpec(bits, signed=signed, symmetric=True)
        aq.make_apot(Levels(kind, bits, signed))
    for name in act:
        aq = gm.get_submodule(name)
        if aq.source is not None:
            src = gm.get_submodule(aq.source)
            aq.spec, aq.levels = src.spec, src.levels  # APoT: passes its source's levels through as they are


def _users_through_pass(node: fx.Node, modules) -> list[fx.Node]:
    """The nodes that read ``node``'s values, looking through pass-through ops (reshape, dropout, ...)."""
    out, todo = [], list(node.users)
    while todo:
        u = todo.pop()
        if kind_of(u, modules) in (Kind.PASS, Kind.SPLIT):
            todo.extend(u.users)
        else:
            out.append(u)
    return out


TRANSFORMER_RESIDUAL_BITS = 16
"""The residual stream of a model with LayerNorm residual blocks (transformers) when the recipe leaves
``activations.residual_bits`` unset: an 8-bit stream loses what the blocks add to it (a real 6-layer BERT
encoder: cosine 0.92 to FP32 at 8 bits, 0.99 at 16)."""


def _layernorm_residual(gm: fx.GraphModule, modules) -> bool:
    """True when a residual add (two tensors) feeds a LayerNorm: a transformer's block."""
    return any(kind_of(n, modules) == Kind.ADD and any(kind_of(u, modules) == Kind.LAYERNORM
                                                       for u in _users_through_pass(n, modules))
               for n in gm.graph.nodes)


def _in_excluded(node: fx.Node, exclude) -> bool:
    """Whether ``node`` computes inside a module the recipe keeps float: the module itself (a leaf of the fx
    capture) or any op torch.export recorded under it (its module stack)."""
    if not exclude:
        return False
    paths = set(node.meta.get("nn_module_stack") or {})
    if node.op == "call_module":
        paths.add(node.target)
    return any(p == e or p.startswith(e + ".") for p in paths for e in exclude)


def _feeds_add(node: fx.Node, modules, any_user: bool = False) -> bool:
    """Whether residual adds read ``node`` (all its readers, or ``any_user``: one of them)."""
    users = _users_through_pass(node, modules)
    adds = [kind_of(u, modules) == Kind.ADD for u in users]
    return bool(users) and (any(adds) if any_user else all(adds))


def _read_by_adder(node: fx.Node, modules) -> bool:
    """True when an adder layer reads ``node`` (after a ReLU or pass-through ops)."""
    for u in _users_through_pass(node, modules):
        k = kind_of(u, modules)
        if k == Kind.ADDER or (k == Kind.RELU and _read_by_adder(u, modules)):
            return True
    return False


def _read_by_layer(node: fx.Node, modules) -> bool:
    """True when a Conv/Linear/matmul reads ``node`` (after a ReLU or pass-through ops)."""
    for u in _users_through_pass(node, modules):
        k = kind_of(u, modules)
        if k in (Kind.LAYER, Kind.MATMUL, Kind.ADDER) or (k == Kind.RELU and _read_by_layer(u, modules)):
            return True
    return False


def layer_bits(recipe: Recipe, layers: list[str]) -> dict[str, int]:
    """The one policy for a layer's weight bits (PTQ and QAT): ``weights.first_bits`` for the first layer,
    ``last_bits`` for the last, ``bits`` for the others; FLOAT_BITS after the first with ``only_first``."""
    return {name: weight_bits(recipe, i, len(layers)) for i, name in enumerate(layers)}


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


def quantize_weights(p: Prepared, recipe: Recipe) -> dict[str, float]:
    """Choose scales and round every layer's weights to integers (frozen in the Q-modules); returns each
    quantized layer's weight SQNR in dB."""
    w = recipe.weights
    info = {}
    for i, name in enumerate(p.layers):
        m = p.gm.get_submodule(name)
        bits = p.weight_bits[name]
        if bits == FLOAT_BITS:
            continue
        per_channel = w.granularity == "per_channel"
        spec = QuantSpec(bits, signed=True, symmetric=w.symmetric, axis=0 if per_channel else None)
        wt = m.weight.detach().double()
        rows = wt.reshape(wt.shape[0], -1) if per_channel else wt.reshape(1, -1)
        s, z = estimate(rows, w.observer, spec, p=w.p)
        if per_channel:
            s, z = _floor_scales(rows, s, z, spec)
        s = s.float().double()  # scales live as float32 in ONNX
        gen = torch.Generator().manual_seed(recipe.seed * 100_003 + i)
        axis = 0 if per_channel else None
        sz = (s, z.double()) if per_channel else (s[0], z[0].double())
        rounding = "nearest" if w.rounding == "adaround" else w.rounding  # AdaRound starts from nearest
        q = quantize(wt, sz[0], sz[1], spec.qmin, spec.qmax, axis, rounding, gen)
        m.weight_int = q.to(torch.int8)
        m.weight_scale = s.float() if per_channel else s[0].float().reshape(())
        m.weight_zero_point = z.to(torch.int32) if per_channel else z[0].to(torch.int32).reshape(())
        info[name] = weight_sqnr(m)
    for name in p.embeddings:   # per row, symmetric, nearest: a row is one token's vector
        m = p.gm.get_submodule(name)
        spec = QuantSpec(embedding_bits(recipe), signed=True, symmetric=True, axis=0)
        wt = m.weight.detach().double()
        s, z = estimate(wt, "absmax", spec)
        s, z = _floor_scales(wt, s, z, spec)
        s = s.float().double()
        m.weight_int = quantize(wt, s, z.double(), spec.qmin, spec.qmax, 0, "nearest").to(torch.int8)
        m.weight_scale, m.weight_zero_point = s.float(), z.to(torch.int32)
        info[name] = weight_sqnr(m)
    return info


WEIGHT_SCALE_FLOOR = 2.0**-16
"""A channel's weight scale is at least this share of its layer's largest. A dead or near-dead channel (|w| ~ 1e-9,
as a folded BatchNorm with zero variance leaves it) then rounds to zero instead of getting a scale of 1e-11 that no
int32 bias at s_in * s_w can follow; exact zeros stay exact at any scale."""
INT32_MAX = 2**31 - 1
BIAS_HEADROOM = 2**30   # bias_fit leaves half of the int32 range, so a later learned input step (LSQ) still fits


def _floor_scales(rows: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec):
    """Per-channel scales raised to ``WEIGHT_SCALE_FLOOR`` times the layer's largest (zero points recomputed for
    the raised channels of an asymmetric grid)."""
    floor = s.max() * WEIGHT_SCALE_FLOOR
    low = s < floor
    if not low.any():
        return s, z
    s = torch.where(low, floor, s)
    if not spec.symmetric:
        lo = torch.clamp(rows.min(dim=1).values, max=0.0)
        z_new = torch.clamp(spec.qmin - torch.round(lo / s), spec.qmin, spec.qmax).to(z.dtype)
        z = torch.where(low, z_new, z)
    return s, z


def fit_bias_scales(p: Prepared, recipe: Recipe) -> dict[str, tuple[int, ...]]:
    """Make every int32 bias fit: an output channel whose bias would need more than ``BIAS_HEADROOM`` steps of
    ``s_in * s_w`` gets its weight scale raised to ``|b| / (s_in * BIAS_HEADROOM)`` and its weights rounded again
    (nearest) at that scale. Runs right after calibration, before any learned rounding. Returns, per layer, the
    channels it raised (the record keeps them)."""
    raised = {}
    for name in p.layers:
        m = p.gm.get_submodule(name)
        src = p.layer_input.get(name)
        if m.weight_int is None or src is None or m.bias is None:
            continue
        s_in = float(p.gm.get_submodule(src).scale)
        need = m.bias.detach().double().abs() / (s_in * BIAS_HEADROOM)
        sw = m.weight_scale.double()
        bad = need > sw
        if not bad.any():
            continue
        per_channel = sw.ndim == 1
        if per_channel:
            target = torch.where(bad, need, sw)
        else:   # one scale for the layer: all of it is raised
            target, bad = torch.maximum(need.max(), sw), torch.ones_like(bad)
        scale = target.float()
        scale = torch.where(scale.double() < target, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
        spec = QuantSpec(p.weight_bits[name], signed=True, symmetric=recipe.weights.symmetric)
        q = quantize(m.weight.detach().double(), scale.double(), m.weight_zero_point.double(), spec.qmin, spec.qmax,
                     0 if per_channel else None, "nearest").to(torch.int8)
        rows = bad.reshape(-1, *[1] * (q.ndim - 1)).expand_as(q)
        m.weight_int = torch.where(rows, q, m.weight_int)
        m.weight_scale = scale.clone()
        raised[name] = tuple(int(c) for c in torch.nonzero(bad).flatten().tolist())
    return raised


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
        if bq.abs().max() > INT32_MAX:
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
    from qpipe import dist

    n = 0
    with observing(p.gm) as state:
        for i, (x, _) in dist.shard(batches):  # under torchrun: this rank's batches, by global index
            state.batch, state.tokens = i, inputs.attention_mask(x)
            inputs.call(p.gm, x)
            n += inputs.batch_len(x)
    if dist.active():  # every rank gets every batch's records, so all conclude to the single-process scales
        own = {name: p.gm.get_submodule(name).observer.records for name in p.act
               if p.gm.get_submodule(name).source is None}
        parts = dist.gather((n, own))
        n = sum(k for k, _ in parts)
        for _, recs in parts:
            for name, r in recs.items():
                p.gm.get_submodule(name).observer.merge(r)
    if p.act and n == 0:
        raise QpipeError("calibration data is empty")
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is None:
            s, z = aq.observer.qparams()
            aq.scale = torch.tensor(s, dtype=torch.float32)
            aq.zero_point = torch.tensor(z, dtype=torch.int32)
            aq.observer = None
    for name in p.int_ops:  # IntSoftmax writes probabilities at the fixed scale 2^-8, zero point 0
        op = p.gm.get_submodule(name)
        if op.kind == "softmax":
            dst = p.gm.get_submodule(op.out_q)
            dst.scale = torch.tensor(2.0**-OUT_BITS, dtype=torch.float32)
            dst.zero_point = torch.tensor(0, dtype=torch.int32)
    copy_alias_scales(p)
    return n


def copy_alias_scales(p: Prepared) -> None:
    """Quantizers after pass-through ops take their source's scale and zero point."""
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is not None:
            src = p.gm.get_submodule(aq.source)
            aq.scale, aq.zero_point = src.scale.clone(), src.zero_point.clone()


def freeze_int_ops(p: Prepared) -> dict[str, IntOpRecord]:
    """Integer constants of every integer op from the frozen quantizers (after calibration / LSQ)."""
    return {name: p.gm.get_submodule(name).freeze_int() for name in p.int_ops}
