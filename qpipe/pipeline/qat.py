"""``qpipe train --qat apot|uniform``: quantization-aware fine-tuning from a float checkpoint with learned clipping
(APoT, Li, Dong & Wang ICLR 2020; ALGORITHMS.md section 5), written as an artifact folder like ``qpipe calibrate``.

Training model: the Q-model of the recipe with BatchNorm kept (batch statistics while training). Every middle
Conv/Linear projects its per-layer normalised weights ``(W - mean) / std`` to the method's levels at a learned
``alpha`` (init 3.0); the first and last layers keep uniform ``weights.first_bits`` / ``last_bits`` levels of the raw
weights (alpha init max |W|). Quantizers sit on the inputs of every Conv/Linear and on the output (qmodel QAT
placement): the method's levels (alpha init from the float activations) for middle layers, uniform for the edges.
SGD with momentum and a cosine schedule; the alphas in their own groups (lr ``qat.alpha_lr_*``).

Freezing (exact): a layer's effective weight is ``code * alpha / D``; BatchNorm after it folds into the per-channel
scale ``alpha * |gamma / sigma| / D`` with the code's sign flipped where gamma / sigma < 0, so the artifact stores the
training codes as integers (int8 container) and the QDQ export dequantizes them. APoT activations export as
ai.qpipe APoTProject -> DequantizeLinear(alpha / D).

The artifact also keeps the fine-tuned float state (``trained.safetensors``, the model's own keys), so a lower-bit
run can start from it (``--init``), the paper's progressive 4 -> 3 -> 2 bits.

Resumable: after every epoch the state (model, alphas, optimiser, schedule, history) is written to
``OUT.partial/qat-state.pt`` (atomically); rerunning the same command continues after the last finished epoch. A
non-finite loss stops training with a message and writes no artifact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpipe.artifact import Artifact, write_atomic
from qpipe.errors import QpipeError
from qpipe.kinds import Kind
from qpipe.recipe import Recipe, load_recipe, resolve_path
from qpipe.record import LevelSet
from qpipe.reference import apot as ref

from .apot import Levels, act_step, clip_quantize, code_scale, codes_of, normalize_weights
from .qmodel import Prepared, copy_alias_scales, edge_layers, kind_of, prepare, quantize_biases, sqnr_db
from .train import _shift, accuracy

STATE_FILE = "qat-state.pt"
TRAINED_FILE = "trained.safetensors"   # the fine-tuned float weights and BN: --init of the next, lower-bit run
METHODS = ("apot", "uniform")


def default_recipe(method: str, bits: int, model: str) -> str:
    """``{method}-w{b}a{b}``, or its ``-{model}`` variant where one exists (the paper's resnet20 settings); other
    bit widths start from the 4-bit recipe (``--bits`` sets the bits)."""
    for name in (f"{method}-w{bits}a{bits}-{model}", f"{method}-w{bits}a{bits}", f"{method}-w4a4-{model}"):
        try:
            resolve_path(name)
            return name
        except QpipeError:
            pass
    return f"{method}-w4a4"


class _WeightQuant(nn.Module):
    """Weight levels of one layer: optional per-layer normalisation, then the learned-clipping projection.
    Registered as the layer's ``qat`` submodule by ``QATModel`` (its alpha is the QATModel's parameter)."""

    def __init__(self, alpha: nn.Parameter, levels: Levels, normalize: bool):
        super().__init__()
        self.alpha, self.levels, self.normalize = alpha, levels, normalize

    def source(self, w: torch.Tensor) -> torch.Tensor:
        return normalize_weights(w) if self.normalize else w

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return clip_quantize(self.source(w), self.alpha, self.levels)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return codes_of(self.source(w), self.alpha, self.levels)


class _ActQuant(nn.Module):
    """Learned-clipping levels of one activation quantizer, registered as its ``qat`` submodule."""

    def __init__(self, alpha: nn.Parameter, levels: Levels):
        super().__init__()
        self.alpha, self.levels = alpha, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clip_quantize(x, self.alpha, self.levels)


def _key(name: str) -> str:
    return name.replace(".", "__")


class QATModel(nn.Module):
    """The training Q-model and its learned alphas (``weight_alpha`` / ``act_alpha``, keyed by layer / quantizer).
    Each quantized layer and activation quantizer of ``p.gm`` gets its learned-clipping quantizer as a ``qat``
    submodule for as long as this model lives (its state dict then lists every alpha twice)."""

    def __init__(self, p: Prepared, recipe: Recipe):
        super().__init__()
        self.p, self.recipe = p, recipe
        self.gm = p.gm
        self.weight_alpha = nn.ParameterDict()
        self.act_alpha = nn.ParameterDict()
        self.wq: dict[str, _WeightQuant] = {}
        self.aq: dict[str, _ActQuant] = {}
        edges = edge_layers(recipe, p.layers)
        for name in p.layers:
            m = self.gm.get_submodule(name)
            edge = name in edges
            bits = p.weight_bits[name]   # the one bit policy (layer_bits)
            levels = Levels("uniform" if edge else recipe.qat.method, bits, True, weight=True)
            init = float(m.weight.detach().abs().max()) if edge else recipe.qat.weight_alpha_init
            self.weight_alpha[_key(name)] = nn.Parameter(torch.tensor(init))
            self.wq[name] = _WeightQuant(self.weight_alpha[_key(name)], levels, normalize=not edge)
            m.qat = self.wq[name]
        for name in p.act:
            aq = self.gm.get_submodule(name)
            if aq.source is not None and aq.apot:
                continue   # passes its source's levels through
            src = aq.source or name
            if src not in self.act_alpha:
                self.act_alpha[_key(src)] = nn.Parameter(torch.tensor(1.0))
            self.aq[name] = _ActQuant(self.act_alpha[_key(src)], aq.levels)
            aq.qat = self.aq[name]

    def forward(self, x):
        return self.gm(x)

    def detach(self) -> None:
        """Take the learned-clipping quantizers off the layers and activation quantizers again."""
        for name in [*self.wq, *self.aq]:
            m = self.gm.get_submodule(name)
            if "qat" in m._modules:
                del m.qat

    @torch.no_grad()
    def init_act_alphas(self, images: torch.Tensor, batch_size: int) -> dict[str, float]:
        """alpha of each activation quantizer from the float model: max |x| for 8-bit (edge) quantizers, the
        ``qat.act_alpha_quantile`` of |x| for the others, or ``qat.act_alpha_init`` when the recipe fixes it."""
        from .qmodel import mode

        q = self.recipe.qat
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for name in self.aq:
            aq = self.gm.get_submodule(name)
            if aq.source is None:
                hooks.append(aq.register_forward_hook(
                    lambda mod, inp, out, n=name: seen.setdefault(n, []).append(inp[0].detach().abs().flatten())))
        was = self.gm.training
        self.gm.eval()
        try:
            with mode(self.gm, "float"):
                for i in range(0, len(images), batch_size):
                    self.gm(images[i : i + batch_size])
        finally:
            for h in hooks:
                h.remove()
            self.gm.train(was)
        gen = torch.Generator().manual_seed(self.recipe.seed)
        out = {}
        for name, parts in seen.items():
            v = torch.cat(parts)
            aq = self.gm.get_submodule(name)
            middle = aq.levels.kind == self.recipe.qat.method and aq.spec.bits == self.recipe.activations.bits
            if middle and q.act_alpha_init is not None:
                a = q.act_alpha_init
            elif middle:
                if v.numel() > 2_000_000:
                    v = v[torch.randint(0, v.numel(), (2_000_000,), generator=gen)]
                a = float(torch.quantile(v.float(), q.act_alpha_quantile))
            else:
                a = float(v.max())
            a = max(a, 1e-6)
            self.act_alpha[_key(name)].fill_(a)
            out[name] = a
        return out


def _bn_after(gm: fx.GraphModule) -> dict[str, nn.BatchNorm2d]:
    """layer -> the BatchNorm that reads only it (what fold_batchnorm folds)."""
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and kind_of(node, modules) == Kind.BN:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 \
                    and isinstance(modules.get(src.target), nn.Conv2d):
                out[src.target] = modules[node.target]
    return out


@torch.no_grad()
def freeze(qm: QATModel, template: nn.Module, recipe: Recipe) -> tuple[Prepared, dict[str, float],
                                                                      dict[str, LevelSet]]:
    """The frozen artifact Q-model (BN folded) carrying the training codes exactly: (prepared, weight SQNR in dB
    per layer, the level set of every weight and activation quantizer)."""
    qm.eval()
    gm = qm.gm
    bns = _bn_after(gm)
    model = copy.deepcopy(template)
    own = model.state_dict()
    state = {k: v for k, v in gm.state_dict().items() if k in own}
    model.load_state_dict(state)
    effective = {}
    for name, wq in qm.wq.items():
        w = gm.get_submodule(name).weight
        effective[name] = wq(w).detach()
        model.get_submodule(name).weight.copy_(effective[name])
    p = prepare(model.eval(), recipe)
    info, extra = {}, {}
    for name in p.layers:
        wq, m = qm.wq[name], p.gm.get_submodule(name)
        codes = wq.codes(gm.get_submodule(name).weight)
        bn = bns.get(name)
        c_out = codes.shape[0]
        f = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)) if bn is not None \
            else torch.ones(c_out, dtype=torch.float64)
        sign = torch.where(f < 0, -1, 1)
        step = code_scale(wq.alpha.detach().float(), wq.levels).double()
        scale = (step * f.abs()).float()
        scale = torch.where(scale > 0, scale, step.float())   # a dead channel (gamma = 0): codes 0 at any scale
        codes = torch.where((f == 0).reshape(-1, *[1] * (codes.ndim - 1)), torch.zeros_like(codes), codes)
        q = codes * sign.reshape(-1, *[1] * (codes.ndim - 1))
        m.weight_int = q.to(torch.int8)
        m.weight_scale = scale
        m.weight_zero_point = torch.zeros(c_out, dtype=torch.int32)
        m.weight.copy_(q.float() * scale.reshape(-1, *[1] * (codes.ndim - 1)))
        src = wq.source(gm.get_submodule(name).weight.detach())
        info[name] = sqnr_db(src, effective[name])
        extra[f"{name}.weight"] = LevelSet(wq.levels.kind, wq.levels.denominator, float(wq.alpha), wq.normalize)
    for name in p.act:
        aq = p.gm.get_submodule(name)
        if aq.source is not None:
            continue
        alpha = qm.act_alpha[_key(name)].detach().float()
        lv = aq.levels
        aq.zero_point = torch.tensor(0, dtype=torch.int32)
        rec = LevelSet(lv.kind, lv.denominator, float(alpha))
        if aq.apot:
            aq.alpha = alpha.clone()
            aq.scale = code_scale(alpha, lv)
            rec = dataclasses.replace(rec, fine_step=float(act_step(alpha, lv)),
                                      table=tuple(int(v) for v in ref.fine_table(lv.bits)),
                                      codes=tuple(int(v) for v in ref.level_codes(lv.bits, False)))
        else:
            aq.scale = act_step(alpha, lv)
        extra[name] = rec
    copy_alias_scales(p)
    quantize_biases(p)
    return p, info, extra


@contextlib.contextmanager
def attached(p: Prepared, recipe: Recipe):
    """QAT of the prepared model ``p`` inside the block: yields its ``QATModel`` (learned-clipping quantizers
    attached as submodules), detached again on exit."""
    qm = QATModel(p, recipe)
    try:
        yield qm
    finally:
        qm.detach()


def _save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())


def _file_sha(path) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return h[:16]


def train_qat(model_spec: str, data: str, out: str | Path, *, method: str | None = None, bits: int | None = None,
              recipe: str | Recipe | None = None, init: str | None = None, overrides=(), seed: int | None = None,
              command: str | None = None, progress: bool = True, device: str = "cpu") -> Artifact:
    """Fine-tune ``model_spec`` from ``init`` (default: its shipped checkpoint) with quantization-aware training and
    write the artifact folder ``out``. ``method`` / ``bits`` choose the default recipe ``{method}-w{b}a{b}``
    and override ``qat.method``, ``weights.bits`` and ``activations.bits``."""
    from tqdm import tqdm

    from qpipe.data import load_data
    from qpipe.models import REGISTRY, ROOT, load_model

    from .adaround import run_key
    from .calibrate import qparams_record, write_artifact

    if method is not None and method not in METHODS:
        raise QpipeError(f"unknown --qat method {method!r}; use one of {', '.join(METHODS)}")
    if recipe is None:
        if method is None or bits is None:
            raise QpipeError("qat needs a recipe, or --qat METHOD with --bits B")
        recipe = default_recipe(method, bits, model_spec)
    extra_over = list(overrides)
    if method is not None:
        extra_over.append(f"qat.method={method}")
    if bits is not None:
        if not 2 <= bits <= 8:
            raise QpipeError(f"--bits {bits} is outside 2..8")
        extra_over += [f"weights.bits={bits}", f"activations.bits={bits}"]
    r = load_recipe(recipe, extra_over, seed)
    if r.qat.method == "none":
        raise QpipeError(f"recipe {r.name} sets no qat.method; use an apot-* or uniform-* recipe or --qat")
    out = Path(out)
    if out.exists():
        raise QpipeError(f"output folder {out} already exists; choose another --out or remove it")
    if init is None:
        info = REGISTRY.get(model_spec)
        if info is None or not info.checkpoint or not (ROOT / info.checkpoint).is_file():
            raise QpipeError(f"QAT fine-tunes a trained float model, and {model_spec} ships no checkpoint: pass "
                             f"--init CHECKPOINT (qpipe train --model {model_spec} makes one)")
        init = str(ROOT / info.checkpoint)
    from .train import check_device

    dev = check_device(device)
    model = load_model(model_spec, init)
    source = load_data(data)
    template = copy.deepcopy(model)
    torch.manual_seed(r.seed)
    train_recipe = dataclasses.replace(r, fold_bn=False)  # BatchNorm trains; the artifact folds it
    p = prepare(model, train_recipe)
    if not p.layers:
        raise QpipeError(f"model {model_spec} has no Conv2d/Linear layer to quantize")
    with attached(p, r) as qm:   # the layers and quantizers carry their learned-clipping quantizers
        qm.to(dev)
        q = r.qat
        calib = [x for x, _ in source.batches("calib", r.calibration.batch_size, r.calibration.images)]
        if not calib:
            raise QpipeError("calibration data is empty")
        if source.size("train") == 0:
            raise QpipeError("training data is empty")

        workdir = Path(str(out) + ".partial")
        key = run_key({"recipe": r.to_dict(), "model": model_spec, "init": _file_sha(init), "data": data})
        state_path = workdir / STATE_FILE
        n = source.size("train")
        steps_per_epoch = math.ceil(n / q.batch_size)
        alphas = {id(a) for a in [*qm.act_alpha.values(), *qm.weight_alpha.values()]}
        weights = [w for w in qm.gm.parameters() if id(w) not in alphas]   # the model's own weights and BN
        opt = torch.optim.SGD([
            {"params": weights, "lr": q.lr, "weight_decay": q.weight_decay},
            {"params": list(qm.act_alpha.parameters()), "lr": q.alpha_lr_acts, "weight_decay": q.alpha_weight_decay},
            {"params": list(qm.weight_alpha.parameters()), "lr": q.alpha_lr_weights,
             "weight_decay": q.alpha_weight_decay},
        ], lr=q.lr, momentum=q.momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=q.epochs * steps_per_epoch)
        start, history, alpha_init = 0, [], None
        if state_path.is_file():
            try:
                st = torch.load(state_path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise QpipeError(f"{state_path} is not a readable training state; remove {workdir} to start "
                                 "again") from e
            if st.get("key") == key:
                qm.load_state_dict(st["model"])
                opt.load_state_dict(st["opt"])
                sched.load_state_dict(st["sched"])
                start, history, alpha_init = int(st["epoch"]), list(st["history"]), st.get("alpha_init")
        resumed_from = start
        if start == 0:
            alpha_init = qm.init_act_alphas(torch.cat(calib).to(dev), r.calibration.batch_size)
            workdir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(range(start, q.epochs), desc=f"qat {r.qat.method} {model_spec}", unit="epoch",
                   initial=start, total=q.epochs, disable=None if progress else True)
        for epoch in bar:
            qm.train()
            g = torch.Generator().manual_seed(r.seed * 1000 + epoch)
            tot = correct = 0.0
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(source.batches("train", q.batch_size, shuffle_seed=r.seed * 1000 + epoch)):
                if q.augment and x.shape[-1] <= 32:
                    x = _shift(x, g)
                x, y = x.to(dev), y.to(dev)
                logits = qm(x)
                loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    done = f"; epochs up to {start} are kept in {workdir}" if start else ""
                    raise QpipeError(f"training diverged: the loss is {float(loss.detach())} at epoch {epoch + 1}, step "
                                     f"{step + 1} (lr {sched.get_last_lr()[0]:.3g}); lower qat.lr or "
                                     f"qat.alpha_lr_*{done}; no artifact written")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for a in [*qm.act_alpha.values(), *qm.weight_alpha.values()]:
                        a.clamp_(min=1e-6)   # a clipping range stays positive
                tot += float(loss.detach()) * len(x)
                correct += float((logits.argmax(1) == y).sum())
            history.append({"epoch": epoch + 1, "loss": tot / n, "train_top1": correct / n,
                            "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)})
            bar.set_postfix(loss=f"{tot / n:.4f}", top1=f"{100 * correct / n:.1f}%")
            start = epoch + 1
            _save_state(state_path, {"key": key, "epoch": epoch + 1, "model": qm.state_dict(), "opt": opt.state_dict(),
                                     "sched": sched.state_dict(), "history": history, "alpha_init": alpha_init})
        calib_top1 = accuracy(qm, source, "calib")
        qm.cpu()
        frozen, info, extra = freeze(qm, template, r)
        shape = tuple(source.input_shape)
        record = qparams_record(frozen, r, info, shape)
        observer = f"qat-{r.qat.method}"
        tensors = {name: dataclasses.replace(enc, levels=extra[name], observer=observer) if name in extra else enc
                   for name, enc in record.tensors.items()}
        report = {"method": r.qat.method, "epochs": q.epochs, "init": str(Path(init).resolve()),
                  "alpha_init": alpha_init, "resumed_from_epoch": resumed_from, "history": history,
                  "calib_top1_training_model": calib_top1}
        record = record.replace(tensors=tensors, qat=report)
        reason = ("APoT levels are not a uniform grid, so there is no integer-only requantisation of them; "
                  "model.qdq.onnx carries the exact codes") if r.qat.method == "apot" else None
        from safetensors.torch import save as st_save

        own = template.state_dict()
        trained = {k: v.detach().contiguous() for k, v in qm.gm.state_dict().items() if k in own}
        write_artifact(out, frozen, r, record, shape, model_spec=model_spec, weights=init, data=data,
                       images=sum(len(x) for x in calib), command=command or "qpipe.train_qat()",
                       int_graph_reason=reason, extra_files={TRAINED_FILE: st_save(trained)})
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return Artifact(out)


__all__ = ("train_qat", "freeze", "QATModel", "default_recipe")
