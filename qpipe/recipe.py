"""The recipe: typed, frozen dataclasses read from YAML, validated once with messages for people.

A recipe is a YAML file, or a name of one in ``recipes/`` (``w8a8`` -> ``recipes/w8a8.yaml``). Keys missing from
the file take the defaults below; ``--set weights.bits=4`` overrides any key. The resolved recipe (every
default filled in) is saved in the artifact as ``recipe.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qpipe.errors import QpipeError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
FLOAT_BITS = 32  # "32 bits" means: not quantized, stays float


@dataclass(frozen=True)
class Weights:
    bits: int = 8                     # 2..8, or 32 for float weights
    observer: str = "minmax"          # absmax | minmax | lp_norm | sqnr | mse
    granularity: str = "per_channel"  # per_channel | per_tensor
    symmetric: bool = True
    rounding: str = "nearest"         # nearest | floor | ceil | stochastic (seeded by `seed`)
    p: float = 2.4                    # the p of lp_norm
    first_bits: int | None = None     # override for the first conv/linear (None: same as bits)
    last_bits: int | None = None      # override for the last conv/linear
    only_first: bool = False          # quantize only the first layer (AdaRound Table 1 study)
    embedding_bits: int | None = None  # nn.Embedding tables, per row, symmetric (2..8 or 32 = float); None: 8 where
    #                                    weights are quantized, else float


@dataclass(frozen=True)
class Activations:
    bits: int = 8                     # 2..8, or 32 for float activations
    observer: str = "minmax"          # minmax | ema_minmax | ema_absmax | percentile | mse | sqnr | lp_norm
    symmetric: bool = False           # False: unsigned grid with a zero point (onnxruntime's uint8 layout)
    momentum: float = 0.95            # of the ema_* observers
    percentile: float = 99.99
    p: float = 2.4                    # the p of lp_norm
    residual_bits: int | None = None  # residual-stream adds (not read by a Conv/Linear/matmul): 2..16; None = bits


@dataclass(frozen=True)
class Ops:
    """Transformer non-linearities: ``fp`` (float between Q/DQ) or ``int`` (I-ViT integer ops, ai.qpipe domain)."""

    softmax: str = "fp"
    gelu: str = "fp"
    layernorm: str = "fp"


@dataclass(frozen=True)
class Calibration:
    images: int = 512                 # calibration images (from the training data, never the test split)
    batch_size: int = 64


@dataclass(frozen=True)
class AdaRound:
    """Learned rounding (used when ``weights.rounding: adaround``)."""

    iters: int = 10_000               # per unit
    batch_size: int = 32
    granularity: str = "layer"        # layer | block | encoder | model
    lr: float = 1e-3                  # Adam on V (0.01 also works well: ALGORITHMS.md section 3)
    reg_weight: float = 0.01          # lambda, with the regulariser summed over weights
    beta: tuple[float, float] = (20.0, 2.0)  # annealed start -> end after the warm-up
    warmup: float = 0.2               # share of iterations without the regulariser
    early_stop: float = 1e-5          # stop once lambda * regulariser falls below this
    clip_search: bool = False         # per output channel, first pick the weight clipping whose nearest rounding
    #                                   gives the least error in the layer's output on its calibration inputs
    lsq: bool = False                 # learn activation step sizes (LSQ) jointly, as BRECQ
    lsq_lr: float = 4e-5
    cache_mb: int = 2048              # unit inputs/targets kept in memory up to this, then memory-mapped


@dataclass(frozen=True)
class QAT:
    """Quantization-aware training (``qpipe train --qat``). ``method``: none | apot (additive powers-of-two levels,
    Li et al. 2020) | uniform (uniform levels, the same learnable clipping). With a method set, the quantization
    points are the inputs of every Conv/Linear and the model output; the first and last layers, their inputs and
    the output use ``weights.first_bits`` / ``weights.last_bits`` uniform levels; every other layer the method's
    levels at ``weights.bits`` (weights normalised per layer) and ``activations.bits``."""

    method: str = "none"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.04                  # SGD with momentum on the weights, cosine schedule to 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    alpha_lr_acts: float = 0.1        # the clipping alphas (reference code: 0.1 activations, 0.02 weights)
    alpha_lr_weights: float = 0.02
    alpha_weight_decay: float = 1e-4
    weight_alpha_init: float = 3.0    # alpha of normalised weights (the paper's 3.0)
    act_alpha_init: float | None = None  # None: from the float activations (quantile below); CIFAR paper: 8.0
    act_alpha_quantile: float = 0.999
    augment: bool = True              # random 1-pixel shifts for images of at most 32x32


@dataclass(frozen=True)
class Adder:
    """AdderNet layers (``AdderConv2d``): ``method`` none (float) | adderquant (Nie et al. 2022: filters grouped by
    max |w|, one scale per group shared by its weights and the input it reads, lossless weight clamp) | naive (one
    scale per layer covering weights and activations)."""

    method: str = "none"
    bits: int = 8                     # adder weights and the inputs they read, 2..8
    groups: int = 4                   # k-means groups of output filters (adderquant)
    percentile: float = 99.94         # activation outlier clamp r: running max of this percentile of |x|
    bn_reestimate: bool = True        # BatchNorm statistics of the quantized model, on the calibration images
    input_bits: int = 16              # the quantizer on tensors that adder layers read (each group re-quantizes)


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    fold_bn: bool = True
    seed: int = 0
    weights: Weights = field(default_factory=Weights)
    activations: Activations = field(default_factory=Activations)
    calibration: Calibration = field(default_factory=Calibration)
    adaround: AdaRound = field(default_factory=AdaRound)
    ops: Ops = field(default_factory=Ops)
    qat: QAT = field(default_factory=QAT)
    adder: Adder = field(default_factory=Adder)
    exclude: tuple[str, ...] = ()     # module names kept whole and in float (not traced into, not quantized)

    @property
    def quantizes_weights(self) -> bool:
        return self.weights.bits != FLOAT_BITS

    @property
    def quantizes_activations(self) -> bool:
        return self.activations.bits != FLOAT_BITS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "weights.observer": ("absmax", "minmax", "lp_norm", "sqnr", "mse"),
    "weights.granularity": ("per_channel", "per_tensor"),
    "weights.rounding": ("nearest", "floor", "ceil", "stochastic", "adaround"),
    "adaround.granularity": ("layer", "block", "encoder", "model"),
    "activations.observer": ("minmax", "ema_minmax", "ema_absmax", "percentile", "mse", "sqnr", "lp_norm"),
    "ops.softmax": ("fp", "int"),
    "ops.gelu": ("fp", "int"),
    "ops.layernorm": ("fp", "int"),
    "qat.method": ("none", "apot", "uniform"),
    "adder.method": ("none", "adderquant", "naive"),
}
SECTIONS = {"weights": Weights, "activations": Activations, "calibration": Calibration, "adaround": AdaRound,
            "ops": Ops, "qat": QAT, "adder": Adder}


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string; numeric keys take it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(key: str, value: Any, ftype: str) -> Any:
    if ftype in ("float", "float | None"):
        value = _yaml_float(value)
    if ftype == "bool":
        if not isinstance(value, bool):
            raise QpipeError(f"recipe key {key} must be true or false, got {value!r}")
    elif ftype == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise QpipeError(f"recipe key {key} must be an integer, got {value!r}")
    elif ftype == "int | None":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise QpipeError(f"recipe key {key} must be an integer or null, got {value!r}")
    elif ftype == "float | None":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise QpipeError(f"recipe key {key} must be a number or null, got {value!r}")
        value = None if value is None else float(value)
    elif ftype == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QpipeError(f"recipe key {key} must be a number, got {value!r}")
        value = float(value)
    elif ftype == "tuple[float, float]":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise QpipeError(f"recipe key {key} must be a pair of numbers [start, end], got {value!r}")
        value = (float(value[0]), float(value[1]))
    elif ftype == "tuple[str, ...]":
        if value is None:
            value = ()
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise QpipeError(f"recipe key {key} must be a list of module names, got {value!r}")
        value = tuple(value)
    elif ftype == "str" and not isinstance(value, str):
        raise QpipeError(f"recipe key {key} must be a string, got {value!r}")
    return value


def _build(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise QpipeError(f"recipe section {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + k
        if k not in fields:
            raise QpipeError(f"unknown recipe key {key!r}; known keys: {', '.join(prefix + f for f in fields)}")
        if k in SECTIONS and cls is Recipe:
            kwargs[k] = _build(SECTIONS[k], v, k + ".")
        else:
            kwargs[k] = _check_type(key, v, str(fields[k].type))
    return cls(**kwargs)


def _check_bits(key: str, bits: int | None, allow_float: bool = True) -> None:
    if bits is None or (allow_float and bits == FLOAT_BITS):
        return
    if not 2 <= bits <= 8:
        raise QpipeError(f"recipe key {key} = {bits} is outside 2..8 (use 32 for float)")


def validate(r: Recipe) -> Recipe:
    for key, choices in CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(r, sec), name)
        if value not in choices:
            raise QpipeError(f"recipe key {key} = {value!r} is not one of {', '.join(choices)}")
    _check_bits("weights.bits", r.weights.bits)
    _check_bits("weights.first_bits", r.weights.first_bits)
    _check_bits("weights.last_bits", r.weights.last_bits)
    _check_bits("weights.embedding_bits", r.weights.embedding_bits)
    _check_bits("activations.bits", r.activations.bits)
    rb = r.activations.residual_bits
    if rb is not None and not 2 <= rb <= 16:
        raise QpipeError(f"recipe key activations.residual_bits = {rb} is outside 2..16")
    int_ops = [k for k in ("softmax", "gelu", "layernorm") if getattr(r.ops, k) == "int"]
    if int_ops and not r.quantizes_activations:
        raise QpipeError(f"ops.{int_ops[0]} = int needs quantized activations (activations.bits 2..8), "
                         "because integer ops read integer inputs")
    if r.calibration.images < 1 or r.calibration.batch_size < 1:
        raise QpipeError("calibration.images and calibration.batch_size must be at least 1")
    if not 0 < r.activations.momentum < 1:
        raise QpipeError(f"activations.momentum = {r.activations.momentum} must lie in (0, 1)")
    if not 50 < r.activations.percentile <= 100:
        raise QpipeError(f"activations.percentile = {r.activations.percentile} must lie in (50, 100]")
    if r.weights.p <= 0 or r.activations.p <= 0:
        raise QpipeError("the p of lp_norm must be positive")
    ada = r.adaround
    if ada.iters < 1:
        raise QpipeError(f"adaround.iters = {ada.iters} must be at least 1")
    if ada.batch_size < 1:
        raise QpipeError(f"adaround.batch_size = {ada.batch_size} must be at least 1")
    if not ada.beta[0] >= ada.beta[1] > 0:
        raise QpipeError(f"adaround.beta = {list(ada.beta)} must fall: [start, end] with start >= end > 0 "
                         "(e.g. [20, 2])")
    if not 0 <= ada.warmup < 1:
        raise QpipeError(f"adaround.warmup = {ada.warmup} must lie in [0, 1)")
    for key in ("lr", "lsq_lr"):
        if not getattr(ada, key) > 0:
            raise QpipeError(f"adaround.{key} = {getattr(ada, key)} must be positive")
    if ada.reg_weight < 0 or ada.early_stop < 0 or ada.cache_mb < 0:
        raise QpipeError("adaround.reg_weight, early_stop and cache_mb must not be negative")
    if ada.lsq and not r.quantizes_activations:
        raise QpipeError("adaround.lsq learns activation step sizes, but activations.bits is 32 (float)")
    if r.weights.rounding == "adaround" and not r.quantizes_weights:
        raise QpipeError("weights.rounding = adaround needs quantized weights (weights.bits 2..8)")
    _validate_qat(r)
    d = r.adder
    _check_bits("adder.bits", d.bits, allow_float=False)
    if not 1 <= d.groups <= 64:
        raise QpipeError(f"recipe key adder.groups = {d.groups} is outside 1..64")
    if not 50 < d.percentile <= 100:
        raise QpipeError(f"adder.percentile = {d.percentile} must lie in (50, 100]")
    if not 8 <= d.input_bits <= 16:
        raise QpipeError(f"recipe key adder.input_bits = {d.input_bits} is outside 8..16")
    if d.method != "none" and not r.quantizes_activations:
        raise QpipeError(f"adder.method = {d.method} quantizes the inputs of adder layers: activations.bits must "
                         "be 2..8")
    return r


def _validate_qat(r: Recipe) -> None:
    q = r.qat
    if q.method == "none":
        return
    if not (r.quantizes_weights and r.quantizes_activations):
        raise QpipeError(f"qat.method = {q.method} trains quantized weights and activations: set weights.bits "
                         "and activations.bits (2..8)")
    if q.method == "apot":
        for key in ("weights.bits", "activations.bits"):
            sec, name = key.split(".")
            b = getattr(getattr(r, sec), name)
            if not 2 <= b <= 5:
                raise QpipeError(f"recipe key {key} = {b}: APoT levels exist for 2..5 bits")
    if not r.fold_bn:
        raise QpipeError("qat folds BatchNorm into the exported weight scales: fold_bn must be true")
    if not r.activations.symmetric:
        raise QpipeError("qat needs activations.symmetric: true (learned clipping [0, alpha] or [-alpha, alpha], "
                         "zero point 0)")
    if r.weights.rounding != "nearest":
        raise QpipeError(f"qat projects weights to the nearest level; weights.rounding = {r.weights.rounding} "
                         "does not apply")
    if q.epochs < 1 or q.batch_size < 1:
        raise QpipeError("qat.epochs and qat.batch_size must be at least 1")
    for key in ("lr", "alpha_lr_acts", "alpha_lr_weights", "weight_alpha_init"):
        if not getattr(q, key) > 0:
            raise QpipeError(f"qat.{key} = {getattr(q, key)} must be positive")
    if q.act_alpha_init is not None and not q.act_alpha_init > 0:
        raise QpipeError(f"qat.act_alpha_init = {q.act_alpha_init} must be positive (or null)")
    if not 0 <= q.momentum < 1:
        raise QpipeError(f"qat.momentum = {q.momentum} must lie in [0, 1)")
    if q.weight_decay < 0 or q.alpha_weight_decay < 0:
        raise QpipeError("qat weight decays must not be negative")
    if not 0.5 < q.act_alpha_quantile <= 1:
        raise QpipeError(f"qat.act_alpha_quantile = {q.act_alpha_quantile} must lie in (0.5, 1]")


def set_key(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key=value`` override (value parsed as YAML) to a raw recipe dict."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise QpipeError(f"--set expects key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise QpipeError(f"--set {assignment!r}: value is not valid YAML") from e
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise QpipeError(f"--set {assignment!r}: {p} is not a section")
    node[parts[-1]] = value


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping); errors name ``what``."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QpipeError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise QpipeError(f"{what} {path} must be a YAML mapping")
    return data


def resolve_path(name_or_file: str) -> Path:
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise QpipeError(f"recipe file {name_or_file} does not exist")
        return p
    named = RECIPES_DIR / f"{name_or_file}.yaml"
    if not named.is_file():
        known = sorted(f.stem for f in RECIPES_DIR.glob("*.yaml"))
        raise QpipeError(f"unknown recipe {name_or_file!r}; give a YAML file or one of: {', '.join(known)}")
    return named


def load_recipe(name_or_file: str | dict | Recipe = "w8a8", overrides: list[str] | tuple[str, ...] = (),
                seed: int | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    if isinstance(name_or_file, Recipe):
        data = name_or_file.to_dict()
    elif isinstance(name_or_file, dict):
        data = dict(name_or_file)
    else:
        path = resolve_path(name_or_file)
        data = read_yaml_mapping(path, "recipe")
        data.setdefault("name", path.stem)
    for a in overrides:
        set_key(data, a)
    if seed is not None:
        data["seed"] = seed
    return validate(_build(Recipe, data, ""))


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(r.to_dict(), sort_keys=False)
