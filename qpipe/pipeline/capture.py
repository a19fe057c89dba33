"""Graph capture: the user's ``nn.Module`` as written, traced by torch.fx and normalised so that the quantization
points follow from the graph.

- ``F.softmax`` / ``torch.softmax`` / ``Tensor.softmax``, ``F.gelu`` and ``F.layer_norm`` (with parameter
  weights) become ``nn.Softmax`` / ``nn.GELU`` / ``nn.LayerNorm`` modules, named after the module that called them
  (``blocks.0.attn.softmax``), so the recipe's ``ops`` (float or I-ViT integer) apply to them like to modules;
- ``@`` / ``torch.matmul`` / ``torch.bmm`` between activations, residual ``+``, ``torch.cat``, ``flatten`` /
  ``mean`` and ``F.relu`` are recognised where they are (``qmodel.kind_of``);
- ``exclude: [module names]`` keeps those modules whole and in float (they are not traced into);
- a module that cannot be traced (data-dependent control flow, an unsupported construct) fails with one line that
  names it, its type and the problem, and says how to exclude it;
- models that torch.fx cannot trace as they ship (Hugging Face ``transformers`` models, or any model fx fails on
  when example inputs are known) go through ``torch.export`` instead (``qpipe.pipeline.exported``): symbolic batch
  and sequence dimensions, named inputs, the ATen graph written back as torch-level code.

The rewritten model computes the same function (tested to 1e-6 relative in FP32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpipe.errors import QpipeError

SOFTMAX_FUNCS = (F.softmax, torch.softmax)
GELU_FUNCS = (F.gelu,)
LAYERNORM_FUNCS = (F.layer_norm, torch.layer_norm)


def _excluded(name: str, exclude) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


class Tracer(fx.Tracer):
    """torch.fx's tracer that keeps qpipe's own layers (AdderConv2d) and the excluded modules whole, and remembers
    which module it was tracing when tracing failed."""

    def __init__(self, exclude=()):
        super().__init__()
        self.exclude = tuple(exclude)
        self.stack: list[tuple[str, str]] = []
        self.failed_in: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from qpipe.models.adder import AdderConv2d

        return isinstance(m, AdderConv2d) or _excluded(qualname, self.exclude) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _problem(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "iterate" in msg.lower() or "len(" in msg:   # fx's iteration message mentions control flow too: first
        return f"iteration over a tensor or len() of one ({msg[:120]})"
    if "control flow" in msg or "bool" in msg.lower() and "proxy" in msg.lower():
        return "data-dependent control flow (if / while / bool() on a tensor)"
    return f"{type(e).__name__}: {msg[:160]}"


def is_transformers(model: nn.Module) -> bool:
    """A Hugging Face ``transformers`` model (fx cannot trace those as they ship)."""
    return type(model).__module__.startswith("transformers.")


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Inputs by name that a ``transformers`` model accepts (token ids and a mask, or pixel values), from its
    config; None for other models (their capture does not need one)."""
    if not is_transformers(model):
        return None
    import inspect

    cfg = model.config
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main == "input_ids":
        ids = torch.randint(0, min(int(cfg.vocab_size), 1000), (2, 8), generator=g)
        out = {"input_ids": ids}
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones_like(ids)
        return out
    if main == "pixel_values":
        size = cfg.image_size if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
        hw = (size, size) if isinstance(size, int) else size
        return {"pixel_values": torch.randn(2, int(getattr(cfg, "num_channels", 3)), *hw, generator=g)}
    raise QpipeError(f"{type(model).__name__}: inputs of kind {main!r} are not supported yet (token ids and images are)")


INDEX_INPUTS = ("input_ids", "token_type_ids", "position_ids")   # indices into a table: integers only


def forward_inputs(model: nn.Module) -> tuple[list[str], list[str]]:
    """(every input argument name of ``model.forward``, the required ones), in order."""
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in params], [p.name for p in params if p.default is p.empty]


def example_from(model: nn.Module, x) -> dict[str, torch.Tensor]:
    """A data batch as ``model``'s inputs by argument name, checked against ``model.forward``: a single tensor
    goes to the first argument; named tensors must each name an argument, cover the required ones, and give
    integers where the model indexes a table. Raises a QpipeError that lists both sides."""
    from qpipe import inputs

    names, required = forward_inputs(model)
    if not inputs.is_named(x):
        if not names:
            raise QpipeError(f"{type(model).__name__}.forward takes no tensor argument")
        x = {getattr(model, "main_input_name", names[0]) if is_transformers(model) else names[0]: x}
    given = list(x)
    wrong = [k for k in given if k not in names]
    missing = [k for k in required if k not in x]
    if wrong or missing:
        what = f"input {wrong[0]!r} is not an argument of" if wrong else f"the required input {missing[0]!r} of"
        raise QpipeError(f"data: {what} {type(model).__name__} (the model takes {', '.join(names)}; the data has "
                         f"{', '.join(given)})")
    for k in given:
        if k in INDEX_INPUTS and x[k].is_floating_point():
            raise QpipeError(f"data: input {k!r} holds floats ({x[k].dtype}); it indexes an embedding table, give "
                             "integers (int64 token ids)")
    return {k: x[k] for k in names if k in x}   # in the model's argument order


def axis_limits(model: nn.Module) -> dict[str, int]:
    """The largest sequence a model's position table holds (``{"sequence": n}``), empty when it has none."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) if is_transformers(model) else None
    if not n:
        return {}
    for name, m in model.named_modules():   # RoBERTa-style positions start after the padding index
        if name.endswith("embeddings") and isinstance(getattr(m, "padding_idx", None), int) \
                and hasattr(m, "position_embeddings"):
            n -= m.padding_idx + 1
            break
    return {"sequence": int(n)}


def capture(model: nn.Module, exclude=(), example: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """The traced, normalised graph of ``model`` (see the module docstring). ``example``: its inputs by name, for
    the torch.export path (a ``transformers`` model gets them from its config when not given)."""
    exclude = tuple(exclude)
    names = {n for n, _ in model.named_modules()}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise QpipeError(f"exclude: the model has no module named {unknown[0]!r}")
    if is_transformers(model):
        return _exported(model, exclude, example if example is not None else example_inputs(model), None)
    tracer = Tracer(exclude)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = tracer.failed_in[-1] if tracer.failed_in else ("", type(model).__name__)
        name, kind = where
        problem = _problem(e)
        if name:
            msg = (f"cannot capture module {name} ({kind}): {problem}; keep it in float with "
                   f"'exclude: [{name}]' in the recipe (or --set 'exclude=[{name}]')")
        else:
            msg = (f"cannot capture the model's own forward ({kind}): {problem}; move that code into a "
                   "submodule and exclude it ('exclude: [name]' in the recipe)")
        if example is None or exclude:
            raise QpipeError(msg) from e
        return _exported(model, exclude, example, msg)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    _name_constants(gm, model)
    _functional_to_modules(gm)
    return gm


def _exported(model: nn.Module, exclude: tuple, example, fx_failure: str | None) -> fx.GraphModule:
    """The torch.export path; ``fx_failure``: why torch.fx did not do (said again if export fails too)."""
    from qpipe.pipeline.exported import export_capture

    try:
        gm = export_capture(model, example)
    except QpipeError as e:
        raise QpipeError(f"{fx_failure}; tried torch.export next: {e}" if fx_failure else str(e)) from e
    _functional_to_modules(gm)
    return gm


def _name_constants(gm: fx.GraphModule, model: nn.Module) -> None:
    """Tensors fx captured as constants (``~self.mask``) get names by graph order, so every capture of the same
    model names them alike (fx counts on, and leaves ``_tensor_constantN`` attributes on the model)."""
    k = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("_tensor_constant"):
            value = getattr(gm, node.target)
            delattr(gm, node.target)
            if hasattr(model, node.target):
                delattr(model, node.target)
            name = f"_qpipe_constant{k}"
            gm.register_buffer(name, value)
            node.target = name
            k += 1
    if k:
        gm.recompile()


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _arg(node: fx.Node, i: int, key: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _param(gm: fx.GraphModule, a) -> torch.Tensor | None:
    """The tensor behind a get_attr argument (None for None); raises for anything computed."""
    if a is None:
        return None
    if isinstance(a, fx.Node) and a.op == "get_attr":
        obj = gm
        for part in a.target.split("."):
            obj = getattr(obj, part)
        return obj.detach()
    raise ValueError("not a parameter")


def _module_for(node: fx.Node, gm: fx.GraphModule) -> tuple[str, nn.Module] | None:
    t, op = node.target, node.op
    if (op == "call_function" and t in SOFTMAX_FUNCS) or (op == "call_method" and t == "softmax"):
        dim = _arg(node, 1, "dim")
        if _arg(node, 2, "dtype") is not None or not isinstance(dim, int):
            return None
        return "softmax", nn.Softmax(dim=dim)
    if op == "call_function" and t in GELU_FUNCS:
        return "gelu", nn.GELU(approximate=_arg(node, 1, "approximate", "none"))
    if op == "call_function" and t in LAYERNORM_FUNCS:
        shape = _arg(node, 1, "normalized_shape")
        try:
            w, b = _param(gm, _arg(node, 2, "weight")), _param(gm, _arg(node, 3, "bias"))
        except ValueError:
            return None
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(v, int) for v in shape):  # e.g. (x.shape[-1],): the parameters know it
            if w is None:
                return None
            shape = tuple(w.shape)
        ln = nn.LayerNorm(shape, eps=_arg(node, 4, "eps", 1e-5), elementwise_affine=w is not None,
                          bias=b is not None)
        with torch.no_grad():
            if w is not None:
                ln.weight.copy_(w)
            if b is not None:
                ln.bias.copy_(b)
        return "layer_norm", ln
    return None


def _functional_to_modules(gm: fx.GraphModule) -> int:
    """Replace functional softmax / GELU / LayerNorm calls by modules; returns how many."""
    taken = {n for n, _ in gm.named_modules()}
    done = 0
    for node in list(gm.graph.nodes):
        found = _module_for(node, gm)
        if found is None:
            continue
        kind, mod = found
        base = _owner(node)
        name = f"{base}.{kind}" if base else kind
        i = 1
        while name in taken or _attr_taken(gm, name):
            name = f"{base}.{kind}_{i}" if base else f"{kind}_{i}"
            i += 1
        taken.add(name)
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        old_args = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for a in old_args:
            if not a.users:
                gm.graph.erase_node(a)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _attr_taken(gm: fx.GraphModule, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        return False
    return hasattr(owner, leaf)

