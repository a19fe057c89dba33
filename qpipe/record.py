"""The frozen quantization record: what every quantized tensor, layer and integer op of an artifact is.

Calibration, QAT freezing, AdderQuant freezing and the integer-op freeze write it; QDQ export, integer export,
diagnose, check, inspect and the CLI read it. ``qparams.json`` is its serialisation (``to_json`` /
``from_json``); the integers themselves live in ``quantized.safetensors`` under the key names defined here.
Each fact is stored once: a layer's weight bit width is its weight encoding's ``bits``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from qpipe.errors import QpipeError
from qpipe.recipe import FLOAT_BITS  # a tensor left in float

FORMAT = 1

# quantized.safetensors: buffers of a quantized Conv / Linear (``<layer>.<buffer>``)
WEIGHT_INT = "weight_int"               # int8 container of the 2..8-bit weight codes
WEIGHT_SCALE = "weight_scale"           # float32, per output channel (axis 0) or a scalar
WEIGHT_ZERO_POINT = "weight_zero_point"  # int32, same shape as the scale
BIAS_INT = "bias_int"                   # int32 at scale s_in * s_w
BIAS_SCALE = "bias_scale"               # float32 per output channel
# ... of an AdderQuant layer
GROUP = "group"                         # (O,) filter group of each output channel
GROUP_SCALE = "group_scale"             # (G,) S per group, float32
CLAMP_BIAS = "clamp_bias"               # (O,) lossless-clamp bias, float32
ADDER_BITS = "bits"                     # scalar bit width of the adder codes
# ... of an activation quantizer (``<quantizer>.<buffer>``)
ACT_SCALE = "scale"
ACT_ZERO_POINT = "zero_point"


def int_key(tensor: str) -> str:
    """The state-dict key of a quantized tensor's integers: ``conv1.weight`` -> ``conv1.weight_int``."""
    return f"{tensor}_int"


def state_key(module: str, buffer: str) -> str:
    return f"{module}.{buffer}" if module else buffer


def grid_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a b-bit grid: [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class TensorKind(str, enum.Enum):
    WEIGHT = "weight"
    BIAS = "bias"
    ACTIVATION = "activation"


@dataclass(frozen=True)
class LevelSet:
    """A learned-clipping (QAT) level set: ``apot`` (non-uniform, integer codes over ``denominator``) or
    ``uniform``; ``alpha`` is the learned clipping value."""

    kind: str
    denominator: int
    alpha: float
    normalized: bool | None = None          # weights: normalised per layer before projection
    fine_step: float | None = None          # APoT activations: the fine uniform cell APoTProject rounds to
    table: tuple[int, ...] | None = None    # ... and the table from fine cells to level codes
    codes: tuple[int, ...] | None = None    # ... the level codes themselves

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"levels": self.kind, "denominator": self.denominator, "alpha": self.alpha}
        for k in ("normalized", "fine_step", "table", "codes"):
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LevelSet | None:
        if "levels" not in d:
            return None
        tup = lambda k: tuple(int(v) for v in d[k]) if d.get(k) is not None else None
        return cls(d["levels"], int(d["denominator"]), float(d["alpha"]), d.get("normalized"),
                   d.get("fine_step"), tup("table"), tup("codes"))


@dataclass(frozen=True)
class Encoding:
    """How one tensor is quantized: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``.

    ``scale`` / ``zero_point`` are tuples along ``axis`` (per channel) or numbers (per tensor); ``levels`` is set
    for non-uniform or learned-clipping (QAT) grids."""

    kind: TensorKind
    bits: int
    signed: bool
    symmetric: bool
    axis: int | None
    scale: float | tuple[float, ...]
    zero_point: int | tuple[int, ...]
    rounding: str | None = None
    observer: str | None = None
    shape: tuple[int, ...] | None = None
    levels: LevelSet | None = None

    @property
    def qmin(self) -> int:
        return grid_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return grid_range(self.bits, self.signed)[1]

    @property
    def apot(self) -> bool:
        return self.levels is not None and self.levels.kind == "apot"

    def to_json(self) -> dict[str, Any]:
        listed = lambda v: list(v) if isinstance(v, tuple) else v
        out: dict[str, Any] = {"kind": self.kind.value, "bits": self.bits, "signed": self.signed,
                               "symmetric": self.symmetric, "axis": self.axis, "scale": listed(self.scale),
                               "zero_point": listed(self.zero_point)}
        for k in ("rounding", "observer", "shape"):
            v = getattr(self, k)
            if v is not None:
                out[k] = listed(v)
        if self.levels is not None:
            out.update(self.levels.to_json())
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Encoding:
        tup = lambda v, t: tuple(t(x) for x in v) if isinstance(v, list) else t(v)
        return cls(TensorKind(d["kind"]), int(d["bits"]), bool(d["signed"]), bool(d["symmetric"]), d.get("axis"),
                   tup(d["scale"], float), tup(d["zero_point"], int), d.get("rounding"), d.get("observer"),
                   tuple(d["shape"]) if d.get("shape") is not None else None, LevelSet.from_json(d))


@dataclass(frozen=True)
class LayerRecord:
    """A quantized Conv / Linear: its ONNX op, the activation quantizer feeding it (None: a float input), the
    SQNR of its integer weights, and the output channels whose weight scale was raised so that their int32 bias
    fits (``fit_bias_scales``). The weight encoding is ``tensors['<layer>.weight']``."""

    op: str
    input: str | None
    sqnr_db: float | None = None
    bias_fit_channels: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "input": self.input}
        if self.sqnr_db is not None:
            out["sqnr_db"] = self.sqnr_db
        if self.bias_fit_channels:
            out["bias_fit_channels"] = list(self.bias_fit_channels)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerRecord:
        return cls(d["op"], d.get("input"), d.get("sqnr_db"), tuple(d.get("bias_fit_channels") or ()))


@dataclass(frozen=True)
class IntOpRecord:
    """The frozen constants of one I-ViT integer op (IntSoftmax / IntGELU: ``x0``; IntLayerNorm: per-channel
    ``m``, shift ``k``, bias ``b`` and the output grid), between quantizers ``input`` and ``output``."""

    op: str
    input: str
    output: str
    input_scale: float
    input_zero_point: int
    output_scale: float
    x0: int | None = None
    m: tuple[int, ...] | None = None
    k: int | None = None
    b: tuple[int, ...] | None = None
    zero_point: int | None = None
    qmin: int | None = None
    qmax: int | None = None
    eps: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "input": self.input, "output": self.output,
                               "input_scale": self.input_scale, "input_zero_point": self.input_zero_point}
        if self.x0 is not None:
            out.update(x0=self.x0, output_scale=self.output_scale)
            return out
        out.update(m=list(self.m), k=self.k, b=list(self.b), zero_point=self.zero_point, qmin=self.qmin,
                   qmax=self.qmax, output_scale=self.output_scale, eps=self.eps)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IntOpRecord:
        tup = lambda k: tuple(int(v) for v in d[k]) if d.get(k) is not None else None
        return cls(d["op"], d["input"], d["output"], float(d["input_scale"]), int(d["input_zero_point"]),
                   float(d["output_scale"]), d.get("x0"), tup("m"), d.get("k"), tup("b"), d.get("zero_point"),
                   d.get("qmin"), d.get("qmax"), d.get("eps"))


@dataclass(frozen=True)
class AdderGroup:
    scale: float     # S: the group's weight and input range
    filters: int


@dataclass(frozen=True)
class AdderRecord:
    """An AdderQuant layer: its input quantizer, code bits, method, activation range r and filter groups.
    The codes, group of each filter, group scales and clamp bias are in quantized.safetensors."""

    input: str | None
    bits: int
    method: str
    range: float
    groups: tuple[AdderGroup, ...]
    clamped_filters: int
    weight_sqnr_db: float
    stride: int
    padding: int

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["groups"] = [dataclasses.asdict(g) for g in self.groups]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AdderRecord:
        groups = tuple(AdderGroup(float(g["scale"]), int(g["filters"])) for g in d["groups"])
        return cls(d.get("input"), int(d["bits"]), d["method"], float(d["range"]), groups,
                   int(d["clamped_filters"]), float(d["weight_sqnr_db"]), d["stride"], d["padding"])


@dataclass(frozen=True)
class IntGraph:
    """Whether the artifact has an integer-only graph, and why not."""

    available: bool
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"available": True} if self.available else {"available": False, "reason": self.reason}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: its ONNX name, dtype (NumPy name), a shape seen in calibration (batch included)
    and its dynamic axes by name (``{0: "batch", 1: "sequence"}``); an output also names the quantizer whose grid
    its values lie on (None: float)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    dynamic: dict[int, str]
    quantizer: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
               "dynamic": {str(k): v for k, v in self.dynamic.items()}}
        if self.quantizer is not None:
            out["quantizer"] = self.quantizer
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(int(v) for v in d["shape"]),
                   {int(k): str(v) for k, v in d["dynamic"].items()}, d.get("quantizer"))

    @property
    def is_integer(self) -> bool:
        return not self.dtype.startswith(("float", "bfloat"))


def dummy_arrays(specs: tuple[TensorSpec, ...], batch: int = 2) -> list:
    """One NumPy array per spec at its calibration shape with ``batch`` samples: integers are ones (a token id
    and an attention mask that keeps every position), floats zeros. For tracing and shape propagation."""
    import numpy as np

    out = []
    for sp in specs:
        shape = (batch, *sp.shape[1:])
        out.append(np.ones(shape, dtype=sp.dtype) if sp.is_integer else np.zeros(shape, dtype=sp.dtype))
    return out


@dataclass(frozen=True)
class QuantRecord:
    """Everything an artifact's quantization is, in one frozen value (``qparams.json``).

    ``input_shape``: one sample of the (first) input; ``inputs`` / ``outputs``: the graph's inputs and outputs by
    name (empty in records written before they existed: one float input ``input`` and one output ``logits``, see
    ``input_specs`` / ``output_specs``); ``axis_limits``: the largest size a dynamic axis may take (``sequence``:
    the model's position table)."""

    input_shape: tuple[int, ...]
    output_quantizer: str | None
    tensors: dict[str, Encoding]
    layers: dict[str, LayerRecord]
    intops: dict[str, IntOpRecord] = field(default_factory=dict)
    adders: dict[str, AdderRecord] | None = None
    int_graph: IntGraph | None = None
    adaround: tuple[dict[str, Any], ...] | None = None   # per-unit reconstruction report
    qat: dict[str, Any] | None = None                     # training report (history, alpha init, ...)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    axis_limits: dict[str, int] = field(default_factory=dict)

    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.inputs or (TensorSpec("input", "float32", (2, *self.input_shape), {0: "batch"}),)

    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.outputs or (TensorSpec("logits", "float32", (), {0: "batch"}, self.output_quantizer),)

    def weight(self, layer: str) -> Encoding | None:
        return self.tensors.get(f"{layer}.weight")

    def weight_bits(self, layer: str) -> int:
        """The layer's weight bit width (FLOAT_BITS when its weights stay float)."""
        enc = self.weight(layer)
        return enc.bits if enc is not None else FLOAT_BITS

    def quantized_layers(self) -> list[str]:
        return [n for n in self.layers if self.weight(n) is not None]

    def output_scale(self, i: int = 0) -> float | None:
        """The step of output ``i``'s quantizer (parity is measured in it), None when that output is float."""
        q = self.output_specs()[i].quantizer
        return None if q is None else float(self.tensors[q].scale)

    def replace(self, **changes) -> QuantRecord:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "input_shape": list(self.input_shape),
                               "output_quantizer": self.output_quantizer,
                               "tensors": {k: v.to_json() for k, v in self.tensors.items()},
                               "layers": {k: v.to_json() for k, v in self.layers.items()},
                               "intops": {k: v.to_json() for k, v in self.intops.items()}}
        if self.adders is not None:
            out["adders"] = {k: v.to_json() for k, v in self.adders.items()}
        if self.adaround is not None:
            out["adaround"] = list(self.adaround)
        if self.qat is not None:
            out["qat"] = self.qat
        if self.int_graph is not None:
            out["int_graph"] = self.int_graph.to_json()
        if self.inputs:
            out["inputs"] = [t.to_json() for t in self.inputs]
        if self.outputs:
            out["outputs"] = [t.to_json() for t in self.outputs]
        if self.axis_limits:
            out["axis_limits"] = dict(self.axis_limits)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "qparams.json") -> QuantRecord:
        if d.get("format") != FORMAT:
            raise QpipeError(f"{where}: unknown record format {d.get('format')!r} (this qpipe reads {FORMAT})")
        try:
            ig = d.get("int_graph")
            return cls(
                input_shape=tuple(int(v) for v in d["input_shape"]),
                output_quantizer=d.get("output_quantizer"),
                tensors={k: Encoding.from_json(v) for k, v in d["tensors"].items()},
                layers={k: LayerRecord.from_json(v) for k, v in d["layers"].items()},
                intops={k: IntOpRecord.from_json(v) for k, v in (d.get("intops") or {}).items()},
                adders={k: AdderRecord.from_json(v) for k, v in d["adders"].items()} if "adders" in d else None,
                int_graph=IntGraph(bool(ig.get("available")), ig.get("reason")) if ig is not None else None,
                adaround=tuple(d["adaround"]) if d.get("adaround") is not None else None,
                qat=d.get("qat"),
                inputs=tuple(TensorSpec.from_json(t) for t in d.get("inputs") or ()),
                outputs=tuple(TensorSpec.from_json(t) for t in d.get("outputs") or ()),
                axis_limits={str(k): int(v) for k, v in (d.get("axis_limits") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise QpipeError(f"{where} is not a valid quantization record ({type(e).__name__}: {e})") from e
