"""The op kinds of a captured graph, and the one registry that says how each kind is quantized and exported.

Graph capture sorts every node of a model into a ``Kind``. ``REGISTRY[kind]`` then names, for that kind, the
PyTorch Q-module that replaces it (``prepare``), its step in the integer-only model (``to_int``), the QDQ
exporter's emitter for what it leaves in the marked float graph, the ONNX emitter of its integer form and the
label ``qpipe inspect`` prints. The names are ``module:attribute`` strings resolved on use, so this module
imports no stage and each stage loads only its own pieces. Adding a kind is one entry here and that kind's own
functions in each stage.
"""

from __future__ import annotations

import enum
import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from qpipe.onnx_names import INT_GELU, INT_LAYERNORM, INT_SOFTMAX


class Kind(str, enum.Enum):
    """What a node of the captured graph is (``qpipe.pipeline.qmodel.kind_of``)."""

    INPUT = "input"            # a graph input
    LAYER = "layer"            # Conv2d / Linear: integer weights, int32 bias
    EMBEDDING = "embedding"    # nn.Embedding: a table of integer rows (per-row scale), read by integer ids
    ADDER = "adder"            # AdderNet layer (AdderQuant: grouped integer codes)
    MATMUL = "matmul"          # a product of two activations (attention)
    SOFTMAX = "softmax"
    GELU = "gelu"
    LAYERNORM = "layernorm"
    ADD = "add"                # residual add of two tensors
    CAT = "cat"                # torch.cat
    POOL = "pool"              # average pooling / mean
    EXCLUDED = "excluded"      # a module the recipe keeps whole and float (``exclude:``)
    ACTIVATION = "activation"  # SiLU, Hardswish, Sigmoid, LeakyReLU, PReLU, Tanh, ...: float between Q/DQ
    MUL = "mul"                # a product of two tensors (squeeze-excite's x * sigmoid(s))
    RELU = "relu"              # taken with the producer before it (its output grid starts at the zero point)
    BN = "bn"                  # BatchNorm: folded into the layer before it, or kept after an adder
    SCALE = "scale"            # multiplication / division by a constant number: folded into the requantisation
    PASS = "pass"              # reshape, permute, max-pool, dropout, ...: values pass through on the same grid
    SPLIT = "split"            # unbind / chunk / split: each item passes through on the input's grid
    QUANTIZER = "aq"           # an activation quantizer qpipe inserted
    OTHER = "other"            # anything else (shape arithmetic, constants, ...)

    def __str__(self) -> str:      # in messages: "ops.softmax", not "ops.Kind.SOFTMAX"
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class KindSpec:
    """How one kind is quantized and exported; ``None`` where the kind has no such piece."""

    label: str | None = None          # qpipe inspect's op column (None: not listed as a quantization point)
    quantized_output: bool = False    # its output gets its own activation quantizer
    q_module: str | None = None       # factory of the Q-module that replaces it: f(module, name, recipe)
    int_module: str | None = None     # its step of the integer-only rewrite (builds the integer module)
    qdq_emitter: str | None = None    # QDQ export of what it leaves in graph.onnx (its marks)
    int_emitter: str | None = None    # the ONNX nodes of its integer form, from graph.onnx and the record
    onnx_ops: tuple[str, ...] = ()    # the op types it appears as in graph.onnx (the int emitter's dispatch)
    int_op: str | None = None         # the ai.qpipe op of its I-ViT integer form (recipe ops.<kind>: int)


_P = "qpipe.pipeline.qmodel:"
_I = "qpipe.pipeline.intmodel:Rewriter."
_X = "qpipe.export.qdq:"
_N = "qpipe.export.intgraph:IntGraph."
ACTIVATION_QDQ = _X + "activation_nodes"   # Clip -> QuantizeLinear -> DequantizeLinear (or APoTProject) on a mark
PASSING = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Identity", "Expand", "Slice",
           "Split", "Dropout", "MaxPool", "Where", "Pad")   # ONNX ops of pass-through kinds (Where: masked_fill)

REGISTRY: Mapping[Kind, KindSpec] = MappingProxyType({
    Kind.INPUT: KindSpec("input", True, None, _I + "visit_input", ACTIVATION_QDQ, _N + "visit_quantizer"),
    Kind.LAYER: KindSpec("linear", True, _P + "to_q_layer", _I + "visit_layer", _X + "weight_nodes",
                         _N + "visit_layer", ("Conv", "Gemm")),
    # its weight marks are exported by the layers' weight emitter (DequantizeLinear per row, then the Gather); in
    # the integer graph the table is requantized to the output grid once, at export, and gathered
    Kind.EMBEDDING: KindSpec("embedding", True, _P + "to_q_embedding", _I + "visit_embedding", _X + "weight_nodes",
                             _N + "visit_embedding"),
    Kind.ADDER: KindSpec("adder", True, _P + "to_q_adder", _I + "visit_adder", _X + "adder_nodes",
                         _N + "visit_adder", ("Adder", "Adder2d")),
    Kind.MATMUL: KindSpec("matmul", True, None, _I + "visit_matmul", ACTIVATION_QDQ, _N + "visit_matmul",
                          ("MatMul",)),
    Kind.SOFTMAX: KindSpec("softmax", True, _P + "to_int_op", _I + "visit_int_op", _X + "int_op_nodes",
                           _N + "visit_int_op", ("IntOp",), INT_SOFTMAX),
    Kind.GELU: KindSpec("gelu", True, _P + "to_int_op", _I + "visit_int_op", _X + "int_op_nodes",
                        _N + "visit_int_op", ("IntOp",), INT_GELU),
    Kind.LAYERNORM: KindSpec("layernorm", True, _P + "to_int_op", _I + "visit_int_op", _X + "int_op_nodes",
                             _N + "visit_int_op", ("IntOp",), INT_LAYERNORM),
    Kind.ADD: KindSpec("add", True, None, _I + "visit_add", ACTIVATION_QDQ, _N + "visit_add", ("Add",)),
    Kind.CAT: KindSpec("concat", True, None, _I + "visit_cat", ACTIVATION_QDQ, _N + "visit_cat", ("Concat",)),
    Kind.POOL: KindSpec("pool", True, None, _I + "visit_pool", ACTIVATION_QDQ, _N + "visit_pool",
                        ("GlobalAveragePool", "ReduceMean", "AveragePool")),
    Kind.EXCLUDED: KindSpec("float (excluded)", False, None, None, ACTIVATION_QDQ, None),
    # QDQ: DQ -> op -> Q, which onnxruntime fuses into QLinearSigmoid / QLinearLeakyRelu where it has such a kernel;
    # integer graph: a lookup table over the input's codes (functions of one ONNX op; SiLU and PReLU have none)
    Kind.ACTIVATION: KindSpec("activation", True, None, _I + "visit_activation", ACTIVATION_QDQ,
                              _N + "visit_activation", ("Tanh", "Sigmoid", "HardSwish", "HardSigmoid", "Elu",
                                                        "LeakyRelu", "Gelu")),   # Gelu: a float GELU (ops.gelu: fp)
    # no integer form yet (the integer-only graph says so)
    Kind.MUL: KindSpec("mul", True, None, None, ACTIVATION_QDQ, None),
    Kind.RELU: KindSpec(int_module=_I + "visit_relu", int_emitter=_N + "visit_relu", onnx_ops=("Relu", "Clip")),
    Kind.BN: KindSpec(int_module=_I + "visit_bn", int_emitter=_N + "visit_bn", onnx_ops=("BatchNormalization",)),
    Kind.SCALE: KindSpec(int_module=_I + "visit_scale", int_emitter=_N + "visit_scale", onnx_ops=("Mul", "Div")),
    Kind.PASS: KindSpec(int_module=_I + "visit_pass", int_emitter=_N + "visit_pass", onnx_ops=PASSING),
    Kind.SPLIT: KindSpec(int_module=_I + "visit_pass", int_emitter=_N + "visit_pass"),
    Kind.QUANTIZER: KindSpec(q_module=_P + "ActQuant", int_module=_I + "visit_quantizer", qdq_emitter=ACTIVATION_QDQ,
                             int_emitter=_N + "visit_quantizer", onnx_ops=("Mark",)),
    Kind.OTHER: KindSpec(int_module=_I + "visit_pass", int_emitter=_N + "visit_pass"),
})

QUANTIZED_KINDS = frozenset(k for k, spec in REGISTRY.items() if spec.quantized_output)
INT_OP_KINDS = MappingProxyType({spec.int_op: k for k, spec in REGISTRY.items() if spec.int_op})  # op -> kind


@functools.cache
def resolve(ref: str):
    """The object a ``module:attribute.path`` name stands for."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def spec(kind: Kind) -> KindSpec:
    return REGISTRY[kind]
