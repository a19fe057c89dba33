"""AdaRound (Nagel et al., ICML 2020, arXiv:2004.10568) and BRECQ-style reconstruction (Li et al., ICLR 2021,
arXiv:2102.05426) with LSQ activation step sizes (Esser et al., ICLR 2020, arXiv:1902.08153).

Units (``adaround.granularity``) are pieces of the traced graph, reconstructed in graph order:
``layer`` (a Conv/Linear with its BN/ReLU and output quantizer), ``block`` (the segment between two cut points
of the graph: a node every later node reaches only through it, e.g. the output of a residual block),
``encoder`` (consecutive blocks sharing a two-level module prefix, e.g. ``blocks.3``) and ``model``.
The input of a unit comes from the quantized model (earlier units already hardened), its target from the float
model; both are computed once and cached (in memory up to a budget, then memory-mapped files).
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
import torch.nn.functional as F
from torch import fx

from qpipe.artifact import write_atomic, write_json

from .qmodel import ActQuant, Prepared, QConv2d, QLinear, mode

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


@dataclass
class Unit:
    name: str
    start: fx.Node
    end: fx.Node
    nodes: list[fx.Node]
    layers: list[str] = field(default_factory=list)
    act: list[str] = field(default_factory=list)


def cut_points(graph: fx.Graph) -> list[fx.Node]:
    """Nodes that every later node reaches only through them (no edge jumps over them)."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    idx = {n: i for i, n in enumerate(nodes)}
    suffix = [math.inf] * (len(nodes) + 1)
    for i in range(len(nodes) - 1, -1, -1):
        first_in = min((idx[a] for a in nodes[i].all_input_nodes if a in idx), default=math.inf)
        suffix[i] = min(suffix[i + 1], first_in)
    return [n for i, n in enumerate(nodes) if suffix[i + 1] >= i]


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def find_units(p: Prepared, granularity: str) -> list[Unit]:
    gm = p.gm
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    out_value = next(n for n in gm.graph.nodes if n.op == "output").args[0]

    def describe(unit: Unit) -> Unit:
        for n in unit.nodes:
            m = _module(gm, n)
            if isinstance(m, (QConv2d, QLinear)) and m.weight_int is not None:
                unit.layers.append(n.target)
            if isinstance(m, ActQuant) and m.source is None:
                unit.act.append(n.target)
        return unit

    if granularity == "layer":
        units = []
        for n in nodes:
            m = _module(gm, n)
            if not (isinstance(m, (QConv2d, QLinear)) and m.weight_int is not None):
                continue
            chain, tail = [n], n
            while len(tail.users) == 1:
                user = next(iter(tail.users))
                um = _module(gm, user)
                is_relu = (user.op == "call_module" and type(um).__name__ == "ReLU") or \
                          (user.op == "call_function" and user.target in (F.relu, torch.relu)) or \
                          (user.op == "call_method" and user.target == "relu")
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
        return [describe(Unit("model", nodes[0], out_value, nodes[1: nodes.index(out_value) + 1]))]

    cuts = cut_points(gm.graph)
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
            key = ".".join(u.layers[0].split(".")[:2])
            if merged and ".".join(merged[-1].layers[0].split(".")[:2]) == key:
                merged[-1] = describe(Unit(key, merged[-1].start, u.end, merged[-1].nodes + u.nodes))
            else:
                merged.append(u)
        segs = merged
    return segs


def segment_module(gm: fx.GraphModule, start: fx.Node, nodes: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing ``nodes[-1]`` from the value of ``start`` (sharing gm's modules)."""
    g = fx.Graph()
    env = {start: g.placeholder("x")}
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


class Cache:
    """N tensors of one shape: a float32 tensor in memory, or a memory-mapped file when over the budget."""

    def __init__(self, shape, n: int, budget_bytes: int, path: Path):
        nbytes = 4 * n * int(np.prod(shape))
        self.path = None
        if nbytes <= budget_bytes:
            self.data = torch.empty((n, *shape), dtype=torch.float32)
        else:
            self.path = path
            self.data = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(n, *shape))
        self.nbytes = nbytes

    def put(self, i: int, x: torch.Tensor):
        if self.path is None:
            self.data[i: i + len(x)] = x
        else:
            self.data[i: i + len(x)] = x.numpy()

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.sort(idx).values  # the same order in memory and on disk: identical results either way
        if self.path is None:
            return self.data[idx]
        return torch.from_numpy(np.ascontiguousarray(self.data[idx.numpy()]))

    def close(self):
        if self.path is not None:
            del self.data
            self.path.unlink(missing_ok=True)


@torch.no_grad()
def _fill(module, images: torch.Tensor, cache_mode: str, batch: int, budget: int, path: Path, device) -> Cache:
    cache = None
    with mode(module, cache_mode):
        for i in range(0, len(images), batch):
            y = module(images[i: i + batch].to(device)).float().cpu()
            if cache is None:
                cache = Cache(tuple(y.shape[1:]), len(images), budget, path)
            cache.put(i, y)
    return cache


def _grid(bits: int) -> tuple[int, int]:
    """The signed b-bit grid that weights use, symmetric or not."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def recon_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over batch and positions, as BRECQ's lp_loss: the
    scale against which lambda = 0.01 times the summed regulariser is balanced."""
    return (out - target).pow(2).sum(1).mean()


@torch.no_grad()
def _mse(seg, inputs: Cache, targets: Cache, n: int, batch: int, device) -> float:
    tot = 0.0
    with mode(seg, "quant"):
        for i in range(0, n, batch):
            idx = torch.arange(i, min(i + batch, n))
            tot += float(F.mse_loss(seg(inputs.get(idx).to(device)), targets.get(idx).to(device), reduction="sum"))
    return tot / (n * int(np.prod(targets.data.shape[1:])))


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


def train_step(seg, inputs: Cache, targets: Cache, weights: list[AdaRoundWeight], a, beta: float | None,
               gen: torch.Generator, device, opt, opt_s=None):
    """One reconstruction step on a random minibatch: recon loss + lambda * regulariser (off while beta is None),
    backward, Adam on V (and on the LSQ steps). Returns (rec, reg, beta) as tensors / float."""
    n = len(inputs.data)
    idx = torch.sort(torch.randint(0, n, (min(a.batch_size, n),), generator=gen)).values
    rec = recon_loss(seg(inputs.get(idx).to(device)), targets.get(idx).to(device))
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


def reconstruct(p: Prepared, recipe, images: torch.Tensor, workdir: Path, key: str, device="cpu",
                progress: bool = True, cache_mb: int = 2048) -> list[dict]:
    """Learn the rounding of every quantized layer, unit by unit; returns the per-unit report.

    Finished units are written to ``workdir`` as they finish; a rerun with the same ``key`` loads them instead
    of recomputing, and continues with the first unfinished unit."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    a = recipe.adaround
    gm = p.gm.to(device)
    workdir.mkdir(parents=True, exist_ok=True)
    meta = workdir / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("key") != key:
        shutil.rmtree(workdir)
        workdir.mkdir(parents=True)
    write_json(meta, {"key": key})
    units = find_units(p, a.granularity)
    sched = BetaSchedule(a.iters, a.warmup, a.beta[0], a.beta[1])
    report = []
    spent: list[float] = []   # seconds of each unit learned in this run (resumed ones are free)
    for k, unit in enumerate(units):
        done = workdir / f"unit-{k:03d}.safetensors"
        if done.is_file():
            state = load_file(str(done))
            for name in unit.layers:
                gm.get_submodule(name).weight_int = state[f"{name}.weight_int"].to(device)
            for name in unit.act:
                gm.get_submodule(name).scale = state[f"{name}.scale"].to(device)
            _sync_shared(p)
            info = json.loads((workdir / f"unit-{k:03d}.json").read_text())
            report.append({**info, "resumed": True})
            continue
        t_unit = time.perf_counter()
        seg = segment_module(gm, unit.start, unit.nodes)
        half = cache_mb << 19  # bytes: half of the budget each for inputs and targets
        inputs = _fill(prefix_module(gm, unit.start), images, "quant", 64, half, workdir / "in.npy", device)
        targets = _fill(prefix_module(gm, unit.end), images, "float", 64, half, workdir / "out.npy", device)
        n = len(images)
        before = _mse(seg, inputs, targets, n, 64, device)
        nearest = {name: gm.get_submodule(name).weight_int.clone() for name in unit.layers}
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
                    rec, reg, beta = train_step(seg, inputs, targets, list(ada.values()), a, sched(t), gen, device,
                                                opt, opt_s)
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
        after = _mse(seg, inputs, targets, n, 64, device)
        inputs.close()
        targets.close()
        info = {"unit": unit.name, "layers": unit.layers, "mse_before": before, "mse_after": after,
                "changed_from_nearest": changed / max(total, 1), "iters": iters_run}
        state = {f"{name}.weight_int": gm.get_submodule(name).weight_int.cpu().contiguous() for name in unit.layers}
        state.update({f"{name}.scale": gm.get_submodule(name).scale.cpu().reshape(()).contiguous() for name in unit.act})
        write_atomic(workdir / f"unit-{k:03d}.json", json.dumps(info))
        tmp = workdir / f".unit-{k:03d}.tmp"
        save_file(state, str(tmp))
        tmp.replace(done)
        report.append({**info, "resumed": False})
        spent.append(time.perf_counter() - t_unit)
        if progress:   # one line per unit: readable in a log, where the bars are off, and above the bars on a terminal
            left = (len(units) - k - 1) * sum(spent) / len(spent)
            tqdm.write(f"adaround: unit {k + 1}/{len(units)} {unit.name} done in {spent[-1]:.1f} s ({iters_run} "
                       f"iterations, MSE {before:.3g} -> {after:.3g}); about {left:.0f} s left", file=sys.stderr)
    gm.cpu()
    return report


def _sync_shared(p: Prepared) -> None:
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is not None:
            src = p.gm.get_submodule(aq.source)
            aq.scale = src.scale.detach().clone()
            aq.zero_point = src.zero_point.clone()
