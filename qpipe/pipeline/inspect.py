"""``qpipe inspect``: the quantization points that graph capture finds in a model, before any calibration:
every Conv/Linear/adder layer, activation matmul, softmax, GELU, LayerNorm, residual add, concatenation and
pooling, with the quantizers on its inputs and output and their bits."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from qpipe.kinds import REGISTRY, Kind
from qpipe.recipe import FLOAT_BITS, Recipe, load_recipe

from .capture import _owner
from .qmodel import ActQuant, _in_excluded, _IntOpMixin, embedding_bits, kind_of, prepare

POINT_KINDS = tuple(k for k, spec in REGISTRY.items() if spec.label is not None)


def _describe(aq: ActQuant) -> str:
    kind = aq.levels.kind if aq.levels is not None else ("int" if aq.spec.signed else "uint")
    return f"{aq.qname} ({kind}{aq.spec.bits})"


def _input_quantizer(arg, modules) -> str:
    while isinstance(arg, fx.Node):
        if arg.op == "call_module" and isinstance(modules.get(arg.target), ActQuant):
            return _describe(modules[arg.target])
        if kind_of(arg, modules) == Kind.LAYER:
            return f"accumulator of {arg.target}"
        if kind_of(arg, modules) in (Kind.PASS, Kind.SPLIT) and arg.args:
            arg = arg.args[0]
            continue
        if arg.op == "get_attr":
            return "constant"
        return "float"
    return "constant"


def _float_source(arg, modules, exclude) -> str:
    """Why a layer's input stays float: the op it comes from (through pass-through ops)."""
    while isinstance(arg, fx.Node) and kind_of(arg, modules) in (Kind.PASS, Kind.SPLIT) and arg.args:
        arg = arg.args[0]
    if not isinstance(arg, fx.Node):
        return "it reads a constant"
    kind = kind_of(arg, modules)
    if arg.op == "call_module":
        what = f"{arg.target} ({type(modules[arg.target]).__name__})"
    else:
        what = f"{arg.name} ({getattr(arg.target, '__name__', arg.target)})"
    if arg.op == "call_module" and arg.target in exclude:
        return f"it reads {what}, which the recipe excludes (exclude: [...])"
    return (f"it reads {what}, an op qpipe does not quantize ({kind}); its output gets no quantizer, so the layer "
            "runs in float in onnxruntime")


def _output_quantizer(node: fx.Node, modules) -> str:
    if kind_of(node, modules) == Kind.LAYER and node.users and all(kind_of(u, modules) == Kind.ADD for u in node.users):
        return "accumulator (to the add)"
    cur = node
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if u.op == "call_module" and isinstance(modules.get(u.target), ActQuant):
            return _describe(modules[u.target])
        if kind_of(u, modules) in (Kind.BN, Kind.RELU, Kind.SCALE):
            cur = u
            continue
        break
    return "float"


def _integer(node: fx.Node) -> str | None:
    """``name (int64)`` for an integer tensor (token ids, positions: read as they are), else None."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point:
        return f"{node.name} ({str(val.dtype).removeprefix('torch.')})"
    return None


def quantization_points(model: nn.Module, recipe: Recipe | str = "w8a8") -> list[dict]:
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    p = prepare(copy.deepcopy(model), r)
    modules = dict(p.gm.named_modules())
    rows = []
    for node in p.gm.graph.nodes:
        k = kind_of(node, modules)
        if _in_excluded(node, r.exclude):
            if node.op != "call_module" or k not in (Kind.LAYER, Kind.EMBEDDING):
                continue   # an op inside a float module: not a quantization point
            k = Kind.EXCLUDED
        if k not in POINT_KINDS or (k == Kind.INPUT and not node.users):
            continue
        m = modules.get(node.target) if node.op == "call_module" else None
        op = REGISTRY[k].label
        if k == Kind.LAYER:
            op = "conv" if isinstance(m, nn.Conv2d) else "linear"
        if isinstance(m, _IntOpMixin) and m.kind == k:
            op = REGISTRY[k].int_op
        weight = None
        if k == Kind.ADDER and r.adder.method != "none":
            weight = r.adder.bits
        elif k == Kind.LAYER and node.target in p.layers:
            b = p.weight_bits[node.target]
            weight = None if b == FLOAT_BITS else b
        elif k == Kind.EMBEDDING and node.target in p.embeddings:
            weight = embedding_bits(r)
        tensors = [a for a in node.args if isinstance(a, fx.Node)] if k not in (Kind.INPUT, Kind.CAT) else (
            [a for a in node.args[0]] if k == Kind.CAT else [])
        owner = _owner(node)
        name = node.target if node.op == "call_module" else (f"{owner}.{node.name}" if owner else node.name)
        inputs = [_integer(a) or _input_quantizer(a, modules) for a in tensors]
        row = {"name": name, "module": owner, "op": op, "inputs": inputs,
               "output": _output_quantizer(node, modules), "weight_bits": weight}
        if k == Kind.LAYER and r.quantizes_activations and inputs and inputs[0] == "float":
            row["warning"] = f"{name} ({op}) has a float input: {_float_source(tensors[0], modules, r.exclude)}"
        rows.append(row)
    return rows


def format_points(rows: list[dict]) -> str:
    cols = ["name", "op", "inputs", "output", "weight bits"]
    cells = [[r["name"], r["op"], ", ".join(r["inputs"]) or "-", r["output"],
              "-" if r["weight_bits"] is None else str(r["weight_bits"])] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda v: "  ".join(s.ljust(w) for s, w in zip(v, width, strict=True)).rstrip()
    counts = {}
    for r in rows:
        counts[r["op"]] = counts.get(r["op"], 0) + 1
    summary = ", ".join(f"{n} {op}" for op, n in counts.items())
    warnings = [f"warning: {r['warning']}" for r in rows if r.get("warning")]
    return "\n".join([line(cols), line(["-" * w for w in width]), *(line(c) for c in cells), "", summary, *warnings])
