"""AdaRound (Nagel et al., ICML 2020, arXiv:2004.10568) and BRECQ-style reconstruction (Li et al., ICLR 2021,
arXiv:2102.05426) with LSQ activation step sizes (Esser et al., ICLR 2020, arXiv:1902.08153).

Units (``adaround.granularity``) are pieces of the traced graph, reconstructed in graph order:
``layer`` (a Conv/Linear with its BN/ReLU and output quantizer), ``block`` (the segment between two cut points
of the graph: a node every later node reaches only through it, e.g. the output of a residual block or of a
transformer's attention or MLP half), ``encoder`` (consecutive blocks of one numbered module, e.g. ``blocks.3`` or
``encoder.layer.3``) and ``model``.
The input of a unit comes from the quantized model (earlier units already hardened), its target from the float
model; both are computed once and cached (in memory up to a budget, then memory-mapped files).

Side values: what the graph computes from its integer inputs alone (a transformer's attention mask and the
sequence length its reshapes read) reaches every block, so no node would cut the graph if those edges counted.
They do not: a unit reads them as extra inputs, recomputed from the calibration inputs of each minibatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx

from qpipe.artifact import write_atomic, write_json
from qpipe.errors import QpipeError
from qpipe.inputs import Batch, batch_len, is_named, real_tokens
from qpipe.kinds import Kind

from .qmodel import WEIGHT_SCALE_FLOOR, ActQuant, Prepared, QConv2d, QLinear, kind_of, mode

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V such that h(V) is the fractional part of w/s, so the soft weight starts at the float weight."""
    v = w / s
    r = v - torch.floor(v)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


def regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2 h(V) - 1|^beta)."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


@dataclass(frozen=True)
class BetaSchedule:
    """Regulariser off for the first ``warmup`` share of iterations, then beta falls linearly start -> end."""

    iters: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __call__(self, t: int) -> float | None:
        t0 = self.warmup * self.iters
        if t < t0:
            return None
        rel = (t - t0) / max(self.iters - t0, 1e-12)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)


class AdaRoundWeight(torch.nn.Module):
    """The learnable rounding of one layer: w_soft = s * (clamp(floor(w/s) + z + h(V), qmin, qmax) - z).
    ``attached`` registers it as the layer's ``ada`` submodule while the unit is reconstructed."""

    def __init__(self, m, device, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        axis_shape = [-1] + [1] * (m.weight.ndim - 1)
        self.s = (m.weight_scale.double().reshape(axis_shape) if m.weight_scale.ndim
                  else m.weight_scale.double()).to(device)
        self.z = (m.weight_zero_point.double().reshape(axis_shape) if m.weight_zero_point.ndim
                  else m.weight_zero_point.double()).to(device)
        w = m.weight.detach().double().to(device)
        self.base = torch.floor(w / self.s)
        self.v = torch.nn.Parameter(init_v(w, self.s).float())
        self.s32, self.z32 = self.s.float(), self.z.float()
        self.base32 = self.base.float()

    def soft(self) -> torch.Tensor:
        q = torch.clamp(self.base32 + self.z32 + rectified_sigmoid(self.v), self.qmin, self.qmax)
        return self.s32 * (q - self.z32)

    def hard(self) -> torch.Tensor:
        return torch.clamp(self.base + self.z + (self.v.detach() >= 0).double(), self.qmin, self.qmax)


CLIP_ROWS = 2048      # layer-input rows (tokens; a linear layer's samples) the clip search reads
CLIP_IMAGES = 16      # images a convolution's clip search reads


@torch.no_grad()
def layer_inputs(gm: fx.GraphModule, seg, names: list[str], inputs: Cache, n: int, device,
                 mask: torch.Tensor | None, sides: SideValues | None) -> dict[str, torch.Tensor]:
    """Each named layer's input inside the unit (quant mode: what the layer reads once its predecessors are
    quantized), on the first calibration samples: a linear layer's real-token rows (R x C_in, padding dropped)
    up to ``CLIP_ROWS``, a convolution's first ``CLIP_IMAGES`` images."""
    got: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    batch_mask: list[torch.Tensor | None] = [None]

    def enough(name):
        xs = got[name]
        return bool(xs) and sum(len(x) for x in xs) >= (CLIP_IMAGES if xs[0].ndim == 4 else CLIP_ROWS)

    def grab(name):
        def hook(mod, args):
            if not enough(name):
                x = args[0].detach()
                got[name].append(x if x.ndim == 4 else real_tokens(x, batch_mask[0]).reshape(-1, x.shape[-1]))
        return hook

    hooks = [gm.get_submodule(name).register_forward_pre_hook(grab(name)) for name in names]
    try:
        with mode(seg, "quant"):
            for i in range(0, n, 64):
                if all(enough(name) for name in names):
                    break
                idx = torch.arange(i, min(i + 64, n))
                batch_mask[0] = mask[idx] if mask is not None else None
                seg(inputs.get(idx).to(device), *(sides.get(idx) if sides else ()))
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs)[:CLIP_IMAGES if xs[0].ndim == 4 else CLIP_ROWS] for name, xs in got.items() if xs}


def output_clip(m, x: torch.Tensor, bits: int) -> torch.Tensor | None:
    """``qpipe.reference.observers.output_clip`` for one layer (a linear map on rows, or a convolution on
    images): per output channel, the scale among the current one and the clippings of the channel's largest
    |w| whose nearest rounding gives the least squared output error on ``x``; None where the layer's grid is not
    per-channel symmetric (then it keeps its scale)."""
    from qpipe.reference.observers import CLIP_FRACTIONS

    if m.weight_scale is None or m.weight_scale.ndim != 1 or bool((m.weight_zero_point != 0).any()):
        return None
    w = m.weight.detach().double()
    rows = w.reshape(w.shape[0], -1)
    qmin, qmax = _grid(bits)
    base = m.weight_scale.double()
    floor = float(base.max()) * WEIGHT_SCALE_FLOOR
    amax = rows.abs().amax(dim=1)
    cands = [base] + [torch.clamp(amax * f / qmax, min=floor) for f in CLIP_FRACTIONS]
    x = x.double()
    errs = []
    for s in cands:
        d = (rows - torch.clamp(torch.round(rows / s[:, None]), qmin, qmax) * s[:, None]).reshape_as(w)
        if x.ndim == 4:   # the convolution of the weight error, squared, summed per output channel
            y = m._conv_forward(x, d, None)
            errs.append(y.pow(2).sum(dim=(0, 2, 3)))
        else:
            errs.append((x @ d.reshape(d.shape[0], -1).T).pow(2).sum(dim=0))
    best = torch.argmin(torch.stack(errs, dim=1), dim=1)   # the first minimum: the current scale wins a tie
    return torch.stack(cands, dim=1).gather(1, best[:, None])[:, 0]


def clip_layers(p: Prepared, names: list[str], xs: dict[str, torch.Tensor]) -> None:
    """Move each layer to the scale ``output_clip`` picks and round its weights to nearest there (AdaRound then
    starts from that grid)."""
    from .quant import quantize

    for name in names:
        m = p.gm.get_submodule(name)
        if name not in xs or not isinstance(m, (QLinear, QConv2d)):
            continue
        s = output_clip(m, xs[name].to(m.weight.device), p.weight_bits[name])
        if s is None:
            continue
        s = s.float()
        qmin, qmax = _grid(p.weight_bits[name])
        m.weight_int = quantize(m.weight.detach().double(), s.double(), m.weight_zero_point.double(), qmin, qmax,
                                0, "nearest").to(torch.int8)
        m.weight_scale = s.to(m.weight_scale.device)


@dataclass
class Unit:
    name: str
    start: fx.Node
    end: fx.Node
    nodes: list[fx.Node]
    layers: list[str] = field(default_factory=list)
    act: list[str] = field(default_factory=list)
    sides: list[fx.Node] = field(default_factory=list)   # side values the unit reads, after ``start``


def side_nodes(gm: fx.GraphModule, float_inputs: set[fx.Node] | None = None) -> set[fx.Node]:
    """The nodes computed from the graph's non-float inputs and constants alone (token ids, an attention mask,
    shapes, position tables): nothing reaches them from a float input (``float_inputs``; None: every input) or
    from a module with weights (an embedding, a layer)."""
    stream: set[fx.Node] = set()
    side = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op == "placeholder":
            root = float_inputs is None or n in float_inputs
        else:
            m = _module(gm, n)
            root = isinstance(getattr(m, "weight", None), torch.Tensor)
        if root or any(a in stream for a in n.all_input_nodes):
            stream.add(n)
        else:
            side.add(n)
    return side


def cut_points(graph: fx.Graph, sides: set[fx.Node] = frozenset()) -> list[fx.Node]:
    """Nodes that every later node reaches only through them (no edge jumps over them); edges from ``sides``
    (values recomputed from the inputs) do not count, and a side value is no cut."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    idx = {n: i for i, n in enumerate(nodes)}
    suffix = [math.inf] * (len(nodes) + 1)
    for i in range(len(nodes) - 1, -1, -1):
        first_in = min((idx[a] for a in nodes[i].all_input_nodes if a in idx and a not in sides), default=math.inf)
        suffix[i] = min(suffix[i + 1], first_in)
    return [n for i, n in enumerate(nodes) if suffix[i + 1] >= i and n not in sides]


def _encoder_key(layer: str) -> str:
    """The numbered module a layer belongs to: ``blocks.3.attn.qkv`` -> ``blocks.3``, ``encoder.layer.3.output.dense``
    -> ``encoder.layer.3``; the first two levels where no level is a number."""
    parts = layer.split(".")
    num = next((i for i, q in enumerate(parts) if q.isdigit()), None)
    return ".".join(parts[: num + 1] if num is not None else parts[:2])


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def find_units(p: Prepared, granularity: str, float_inputs: set[fx.Node] | None = None) -> list[Unit]:
    """The units in graph order. ``float_inputs``: the placeholders that carry float data (None: all of them);
    what the others compute alone is a side value (see the module's docstring)."""
    gm = p.gm
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    out_value = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    sides = side_nodes(gm, float_inputs)

    def describe(unit: Unit) -> Unit:
        inside = set(unit.nodes)
        reads = {}
        for n in unit.nodes:
            m = _module(gm, n)
            if isinstance(m, (QConv2d, QLinear)) and m.weight_int is not None:
                unit.layers.append(n.target)
            if isinstance(m, ActQuant) and m.source is None:
                unit.act.append(n.target)
            reads.update({a: None for a in n.all_input_nodes if a not in inside and a is not unit.start})
        outside = [a for a in reads if a not in sides]
        if outside:
            raise QpipeError(f"adaround: unit {unit.name} reads {outside[0].name} from outside it, which is not "
                             f"computed from the inputs alone; choose another adaround.granularity")
        unit.sides = list(reads)
        return unit

    if granularity == "layer":
        modules = dict(gm.named_modules())
        units = []
        for n in nodes:
            m = _module(gm, n)
            if not (isinstance(m, (QConv2d, QLinear)) and m.weight_int is not None):
                continue
            chain, tail = [n], n
            while len(tail.users) == 1:
                user = next(iter(tail.users))
                um = _module(gm, user)
                # ReLU and the bounded activations that fold into the layer's output range (ReLU6, Hardtanh,
                # clamp): the unit's target is what the output quantizer sees
                is_relu = kind_of(user, modules) == Kind.RELU or (user.op == "call_method" and user.target == "relu")
                if isinstance(um, (torch.nn.BatchNorm2d, ActQuant)) or is_relu:
                    chain.append(user)
                    tail = user
                    if isinstance(um, ActQuant):
                        break
                else:
                    break
            units.append(describe(Unit(n.target, n.args[0], tail, chain)))
        return units

    if granularity == "model":
        if not isinstance(out_value, fx.Node):
            raise QpipeError("adaround.granularity = model reconstructs one output, and this model has several; "
                             "choose layer, block or encoder")
        first = next(i for i, n in enumerate(nodes) if n not in sides)
        return [describe(Unit("model", nodes[first], out_value, nodes[first + 1: nodes.index(out_value) + 1]))]

    cuts = cut_points(gm.graph, sides)
    idx = {n: i for i, n in enumerate(nodes)}
    segs = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        u = describe(Unit(b.name, a, b, nodes[idx[a] + 1: idx[b] + 1]))
        if u.layers:
            segs.append(u)
        elif segs:  # a segment without weights (pooling, a quantizer) joins the unit before it
            segs[-1] = describe(Unit(segs[-1].name, segs[-1].start, b, segs[-1].nodes + u.nodes))
    if granularity == "encoder":
        merged: list[Unit] = []
        for u in segs:
            key = _encoder_key(u.layers[0])
            if merged and _encoder_key(merged[-1].layers[0]) == key:
                merged[-1] = describe(Unit(key, merged[-1].start, u.end, merged[-1].nodes + u.nodes))
            else:
                merged.append(u)
        segs = merged
    return segs


def segment_module(gm: fx.GraphModule, start: fx.Node, nodes: list[fx.Node],
                   sides: list[fx.Node] = ()) -> fx.GraphModule:
    """A GraphModule computing ``nodes[-1]`` from the value of ``start`` and the ``sides`` after it (sharing gm's
    modules)."""
    g = fx.Graph()
    env = {start: g.placeholder("x")}
    env.update({a: g.placeholder(f"side_{i}") for i, a in enumerate(sides)})
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[nodes[-1]])
    return fx.GraphModule(gm, g)


def prefix_module(gm: fx.GraphModule, target: fx.Node) -> fx.GraphModule:
    """A GraphModule computing the value of ``target`` from the model input."""
    g = fx.Graph()
    env = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = g.node_copy(n, lambda a: env[a])
        if n is target:
            break
    g.output(env[target])
    out = fx.GraphModule(gm, g)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def graph_slice(targets, stop, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The nodes ``targets`` are computed from, back to the values in ``stop`` (not included), in graph order."""
    need, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n not in need and n not in stop:
            need.add(n)
            stack.extend(n.all_input_nodes)
    return sorted(need, key=order.__getitem__)


def slice_module(gm: fx.GraphModule, inputs: dict[fx.Node, str], nodes: list[fx.Node], outs) -> fx.GraphModule:
    """A module computing ``outs`` (a tuple) by ``nodes`` of ``gm`` from ``inputs`` (node -> placeholder name)."""
    g = fx.Graph()
    env = {node: g.placeholder(name) for node, name in inputs.items()}
    for n in nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in outs))
    return fx.GraphModule(gm, g)


class SideValues:
    """The side values a unit reads, for any rows of the calibration inputs (recomputed: they are cheap, and a
    shape or a constant has no batch axis to cache along)."""

    def __init__(self, gm: fx.GraphModule, sides: list[fx.Node], stream: Stream, device):
        self.stream, self.device = stream, device
        self.places = sorted(stream.inputs, key=stream.order.get)
        self.mod = None
        if sides:
            nodes = graph_slice(sides, set(self.places), stream.order)
            self.mod = slice_module(gm, {ph: ph.name for ph in self.places}, nodes, sides)

    def get(self, idx: torch.Tensor) -> tuple:
        if self.mod is None:
            return ()
        idx = torch.sort(idx).values   # the rows Cache.get returns, in its order
        with torch.no_grad():
            return tuple(self.mod(*[self.stream.kept[ph].get(idx).to(self.device) for ph in self.places]))


class Cache:
    """N tensors of one shape: a float32 tensor in memory, or a memory-mapped file when over the budget."""

    def __init__(self, shape, n: int, budget_bytes: int, path: Path):
        nbytes = 4 * n * int(np.prod(shape))
        self.path = None
        if nbytes <= budget_bytes:
            self.data = _fast_layout(torch.empty((n, *shape), dtype=torch.float32))
        else:
            self.path = path
            self.data = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(n, *shape))
        self.nbytes = nbytes

    def put(self, i: int, x: torch.Tensor):
        if self.path is None:
            self.data[i: i + len(x)] = x
        else:
            self.data[i: i + len(x)] = x.numpy()

    @classmethod
    def wrap(cls, x: torch.Tensor) -> Cache:
        """A cache over a tensor in memory, without a copy (the calibration images)."""
        self = cls.__new__(cls)
        self.path, self.data, self.nbytes = None, x, 0
        return self

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.sort(idx).values  # the same order in memory and on disk: identical results either way
        if self.path is None:
            return self.data[idx]
        return _fast_layout(torch.from_numpy(np.ascontiguousarray(self.data[idx.numpy()])))

    def rows(self, i: int, j: int) -> torch.Tensor:
        if self.path is None:
            return self.data[i:j]
        return _fast_layout(torch.from_numpy(np.ascontiguousarray(self.data[i:j])))

    def close(self):
        if self.path is not None:
            del self.data
            self.path.unlink(missing_ok=True)


class Stream:
    """The values of graph nodes on all calibration images in one mode (``quant``: the model with every unit
    learned so far; ``float``), computed on demand and kept while a later node may read them.

    A value is computed from the nearest values already kept (a backward slice of the graph that stops at them),
    so filling every unit's input and target costs about one pass over the model per mode, where recomputing
    each from the images costs a pass per unit. A kept quant value never goes stale: units are learned in graph
    order and everything a unit's input depends on belongs to units before it."""

    def __init__(self, gm: fx.GraphModule, images: Batch, cache_mode: str, batch: int, budget: int,
                 workdir: Path, device, tag: str):
        self.gm, self.mode, self.batch, self.budget = gm, cache_mode, batch, budget
        self.workdir, self.device, self.tag = workdir, device, tag
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.n = batch_len(images)
        self.kept: dict[fx.Node, Cache] = {ph: Cache.wrap(x) for ph, x in graph_inputs(gm, images).items()}
        self.inputs = set(self.kept)   # the calibration inputs (images; token ids and masks): always kept
        self.files = 0
        # the attention mask (N x L), where the data has one: padded tokens are not reconstructed
        self.mask = images.get("attention_mask") if is_named(images) else None

    def first_rows(self) -> tuple[torch.Tensor, ...]:
        """One sample of every graph input, in placeholder order (for shape propagation)."""
        return tuple(self.kept[ph].rows(0, 1).to(self.device) for ph in sorted(self.inputs, key=self.order.get))

    def _slice(self, target: fx.Node) -> tuple[list[fx.Node], list[fx.Node], fx.GraphModule]:
        """(kept values read, values computed: the target and those a node outside the slice reads too, e.g.
        a residual block's input, and the module computing them)."""
        nodes = graph_slice([target], self.kept, self.order)
        need = set(nodes)
        frontier = sorted({a for n in nodes for a in n.all_input_nodes if a in self.kept}, key=self.order.__getitem__)
        outs = [target] + [n for n in nodes if n is not target and n.op != "get_attr"
                           and any(u not in need for u in n.users)]
        return frontier, outs, slice_module(self.gm, {c: f"in_{i}" for i, c in enumerate(frontier)}, nodes, outs)

    @torch.no_grad()
    def value(self, target: fx.Node) -> Cache:
        if target not in self.kept:
            frontier, outs, mod = self._slice(target)
            caches: dict[fx.Node, Cache | None] = {}
            with mode(self.gm, self.mode):
                for i in range(0, self.n, self.batch):
                    ys = mod(*[self.kept[c].rows(i, i + self.batch).to(self.device) for c in frontier])
                    rows = min(self.batch, self.n - i)
                    for node, y in zip(outs, ys, strict=True):
                        if i == 0:  # a value without the batch dimension (a shape, a constant, a mask) is recomputed
                            batched = isinstance(y, torch.Tensor) and y.is_floating_point() and y.ndim > 0 \
                                and y.shape[0] == rows
                            if not batched and node is target:
                                raise RuntimeError(f"adaround: unit boundary {node.name} is not a batch of tensors")
                            caches[node] = self._new_cache(y) if batched else None
                        if caches[node] is not None:
                            caches[node].put(i, y.float().cpu())
            self.kept.update({n: c for n, c in caches.items() if c is not None})
        return self.kept[target]

    def _new_cache(self, y: torch.Tensor) -> Cache:
        used = sum(c.nbytes for c in self.kept.values() if c.path is None)
        self.files += 1
        return Cache(tuple(y.shape[1:]), self.n, max(self.budget - used, 0), self.workdir / f"{self.tag}-{self.files}.npy")

    def release(self, done: fx.Node) -> None:
        """Drop kept values that no node after ``done`` reads (the images stay)."""
        last = self.order[done]
        for n in list(self.kept):
            if n not in self.inputs and n is not done and all(self.order[u] <= last for u in n.users):
                self.kept.pop(n).close()

    def close(self) -> None:
        for n in list(self.kept):
            self.kept.pop(n).close()


def _grid(bits: int) -> tuple[int, int]:
    """The signed b-bit grid that weights use, symmetric or not."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def channel_axis(x: torch.Tensor) -> int:
    """The channel (feature) axis of a unit's output: 1 for N x C (x H x W), the last for a token sequence
    N x L x D (a Linear on a transformer's tokens), where dimension 1 is the token axis."""
    return -1 if x.ndim == 3 else 1


def recon_loss(out: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions (tokens), as BRECQ's lp_loss: the
    scale against which lambda = 0.01 times the summed regulariser is balanced. ``keep``: the tokens that count
    (N x L, an attention mask; padding is not reconstructed)."""
    per = (out - target).pow(2).sum(channel_axis(out))
    if keep is None:
        return per.mean()
    return (per * keep).sum() / keep.sum().clamp(min=1)


def token_keep(mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """The attention mask (N x L, as float) where ``y`` is a token sequence N x L x D it fits, else None."""
    if mask is None or y.ndim != 3 or tuple(y.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(y.dtype)


@torch.no_grad()
def _mse(seg, inputs: Cache, targets: Cache, n: int, batch: int, device, mask: torch.Tensor | None = None,
         sides: SideValues | None = None) -> float:
    """Mean squared error of the unit's output over the calibration set (the tokens ``mask`` keeps)."""
    tot = count = 0.0
    with mode(seg, "quant"):
        for i in range(0, n, batch):
            idx = torch.arange(i, min(i + batch, n))
            t = targets.get(idx).to(device)
            d = (seg(inputs.get(idx).to(device), *(sides.get(idx) if sides else ())) - t).pow(2)
            keep = token_keep(mask[idx].to(device) if mask is not None else None, t)
            if keep is not None:
                d = d * keep.unsqueeze(-1)
                count += float(keep.sum()) * t.shape[-1]
            else:
                count += d.numel()
            tot += float(d.sum())
    return tot / max(count, 1.0)


@contextlib.contextmanager
def attached(p: Prepared, unit: Unit, device, lsq: bool = False):
    """The unit in learning state inside the block: soft AdaRound weights on its layers (an ``ada`` submodule),
    straight-through quantizers, and (with ``lsq``) learnable activation steps (an ``lsq_scale`` parameter, whose
    value becomes the quantizer's scale on exit). Yields ({layer: AdaRoundWeight}, [LSQ step parameters])."""
    gm = p.gm
    ada: dict[str, AdaRoundWeight] = {}
    steps = []
    quantizers = [m for n in unit.nodes if isinstance(m := _module(gm, n), ActQuant)]
    try:
        for name in unit.layers:
            m = gm.get_submodule(name)
            m.ada = ada[name] = AdaRoundWeight(m, device, *_grid(p.weight_bits[name]))
        for name in unit.act if lsq else []:
            aq = gm.get_submodule(name)
            if aq.fixed:  # IntSoftmax's output grid (2^-8) is part of the op, not a step to learn
                continue
            aq.lsq_scale = torch.nn.Parameter(aq.scale.detach().clone().float())
            steps.append(aq.lsq_scale)
        for aq in quantizers:
            aq.ste = True
        yield ada, steps
    finally:
        for name in ada:
            del gm.get_submodule(name).ada
        for aq in quantizers:
            aq.ste = False
            if "lsq_scale" in aq._parameters:
                aq.scale = aq.lsq_scale.detach().float().clone()
                del aq.lsq_scale


class _ChainLoss(torch.autograd.Function):
    """``recon_loss(q(clamp(y, lo, hi)), t)`` for a layer unit's tail (its bounded activation and output quantizer,
    straight-through), in six passes over memory where autograd's op-by-op graph makes about fifteen: on
    224x224 feature maps those passes, not the convolution, are most of a learning step. Forward and gradient
    equal the op-by-op form (the gradient passes where the clamp and the quantizer grid keep the value)."""

    @staticmethod
    def forward(ctx, y, t, lo, hi, q, tokens=None):
        c = y if lo is None and hi is None else torch.clamp(y, lo, hi)
        if q is not None:
            scale, zp, qmin, qmax = q
            d, keep = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(c, scale, zp, qmin, qmax)
        else:
            d, keep = c.clone() if c is y else c, None
        if c is not y:
            inside = c == y
            keep = inside if keep is None else keep.logical_and_(inside)
        d.sub_(t)
        positions = d.numel() // d.shape[channel_axis(d)]
        if tokens is not None:   # tokens outside the attention mask are not reconstructed
            d.mul_(tokens.unsqueeze(-1))
            positions = max(float(tokens.sum()), 1.0)
        flat = _flat(d)
        ctx.save_for_backward(d, keep)
        ctx.positions = positions
        return torch.dot(flat, flat) / positions

    @staticmethod
    def backward(ctx, g):
        d, keep = ctx.saved_tensors   # d is zero outside the token mask already
        grad = d * (2.0 * g / ctx.positions)
        if keep is not None:
            grad.mul_(keep)
        return grad, None, None, None, None, None


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor in its memory order (NCHW or channels-last)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


@dataclass
class Tail:
    """A layer unit's nodes after the layer: a bounded activation's range and the output quantizer."""

    lo: float | None
    hi: float | None
    quantizer: ActQuant | None

    def loss(self, y: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        aq = self.quantizer
        q = None
        if aq is not None and aq.scale > 0 and aq.qstate.active(aq.qname):
            q = (float(aq.scale), int(aq.zero_point), aq.spec.qmin, aq.spec.qmax)
        return _ChainLoss.apply(y, t, self.lo, self.hi, q, tokens)


def _tail(gm, unit: Unit) -> Tail | None:
    """The fused tail of a ``layer`` unit [layer, (ReLU-kind), (quantizer)], or None where the generic
    op-by-op step applies (BatchNorm left unfolded, a learned or shared or APoT quantizer, ...)."""
    from .qmodel import activation_bounds

    modules = dict(gm.named_modules())
    lo = hi = None
    rest = unit.nodes[1:]
    if rest and kind_of(rest[0], modules) == Kind.RELU:
        lo, hi = activation_bounds(rest[0], modules)
        hi = None if math.isinf(hi) else hi
        rest = rest[1:]
    aq = None
    if rest:
        aq = _module(gm, rest[0])
        if len(rest) > 1 or not isinstance(aq, ActQuant) or aq.source is not None or aq.apot or aq.fixed \
                or getattr(aq, "qat", None) is not None or aq.spec.qmax - aq.spec.qmin > 65535:
            return None
    return Tail(lo, hi, aq)


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Images and feature maps channels-last for the learning steps: oneDNN's convolutions and their backward
    run 1.3-4x faster in NHWC on the CPU (measured on EfficientNet-Lite0's units), and the loss then reads
    output and target in the same order. The hard rounding, the MSE report and the caches stay NCHW."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 and x.device.type == "cpu" else x


def train_step(seg, inputs: Cache, targets: Cache, weights: list[AdaRoundWeight], a, beta: float | None,
               gen: torch.Generator, device, opt, opt_s=None, tail: Tail | None = None,
               mask: torch.Tensor | None = None, sides: SideValues | None = None):
    """One reconstruction step on a random minibatch: recon loss + lambda * regulariser (off while beta is None),
    backward, Adam on V (and on the LSQ steps). Returns (rec, reg, beta) as tensors / float. With ``tail``,
    ``seg`` computes the layer alone and the tail's fused loss does the rest."""
    n = len(inputs.data)
    idx = torch.sort(torch.randint(0, n, (min(a.batch_size, n),), generator=gen)).values
    x, t = _fast_layout(inputs.get(idx).to(device)), _fast_layout(targets.get(idx).to(device))
    keep = token_keep(mask[idx].to(device) if mask is not None else None, t)
    y = seg(x, *(sides.get(idx) if sides else ()))
    rec = tail.loss(y, t, keep) if tail is not None else recon_loss(y, t, keep)
    reg = a.reg_weight * sum(regularizer(w.v, beta) for w in weights) if beta is not None \
        else torch.zeros((), device=device)
    opt.zero_grad()
    if opt_s:
        opt_s.zero_grad()
    (rec + reg).backward()
    opt.step()
    if opt_s:
        opt_s.step()
    return rec, reg, beta


def run_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reconstruct(p: Prepared, recipe, images: Batch, workdir: Path, key: str, device="cpu",
                progress: bool = True, cache_mb: int = 2048) -> list[dict]:
    """Learn the rounding of every quantized layer, unit by unit; returns the per-unit report.

    Finished units are written to ``workdir`` as they finish; a rerun with the same ``key`` loads them instead
    of recomputing, and continues with the first unfinished unit."""
    a = recipe.adaround
    gm = p.gm.to(device)
    workdir.mkdir(parents=True, exist_ok=True)
    meta = workdir / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("key") != key:
        shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
    write_json(meta, {"key": key})
    float_inputs = {ph for ph, x in graph_inputs(gm, images).items() if x.is_floating_point()}
    units = find_units(p, a.granularity, float_inputs)
    sched = BetaSchedule(a.iters, a.warmup, a.beta[0], a.beta[1])
    report = []
    spent: list[float] = []   # seconds of each unit learned in this run (resumed ones are free)
    half = cache_mb << 19  # bytes: half of the budget each for the quant inputs and the float targets
    qstream = Stream(gm, images, "quant", 64, half, workdir, device, "in")
    fstream = Stream(gm, images, "float", 64, half, workdir, device, "out")
    try:
        report = _reconstruct_units(p, recipe, units, sched, workdir, qstream, fstream, spent, device, progress)
    finally:
        qstream.close()
        fstream.close()
    gm.cpu()
    return report


def graph_inputs(gm: fx.GraphModule, images: Batch) -> dict[fx.Node, torch.Tensor]:
    """The calibration batch by graph placeholder: a single tensor is the one input; named tensors go by name."""
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not is_named(images):
        return {places[0]: images}
    missing = [ph.target for ph in places if ph.target not in images]
    if missing:
        raise QpipeError(f"adaround: the model's input {missing[0]!r} is not in the calibration data")
    return {ph: images[ph.target] for ph in places}


def unit_costs(gm: fx.GraphModule, units: list[Unit], x: tuple[torch.Tensor, ...]) -> list[float]:
    """The relative cost of each unit's learning steps, for the time-left estimate: the values its steps read and
    write per image (input, output and every node in between). On a CNN at 224x224 the first units cost ten times
    the last, so a count of units left would misjudge the rest by as much. Equal costs where shapes are unknown."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with mode(gm, "float"), torch.no_grad():
            ShapeProp(gm).propagate(*x)
    except Exception:
        return [1.0] * len(units)

    def size(n: fx.Node) -> int:
        meta = n.meta.get("tensor_meta")
        return int(np.prod(meta.shape)) if hasattr(meta, "shape") else 0

    return [float(size(u.start) + sum(size(n) for n in u.nodes)) or 1.0 for u in units]


def _reconstruct_units(p, recipe, units, sched, workdir, qstream, fstream, spent, device, progress) -> list[dict]:
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    a, gm, report = recipe.adaround, p.gm, []
    costs = unit_costs(gm, units, qstream.first_rows())
    done_cost = 0.0
    for k, unit in enumerate(units):
        done = workdir / f"unit-{k:03d}.safetensors"
        if done.is_file():
            state = load_file(str(done))
            for name in unit.layers:
                gm.get_submodule(name).weight_int = state[f"{name}.weight_int"].to(device)
                gm.get_submodule(name).weight_scale = state[f"{name}.weight_scale"].to(device)
            for name in unit.act:
                gm.get_submodule(name).scale = state[f"{name}.scale"].to(device)
            _sync_shared(p)
            info = json.loads((workdir / f"unit-{k:03d}.json").read_text())
            report.append({**info, "resumed": True})
            continue
        t_unit = time.perf_counter()
        seg = segment_module(gm, unit.start, unit.nodes, unit.sides)
        sides = SideValues(gm, unit.sides, qstream, device)
        inputs, targets = qstream.value(unit.start), fstream.value(unit.end)
        n = qstream.n
        if a.clip_search:
            clip_layers(p, unit.layers, layer_inputs(gm, seg, unit.layers, inputs, n, device, qstream.mask, sides))
        before = _mse(seg, inputs, targets, n, 64, device, qstream.mask, sides)
        nearest = {name: gm.get_submodule(name).weight_int.clone() for name in unit.layers}
        tail = _tail(gm, unit) if a.granularity == "layer" and not a.lsq and not unit.sides else None
        step_seg = segment_module(gm, unit.start, unit.nodes[:1]) if tail is not None else seg
        with attached(p, unit, device, a.lsq) as (ada, lsq):
            opt = torch.optim.Adam([w.v for w in ada.values()], lr=a.lr)
            opt_s = torch.optim.Adam(lsq, lr=a.lsq_lr) if lsq else None
            sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=a.iters, eta_min=0.0) if lsq else None
            gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + k)
            bar = tqdm(range(a.iters), desc=f"adaround {k + 1}/{len(units)} {unit.name}", leave=False,
                       disable=None if progress else True, mininterval=0.5)
            rec_v = reg_v = 0.0
            iters_run = 0
            with mode(gm, "quant"):
                for t in bar:
                    rec, reg, beta = train_step(step_seg, inputs, targets, list(ada.values()), a, sched(t), gen,
                                                device, opt, opt_s, tail, qstream.mask, sides)
                    if opt_s:
                        sched_s.step()
                        for s in lsq:
                            s.data.clamp_(min=1e-8)
                    iters_run = t + 1
                    rec_v, reg_v = float(rec.detach()), float(reg.detach())
                    if t % 50 == 0:
                        bar.set_postfix(rec=f"{rec_v:.3g}", reg=f"{reg_v:.3g}")
                    if beta is not None and reg_v < a.early_stop:
                        break
            bar.close()
            changed = total = 0
            for name, w in ada.items():
                m = gm.get_submodule(name)
                q = w.hard()
                m.weight_int = q.to(torch.int8)
                changed += int((m.weight_int != nearest[name]).sum())
                total += q.numel()
        _sync_shared(p)
        after = _mse(seg, inputs, targets, n, 64, device, qstream.mask, sides)
        qstream.release(unit.start)
        fstream.release(unit.end)
        info = {"unit": unit.name, "layers": unit.layers, "mse_before": before, "mse_after": after,
                "changed_from_nearest": changed / max(total, 1), "iters": iters_run}
        state = {f"{name}.{k}": getattr(gm.get_submodule(name), k).cpu().contiguous() for name in unit.layers
                 for k in ("weight_int", "weight_scale")}
        state.update({f"{name}.scale": gm.get_submodule(name).scale.cpu().reshape(()).contiguous() for name in unit.act})
        write_atomic(workdir / f"unit-{k:03d}.json", json.dumps(info))
        tmp = workdir / f".unit-{k:03d}.tmp"
        save_file(state, str(tmp))
        tmp.replace(done)
        report.append({**info, "resumed": False})
        spent.append(time.perf_counter() - t_unit)
        done_cost += costs[k]
        if progress:   # one line per unit: readable in a log, where the bars are off, and above the bars on a terminal
            left = sum(costs[k + 1:]) * sum(spent) / max(done_cost, 1e-9)
            tqdm.write(f"adaround: unit {k + 1}/{len(units)} {unit.name} done in {spent[-1]:.1f} s ({iters_run} "
                       f"iterations, MSE {before:.3g} -> {after:.3g}); about {left:.0f} s left", file=sys.stderr)
    return report


def _sync_shared(p: Prepared) -> None:
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is not None:
            src = p.gm.get_submodule(aq.source)
            aq.scale = src.scale.detach().clone()
            aq.zero_point = src.zero_point.clone()
