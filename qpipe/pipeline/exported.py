"""Capture through ``torch.export``: models that torch.fx cannot trace as they ship (Hugging Face ``transformers``
encoders and vision transformers, whose embeddings slice by a proxied sequence length and whose mask code branches
on ``ndim``) are exported with symbolic batch and sequence dimensions, and the ATen graph is written back into the
torch-level graph the rest of qpipe reads, as if torch.fx had traced hand-written code:

- ``aten.linear`` / ``aten.conv2d`` / ``aten.embedding`` / eval-mode batch norm over the model's own parameters
  become ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` / ``nn.BatchNorm2d`` modules at the parameters' own module
  path (``encoder.layer.0.attention.self.query``), sharing the parameters;
- ``aten.softmax`` / ``aten.gelu`` / ``aten.layer_norm`` become the functional calls that capture turns into
  named modules (``encoder.layer.0.attention.self.softmax``);
- ``aten.scaled_dot_product_attention`` is decomposed into ``q @ kᵀ`` → ``* scale`` → mask → softmax → ``@ v``, so
  the integer softmax applies; a boolean mask becomes ``masked_fill(~mask, -inf)`` and an additive mask built as
  ``where(mask, 0, very negative)`` (eager attention) becomes ``masked_fill`` too: the mask is data, not an
  activation, and is never quantized;
- the view, arithmetic and activation ops map to the torch functions and methods capture recognises; dropout
  (eval), ``contiguous``, clones and export's own shape assertions and guards go.

The rewritten module takes the model's inputs by name (``gm(input_ids=..., attention_mask=...)``) and returns a
flat tuple of tensors; ``gm.meta["qpipe_outputs"]`` names them (``last_hidden_state``, ``pooler_output``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpipe.errors import QpipeError

aten = torch.ops.aten

NEG_MASK = -1e4   # an additive mask value at or below this is a "masked" position (HF writes finfo.min)

# ATen overload -> (torch-level target, "function" | "method"); same positional arguments
_FUNCS = {
    aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub, aten.mul.Tensor: operator.mul,
    aten.mul.Scalar: operator.mul, aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.matmul, aten.reshape.default: torch.reshape,
    aten.transpose.int: torch.transpose, aten.permute.default: torch.permute, aten.flatten.using_ints: torch.flatten,
    aten.cat.default: torch.cat, aten.select.int: torch.select, aten.mean.dim: torch.mean,
    aten.relu.default: torch.relu, aten.tanh.default: torch.tanh, aten.sigmoid.default: torch.sigmoid,
    aten.silu.default: F.silu, aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh, aten.leaky_relu.default: F.leaky_relu, aten.clamp.default: torch.clamp,
    aten.split.Tensor: torch.split, aten.chunk.default: torch.chunk, aten.unbind.int: torch.unbind,
    aten.max_pool2d.default: F.max_pool2d, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d, aten.layer_norm.default: F.layer_norm,
    # sizes as arguments: torch-level, so the TorchScript exporter keeps a traced (dynamic) size dynamic
    aten.arange.default: torch.arange, aten.arange.start: torch.arange, aten.arange.start_step: torch.arange,
    aten.full.default: torch.full, aten.zeros.default: torch.zeros, aten.ones.default: torch.ones,
}
_METHODS = {aten.view.default: "view", aten.unsqueeze.default: "unsqueeze", aten.squeeze.dim: "squeeze",
            aten.expand.default: "expand", aten.sym_size.int: "size", aten.new_ones.default: "new_ones",
            aten.new_zeros.default: "new_zeros"}
_IDENTITY = (aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
             aten.dropout.default)
_DROP = (aten._assert_tensor_metadata.default,)


def export_capture(model: nn.Module, example: dict[str, torch.Tensor]) -> fx.GraphModule:
    """``model`` exported with ``example`` (its inputs by name) and normalised (see the module docstring). Batch
    (dimension 0 of every input) and sequence (dimension 1 of integer inputs and of 3-D float inputs) are
    symbolic where the model allows it."""
    auto = torch.export.Dim.AUTO
    dynamic = {}
    for name, x in example.items():
        dims = {0: auto}
        if x.ndim >= 2 and (not x.is_floating_point() or x.ndim == 3):
            dims[1] = auto
        dynamic[name] = dims
    try:
        with _quiet_torch():
            ep = torch.export.export(model.eval(), (), dict(example), dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        raise QpipeError(f"cannot capture {type(model).__name__} with torch.export either: {_first_line(e)}") from e
    out_spec = ep.call_spec.out_spec
    gm = ep.module()
    names = _output_names(out_spec)
    axes = _dynamic_axes(gm)
    normalise(gm)
    gm = fx.GraphModule(gm, gm.graph, type(model).__name__)   # without export's input-check hooks
    gm.meta["qpipe_outputs"] = names
    gm.meta["qpipe_inputs"] = list(example)
    gm.meta["qpipe_dynamic"] = axes
    return gm


def _dynamic_axes(gm: fx.GraphModule) -> dict[str, list[dict[int, str]]]:
    """The symbolic dimensions export found, by name: every input's dimension 0 is ``batch``; the other symbols
    are ``sequence``, ``sequence_2``, ... in order of first appearance (ids and mask share theirs). Returns
    ``{"inputs": [axes per placeholder], "outputs": [axes per flat output]}``."""
    names: dict[str, str] = {}

    def dims(val) -> dict[int, str]:
        out = {}
        for i, d in enumerate(getattr(val, "shape", ())):
            if isinstance(d, torch.SymInt) and not str(d).isdigit():
                key = str(d)
                if key not in names:
                    k = sum(v.startswith("sequence") for v in names.values())
                    names[key] = "batch" if i == 0 else ("sequence" if k == 0 else f"sequence_{k + 1}")
                out[i] = names[key]
        return out

    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in places:   # batch symbols first, so an output's dimension 0 is named batch whatever its order
        for d in getattr(n.meta.get("val"), "shape", ())[:1]:
            if isinstance(d, torch.SymInt):
                names.setdefault(str(d), "batch")
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_leaves(out_node.args[0])
    return {"inputs": [dims(n.meta.get("val")) for n in places],
            "outputs": [dims(a.meta.get("val")) if isinstance(a, fx.Node) else {} for a in flat]}


@contextlib.contextmanager
def _quiet_torch():
    """torch.export logs warnings and whole graphs while it works; the user gets one line from qpipe instead."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.setLevel(level)


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    where = next((ln for ln in lines if ln.startswith("File ")), "")
    msg = lines[0] if lines else type(e).__name__
    return f"{type(e).__name__}: {msg[:200]}" + (f" ({where[:200]})" if where else "")


def _output_names(spec) -> list[str]:
    """Names of the flat outputs: a ModelOutput's / dict's keys, ``output_i`` for tuples, ``output`` alone."""
    try:
        leaves = spec.num_leaves
    except AttributeError:
        return ["output"]
    ctx = getattr(spec, "context", None)
    children = spec.children()
    if leaves == 1 and not children:
        return ["output"]
    if isinstance(ctx, (list, tuple)) and len(ctx) == leaves and all(isinstance(k, str) for k in ctx) \
            and all(c.num_leaves == 1 for c in children):
        return list(ctx)
    return [f"output_{i}" for i in range(leaves)]


def _path(gm: fx.GraphModule, node) -> str | None:
    """The module path of a get_attr parameter (``a.b.weight`` -> ``a.b``); None for anything else."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node.target.rpartition(".")[0] or None
    return None


def _attr(gm: fx.GraphModule, node):
    if node is None:
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def _module_nodes(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module, fx.Node] | None:
    """(path, module, input) for a layer op over the model's own parameters; None if it is not one."""
    t, a = node.target, node.args
    if t == aten.linear.default:
        w, b = a[1], a[2] if len(a) > 2 else None
        path = _path(gm, w)
        if path is None or (b is not None and _path(gm, b) != path):
            return None
        weight = _attr(gm, w)
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        m.weight = weight
        if b is not None:
            m.bias = _attr(gm, b)
        return path, m, a[0]
    if t == aten.conv2d.default:
        w, b = a[1], a[2] if len(a) > 2 else None
        path = _path(gm, w)
        if path is None or (b is not None and _path(gm, b) != path):
            return None
        weight = _attr(gm, w)
        stride, padding, dilation, groups = (list(a[3:4]) or [1])[0], (list(a[4:5]) or [0])[0], \
            (list(a[5:6]) or [1])[0], (list(a[6:7]) or [1])[0]
        if isinstance(padding, str):
            return None
        m = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                      padding=padding, dilation=dilation, groups=groups, bias=b is not None)
        m.weight = weight
        if b is not None:
            m.bias = _attr(gm, b)
        return path, m, a[0]
    if t == aten.embedding.default:
        path = _path(gm, a[0])
        if path is None:
            return None
        weight = _attr(gm, a[0])
        pad = a[2] if len(a) > 2 and a[2] >= 0 else None
        m = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=pad)
        m.weight = weight
        return path, m, a[1]
    return None


def normalise(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite an exported (ATen) graph in place into the torch-level graph capture reads."""
    g = gm.graph
    g._codegen = fx.graph.CodeGen()   # plain positional placeholders, a flat tuple out
    for node in g.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:   # export keys its module stack by generated names; fx by the module path
            node.meta["nn_module_stack"] = {v[0]: v for v in stack.values()}
    for node in list(g.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            g.erase_node(node)
        elif node.op == "call_function" and node.target in _DROP:
            g.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    placed: set[str] = set()
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        t = node.target
        if t in _IDENTITY:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
            continue
        found = _module_nodes(gm, node)
        if found is not None:
            path, module, x = found
            if path in placed:
                raise QpipeError(f"module {path} is called twice; qpipe needs one call per Conv/Linear/Embedding")
            placed.add(path)
            _install(gm, path, module)
            _replace(g, node, "call_module", path, (x,))
            continue
        if t == aten._native_batch_norm_legit_no_training.default:
            _batch_norm(gm, node)
            continue
        if t == aten.scaled_dot_product_attention.default:
            _decompose_sdpa(g, node)
            continue
        if t == aten.gelu.default:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            _replace(g, node, "call_function", F.gelu, (node.args[0],), {"approximate": approx})
            continue
        if t == aten.softmax.int:   # softmax(x, dim, dtype): a dtype the input already has is no cast
            x, dim = node.args[0], node.args[1]
            dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
            if dtype is None or dtype == _dtype(x):
                _replace(g, node, "call_function", F.softmax, (x,), {"dim": dim})
            continue
        if t in (aten.to.dtype, aten.to.dtype_layout) and _dtype(node.args[0]) is not None \
                and _dtype(node.args[0]) == _dtype(node):
            node.replace_all_uses_with(node.args[0])   # a cast to the dtype it has
            g.erase_node(node)
            continue
        if t == aten.slice.Tensor:
            _slice(g, node)
            continue
        if t in (aten.add.Tensor, aten.sub.Tensor) and (len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1):
            continue   # a scaled operand (alpha): left as ATen
        if t in _FUNCS:
            _replace(g, node, "call_function", _FUNCS[t], node.args, node.kwargs)
        elif t in _METHODS:
            _replace(g, node, "call_method", _METHODS[t], node.args, node.kwargs)
    _additive_masks(g)
    _follow_input_device(g)
    _drop_unused_attrs(gm)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


def _follow_input_device(g: fx.Graph) -> None:
    """Export writes the device it traced on into every tensor it creates (``arange(n, device=cpu)``, masks
    moved ``to(cpu)``); those follow the first input's device instead, so the model runs where it is moved."""
    places = [n for n in g.nodes if n.op == "placeholder"]
    if not places:
        return
    first, dev = places[0], None
    for node in list(g.nodes):
        has = [k for k, v in node.kwargs.items() if isinstance(v, torch.device)]
        pos = [i for i, v in enumerate(node.args) if isinstance(v, torch.device)]
        if not has and not pos:
            continue
        if dev is None:
            with g.inserting_after(places[-1]):
                dev = g.call_function(getattr, (first, "device"))
        node.kwargs = {k: (dev if k in has else v) for k, v in node.kwargs.items()}
        node.args = tuple(dev if i in pos else v for i, v in enumerate(node.args))


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def _replace(g: fx.Graph, node: fx.Node, op: str, target, args, kwargs=None) -> fx.Node:
    """A new node (op, target, args, kwargs) in place of ``node``, with its meta and its users."""
    with g.inserting_before(node):
        new = g.create_node(op, target, tuple(args), dict(kwargs or {}))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    g.erase_node(node)
    return new


def _slice(g: fx.Graph, node: fx.Node) -> None:
    """``aten.slice(x, dim, start, end, step)`` as ``x[:, ..., start:end:step]`` (a pass-through getitem)."""
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if not isinstance(dim, int) or dim < 0:
        return
    if isinstance(end, int) and end >= 2**62:
        end = None
    idx = (slice(None),) * dim + (slice(start, end, None if step == 1 else step),)
    _replace(g, node, "call_function", operator.getitem, (x, idx))


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    """Eval-mode batch norm (a tuple; its item 0 is the output) as an ``nn.BatchNorm2d`` module."""
    x, w, b, mean, var, _momentum, eps = node.args
    path = _path(gm, w) or _path(gm, mean)
    users = list(node.users)
    if path is None or not all(u.target is operator.getitem for u in users):
        return
    rm = _attr(gm, mean)
    m = nn.BatchNorm2d(rm.shape[0], eps=eps, affine=w is not None)
    if w is not None:
        m.weight, m.bias = _attr(gm, w), _attr(gm, b)
    m.running_mean, m.running_var = rm, _attr(gm, var)
    m.eval()
    _install(gm, path, m)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
    new.meta = dict(node.meta)
    for u in users:
        if u.args[1] == 0:
            u.replace_all_uses_with(new)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)


def _decompose_sdpa(g: fx.Graph, node: fx.Node) -> None:
    """``scaled_dot_product_attention(q, k, v, mask, dropout, is_causal, scale)`` as its own math."""
    args = list(node.args) + [None] * (7 - len(node.args))
    q, k, v, mask, _drop, causal, scale = args[:7]
    mask = node.kwargs.get("attn_mask", mask)
    causal = bool(node.kwargs.get("is_causal", causal))
    scale = node.kwargs.get("scale", scale)
    if node.kwargs.get("enable_gqa"):
        raise QpipeError("scaled_dot_product_attention with enable_gqa is not supported yet")
    meta = {key: val for key, val in node.meta.items() if key != "val"}
    made: list[fx.Node] = []

    def call(op: str, target, args, kwargs=None) -> fx.Node:
        n = g.create_node(op, target, args, kwargs or {})
        n.meta = dict(meta)
        made.append(n)
        return n

    with g.inserting_before(node):
        kt = call("call_function", torch.transpose, (k, -2, -1))
        scores = call("call_function", torch.matmul, (q, kt))
        if scale is None:
            head = q.meta["val"].shape[-1] if "val" in q.meta else None
            if head is None or not isinstance(head, int):
                raise QpipeError("scaled_dot_product_attention: the head size is not known; pass scale=")
            scale = 1.0 / math.sqrt(head)
        scores = call("call_function", operator.mul, (scores, float(scale)))
        if causal:
            rows = call("call_method", "size", (q, -2))
            cols = call("call_method", "size", (k, -2))
            ones = call("call_function", torch.ones, ((rows, cols),), {"dtype": torch.bool})
            keep = call("call_method", "tril", (ones,))
            drop = call("call_function", torch.logical_not, (keep,))
            scores = call("call_method", "masked_fill", (scores, drop, float("-inf")))
        if mask is not None:
            dtype = mask.meta["val"].dtype if "val" in mask.meta else None
            if dtype == torch.bool:
                drop = call("call_function", torch.logical_not, (mask,))
                scores = call("call_method", "masked_fill", (scores, drop, float("-inf")))
            else:
                scores = call("call_function", operator.add, (scores, mask))
        probs = call("call_function", F.softmax, (scores, -1))
        out = call("call_function", torch.matmul, (probs, v))
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _additive_masks(g: fx.Graph) -> None:
    """``scores + where(keep, 0, c)`` with ``c`` very negative (eager attention's additive mask) becomes
    ``scores.masked_fill(~keep, c)``: the mask is data, and a quantized add would spend its grid on ``c``."""
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not operator.add or len(node.args) != 2:
            continue
        for i in (0, 1):
            m = node.args[i]
            if not (isinstance(m, fx.Node) and m.op == "call_function" and m.target == aten.where.ScalarOther):
                continue
            cond, zero, c = m.args
            if not (isinstance(c, (int, float)) and c <= NEG_MASK and _is_zero(zero)):
                continue
            x = node.args[1 - i]
            with g.inserting_before(node):
                drop = g.call_function(torch.logical_not, (cond,))
                new = g.call_method("masked_fill", (x, drop, float(c)))
            drop.meta = dict(m.meta)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            break


def _is_zero(n) -> bool:
    if isinstance(n, (int, float)):
        return n == 0
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target in (aten.zeros.default, aten.zeros_like.default):
        return True
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target == aten.scalar_tensor.default:
        return n.args[0] == 0
    return False


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
