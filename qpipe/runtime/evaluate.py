"""``qpipe evaluate``: accuracy, latency and parity of an artifact (or a bare ONNX file) in onnxruntime or
PyTorch. Parity is onnxruntime against the PyTorch quantized model on the same inputs, in output steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from qpipe import inputs
from qpipe.artifact import Artifact
from qpipe.errors import QpipeError

from .session import make_session, provider

LATENCY_WARMUP = 5
LATENCY_RUNS = 30


def _topk(logits: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    top1 = int((logits.argmax(1) == y).sum())
    k = min(5, logits.shape[1])
    top5 = int((np.argsort(-logits, axis=1)[:, :k] == y[:, None]).any(1).sum())
    return top1, top5


FORMATS = ("qdq", "int", "fp32")


def _resolve(target: str | Path, fmt: str | None = None) -> tuple[Artifact | None, Path, str]:
    p = Path(target)
    if not p.exists():
        raise QpipeError(f"{target} does not exist (give an artifact folder or an .onnx file)")
    if fmt is not None and fmt not in FORMATS:
        raise QpipeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if p.is_dir():
        art = Artifact(p)
        for f in ((fmt,) if fmt else FORMATS):
            if art.file(f"model.{f}.onnx").is_file():
                return art, art.file(f"model.{f}.onnx"), f
        what = f"model.{fmt}.onnx" if fmt else "exported model"
        raise QpipeError(f"{p} has no {what}; run 'qpipe export {p}{' --format ' + fmt if fmt else ''}' first")
    if p.suffix == ".onnx":
        if not p.is_file():
            raise QpipeError(f"ONNX file {p} does not exist")
        art = None
        try:
            art = Artifact(p.parent)
        except QpipeError:
            pass
        fmt = p.name.split(".")[1] if p.name.startswith("model.") and p.name.count(".") == 2 else "onnx"
        return art, p, fmt
    raise QpipeError(f"{target} is neither an artifact folder nor an .onnx file")


def _timeit(fn, warmup=LATENCY_WARMUP, runs=LATENCY_RUNS) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def int4_layers(path: Path) -> set[str]:
    """Layers whose weights an ONNX file holds as INT4 (onnxruntime runs those as DequantizeLinear + float op)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise QpipeError(f"{path} is not a readable ONNX file ({type(e).__name__})") from e
    return {t.name.removesuffix(".weight_quantized") for t in m.graph.initializer
            if t.data_type == onnx.TensorProto.INT4 and t.name.endswith(".weight_quantized")}


def output_step(art: Artifact | None, i: int = 0) -> float | None:
    """Scale of output ``i``'s quantizer (one output step), or None for float outputs."""
    if art is None or i >= len(art.record.output_specs()):
        return None
    return art.record.output_scale(i)


def _match_inputs(art: Artifact, source, data: str) -> None:
    """The data names every input of the model (a one-input model takes a single tensor)."""
    specs = art.record.input_specs()
    names = getattr(source, "input_names", None)
    if names is None:
        if len(specs) != 1:
            raise QpipeError(f"data {data} gives one tensor; the model takes {len(specs)} inputs "
                             f"({', '.join(s.name for s in specs)})")
        return
    missing = [s.name for s in specs if s.name not in names]
    if missing and not (len(specs) == 1 and len(names) == 1):
        raise QpipeError(f"data {data}: the model's input {missing[0]!r} is not in the data (the model takes "
                         f"{', '.join(s.name for s in specs)}; the data has {', '.join(names)})")


def _check_batch(specs, x, limits: dict[str, int], data: str) -> None:
    """Integer inputs get integers; no dynamic axis is longer than the model allows."""
    by_name = {s.name: s for s in specs}
    for name, t in inputs.items(x):
        sp = by_name.get(name) or (specs[0] if len(specs) == 1 else None)
        if sp is None:
            continue
        if sp.is_integer and t.is_floating_point():
            raise QpipeError(f"data {data}: input {name!r} holds floats ({t.dtype}); the model takes {sp.dtype} there")
    dynamic = {s.name: s.dynamic for s in specs}
    if len(specs) == 1:   # one input: whatever the data calls it
        dynamic = {name: specs[0].dynamic for name, _ in inputs.items(x)}
    inputs.check_lengths(limits, x, dynamic, f"data {data}")


def _fp32_reference(art: Artifact | None, onnx_path: Path, fmt: str, device: str, threads):
    """The FP32 graph in onnxruntime (validation session), the reference for cosine / SQNR; exported into the
    artifact when it is not there yet. None without an artifact, and for the FP32 graph itself."""
    if art is None or fmt == "fp32":
        return None
    path = art.file("model.fp32.onnx")
    if not path.is_file():
        from qpipe.export import export

        export(art, "fp32")
    return make_session(path, device, optimized=False, threads=threads)


def _kept(d: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The entries of ``d`` at the tokens an attention mask keeps (an output with a token axis), else all."""
    if mask is None or d.ndim < 2 or d.shape[:2] != mask.shape:
        return d
    return d[mask.astype(bool)]


class Tally:
    """Running sums over test batches: accuracy (labels and a 2-D first output), fidelity to the FP32 graph
    (per-sample cosine, SQNR) and parity (largest difference, top-1 agreement) for every output."""

    def __init__(self, parity_masked: bool = True):
        self.parity_masked = parity_masked   # QDQ parity on the kept tokens; the integer graph's on every value
        self.n = self.top1 = self.top5 = self.fast_top1 = 0
        self.classify = True
        self.n_outputs = 0
        self.cos: list[list[float]] = []          # per output, per sample
        self.sig: list[float] = []                # per output: sum ref^2
        self.err: list[float] = []                # per output: sum (out - ref)^2
        self.diff: dict[str, list[float]] = {}    # pair -> per output largest |a - b|
        self.agree: dict[str, int] = {}           # pair -> samples whose top-1 agree

    def add(self, main, fast, torch_out, exact_out, ort_out, ref, y, mask=None) -> None:
        """One batch. ``mask``: the attention mask (N x L) where the data has one: the fidelity of an output with
        a token axis counts the tokens the mask keeps (a padded position's value is never used)."""
        k = len(y) if y is not None else len(main[0])
        self.n += k
        self.n_outputs = len(main)
        if y is None or main[0].ndim != 2:
            self.classify = False
        elif self.classify:
            t1, t5 = _topk(main[0], y)
            self.top1, self.top5 = self.top1 + t1, self.top5 + t5
            if fast is not None:
                self.fast_top1 += _topk(fast[0], y)[0]
        if ref is not None:
            if not self.cos:
                self.cos, self.sig, self.err = [[] for _ in main], [0.0] * len(main), [0.0] * len(main)
            for i, (a, r) in enumerate(zip(main, ref, strict=True)):
                a64, r64 = a.astype(np.float64), r.astype(np.float64)
                if mask is not None and a.ndim >= 2 and a.shape[:2] == mask.shape:
                    keep = mask.astype(bool).reshape(*mask.shape, *[1] * (a.ndim - 2))
                    a64, r64 = a64 * keep, r64 * keep
                a64, r64 = a64.reshape(len(a), -1), r64.reshape(len(r), -1)
                num = (a64 * r64).sum(1)
                den = np.linalg.norm(a64, axis=1) * np.linalg.norm(r64, axis=1)
                self.cos[i] += np.where(den > 0, num / np.maximum(den, 1e-300), 1.0).tolist()
                self.sig[i] += float((r64**2).sum())
                self.err[i] += float(((a64 - r64) ** 2).sum())
        pairs = {"torch": (ort_out, torch_out), "exact": (fast, exact_out), "ort": (fast, ort_out)}
        for key, (a, b) in pairs.items():
            if a is None or b is None or torch_out is None:
                continue
            d = [float(_kept(np.abs(u - v), mask if self.parity_masked else None).max()) if u.size else 0.0
                 for u, v in zip(a, b, strict=True)]
            old = self.diff.get(key, [0.0] * len(d))
            self.diff[key] = [max(p, q) for p, q in zip(old, d, strict=True)]
            if a[0].ndim == 2:
                self.agree[key] = self.agree.get(key, 0) + int((a[0].argmax(1) == b[0].argmax(1)).sum())

    @staticmethod
    def merge(parts: list[Tally]) -> Tally:
        t = parts[0]
        for o in parts[1:]:
            t.n, t.top1, t.top5, t.fast_top1 = t.n + o.n, t.top1 + o.top1, t.top5 + o.top5, t.fast_top1 + o.fast_top1
            t.classify = t.classify and o.classify
            for i in range(len(o.cos)):
                t.cos[i] += o.cos[i]
                t.sig[i] += o.sig[i]
                t.err[i] += o.err[i]
            for key, d in o.diff.items():
                t.diff[key] = [max(p, q) for p, q in zip(t.diff.get(key, [0.0] * len(d)), d, strict=True)]
            for key, c in o.agree.items():
                t.agree[key] = t.agree.get(key, 0) + c
        return t

    def accuracy(self, fast_provider: str | None) -> dict:
        """Top-1 / top-5 where the data has labels and the model's first output is (N, classes); else nothing."""
        if not self.classify:
            return {}
        out = {"accuracy": {"top1": self.top1 / self.n, "top5": self.top5 / self.n, "n": self.n}}
        if fast_provider is not None:
            out["accuracy_optimized"] = {"top1": self.fast_top1 / self.n, "n": self.n, "provider": fast_provider}
        return out

    def fidelity(self, names: list[str]) -> dict:
        """Per output: mean and least per-sample cosine similarity to the FP32 graph and SQNR in dB; the first
        output's numbers also at the top level (what ``check`` floors name)."""
        per = {}
        for i, name in enumerate(names[: len(self.cos)]):
            c = np.asarray(self.cos[i])
            sqnr = 10 * np.log10(self.sig[i] / self.err[i]) if self.err[i] > 0 else float("inf")
            per[name] = {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "sqnr_db": float(sqnr)}
        first = next(iter(per.values()))
        return {**first, "n": self.n, "outputs": per}

    def parity(self, key: str, steps_of: list[float | None]) -> dict:
        """Largest difference of ``key``'s pair (over outputs, in each output's steps) and top-1 agreement."""
        d = self.diff.get(key, [0.0])
        steps = [round(v / s, 3) if s else None for v, s in zip(d, steps_of, strict=False)]
        known = [v for v in steps if v is not None]
        out = {"max_abs_diff": max(d), "max_abs_diff_steps": max(known) if known else None}
        if len(d) > 1:
            out["outputs_max_abs_diff_steps"] = steps
        if key in self.agree:
            out["top1_agreement"] = self.agree[key] / self.n
        return out


def evaluate(target: str | Path, data=None, backend: str = "ort", device: str = "cpu",
             batch_size: int = 64, latency: bool = True, limit: int | None = None, threads: int | None = None,
             write: bool = True, command: str | None = None, progress: bool = True, model=None,
             format: str | None = None, parity: bool = True) -> dict:
    """Evaluate on the test split; returns (and writes to the artifact) the metrics dict.

    ``data``: a spec string, a source or an iterable of ``(x, y)`` batches (default: the artifact's data).
    ``model``: the float ``nn.Module`` an artifact was calibrated from in memory (for the torch side).
    ``format``: which model of an artifact folder (qdq, int, fp32; default the first exported of these). For
    ``int`` the PyTorch side is the integer simulation, and parity must be exact.
    ``parity=False`` (onnxruntime only): accuracy and latency from the ONNX file alone; no PyTorch model is
    built and nothing of ``qpipe.pipeline`` is imported."""
    import torch
    from tqdm import tqdm

    from qpipe.data import as_source

    if backend not in ("ort", "torch"):
        raise QpipeError(f"unknown backend {backend!r}; use ort or torch")
    if batch_size < 1:
        raise QpipeError(f"--batch-size must be at least 1, got {batch_size}")
    if not parity and backend == "torch":
        raise QpipeError("--no-parity applies to --backend ort (the torch backend is the PyTorch model itself)")
    from qpipe import dist

    rank, world = dist.init(device)
    if rank != 0:  # under torchrun rank 0 alone measures latency and writes the metrics
        latency, write, progress = False, False, False
    art, onnx_path, fmt = _resolve(target, format)
    if data is None:
        data = art.manifest.get("data") if art else None
        if not data:
            raise QpipeError("no --data given and the artifact does not record its data")
    shape = art.record.input_shape if art else (1, 8, 8)
    source = as_source(data, shape)
    if art is not None:   # the data's inputs against the model's, before any work
        _match_inputs(art, source, data)
    data = data if isinstance(data, str) else getattr(source, "name", "<data>")
    if source.size("test") == 0:
        raise QpipeError(f"data {data}: the test split is empty")

    qmodel = None
    if not parity:
        pass   # onnxruntime numbers only: the ONNX file is all that is read
    elif art is not None and fmt == "int" and not (model is None and str(art.manifest.get("model", "")).startswith("<in-memory")):
        from qpipe.pipeline.calibrate import load_int_model

        qmodel = load_int_model(art, model)
    elif art is not None and (backend == "torch" or fmt == "qdq"):
        from qpipe.pipeline.calibrate import load_quantized, load_quantized_from

        if model is not None:
            import copy

            qmodel = load_quantized_from(copy.deepcopy(model), art)
        elif str(art.manifest.get("model", "")).startswith("<in-memory") and backend == "ort":
            qmodel = None  # calibrated from an nn.Module that is not at hand: no parity without it
        else:
            qmodel = load_quantized(art)
    exact = None   # the reference for the optimised session: the Q-model with onnxruntime's fused-kernel arithmetic
    if qmodel is not None and fmt == "qdq" and backend == "ort":
        from qpipe.pipeline.ortexact import fused

        float_layers = int4_layers(onnx_path)
        exact = fused(qmodel, float_layers)
    dev = torch.device(device)
    if qmodel is not None and device == "cuda":
        if not torch.cuda.is_available():
            raise QpipeError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
        qmodel = qmodel.cuda()
        exact = exact.cuda() if exact is not None else None
    if backend == "torch" and qmodel is None:
        raise QpipeError("--backend torch needs an artifact folder (the PyTorch quantized model)")

    sess = fast = None
    if backend == "ort" or fmt in ("qdq", "int"):
        sess = make_session(onnx_path, device, optimized=False, threads=threads)
        fast = make_session(onnx_path, device, optimized=True, threads=threads)
    names = [i.name for i in sess.get_inputs()] if sess is not None else None
    out_names = [o.name for o in sess.get_outputs()] if sess is not None else None
    reference = _fp32_reference(art, onnx_path, fmt, device, threads)
    ref_names = [i.name for i in reference.get_inputs()] if reference is not None else None
    rec = art.record if art is not None else None

    tally = Tally(parity_masked=fmt != "int")
    masked = False
    it = (b for _, b in dist.shard(source.batches("test", batch_size, limit)))  # this rank's share
    for x, y in tqdm(it, desc=f"evaluate {backend}", unit="batch", disable=None if progress else True, leave=False):
        if rec is not None:
            _check_batch(rec.input_specs(), x, rec.axis_limits, data)
        feed = inputs.feed(x, names) if sess else None
        ort_out = sess.run(None, feed) if sess else None
        ort_fast = fast.run(None, feed) if fast else None
        torch_out = exact_out = None
        if qmodel is not None:
            with torch.no_grad():
                xd = inputs.to(x, dev)
                torch_out = [t.float().cpu().numpy() for t in inputs.outputs(inputs.call(qmodel, xd))]
                exact_out = [t.float().cpu().numpy() for t in inputs.outputs(inputs.call(exact, xd))] \
                    if exact is not None else torch_out
        main = ort_out if backend == "ort" else torch_out
        ref = reference.run(None, inputs.feed(x, ref_names)) if reference is not None else None
        mask = x.get("attention_mask") if inputs.is_named(x) else None
        masked = masked or mask is not None
        tally.add(main, ort_fast, torch_out, exact_out, ort_out, ref, None if y is None else y.numpy(),
                  None if mask is None else mask.numpy())
    if dist.active():  # sums of counts and maxima of differences over the ranks: the single-process numbers
        tally = Tally.merge(dist.gather(tally))
    if tally.n == 0:
        raise QpipeError(f"data {data}: no test samples")

    metrics = {"backend": backend, "format": fmt, "model_file": onnx_path.name, "data": data, "device": device,
               "provider": provider(sess) if backend == "ort" else f"torch-{device}"}
    metrics.update(tally.accuracy(provider(fast) if fast is not None else None))
    if reference is not None:
        metrics["fidelity"] = tally.fidelity(out_names or [t.name for t in rec.output_specs()])
        metrics["fidelity"]["reference"] = ("FP32 graph (model.fp32.onnx) in onnxruntime, validation session"
                                            + ("; tokens the attention mask keeps" if masked else ""))
    steps_of = [output_step(art, i) for i in range(tally.n_outputs)]
    if qmodel is not None and sess is not None:
        reference_name = "torch integer model" if fmt == "int" else "torch quantized model"
        metrics["parity"] = {"reference": reference_name, "session": "validation (no graph optimisation)",
                             **tally.parity("torch", steps_of)}
        if masked and fmt != "int":
            metrics["parity"]["tokens"] = "kept by the attention mask"
        metrics["parity"]["output_step"] = steps_of[0]
        metrics["parity_optimized"] = {"session": "fully optimised (fused integer kernels)",
                                       **tally.parity("exact", steps_of)}
        if exact is not None:
            metrics["parity_optimized"]["reference"] = (f"{reference_name} with onnxruntime's fused-kernel arithmetic "
                                                        f"({exact.fused_groups} fused groups)")
            # layers onnxruntime runs as DequantizeLinear + float op (INT4 weights): float noise there too
            metrics["parity_optimized"]["float_layers"] = len(float_layers)
            # onnxruntime against itself: the float sums of its validation session break ties in other
            # places than its integer kernels, and the model amplifies each one-step move the same way
            metrics["ort_optimized_vs_validation"] = tally.parity("ort", steps_of)
    if latency:
        xb = next(iter(source.batches("test", batch_size)))[0]
        if backend == "ort":
            feed = inputs.feed(xb, names)
            ms = _timeit(lambda: fast.run(None, feed))
        else:
            xt = inputs.to(xb, dev)

            def fn():
                with torch.no_grad():
                    inputs.call(qmodel, xt)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            ms = _timeit(fn)
        metrics["latency_ms"] = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                                 "batch_size": inputs.batch_len(xb), "runs": len(ms), "warmup": LATENCY_WARMUP,
                                 "session": "fully optimised" if backend == "ort" else "torch eager"}
        metrics["throughput_ips"] = inputs.batch_len(xb) / (metrics["latency_ms"]["p50"] / 1000)
    else:
        metrics["latency_ms"] = {"p50": None, "p90": None, "batch_size": batch_size}
        metrics["throughput_ips"] = None
    metrics["file_bytes"] = onnx_path.stat().st_size
    if world > 1:
        metrics["world_size"] = world
    if write and art is not None:
        text = json.dumps(metrics, indent=2) + "\n"
        art.add_file(f"metrics-{backend}-{fmt}.json", text)
        art.add_file("metrics.json", text, command)
    return metrics


def format_table(rows: list[dict], title: str | None = None) -> str:
    """A readable fixed-width table of metrics dicts (one row each)."""
    cols = ["name", "backend", "format", "provider", "top1", "top5", "cos", "agree", "steps", "p50 ms", "img/s"]
    if not any("fidelity" in m for m in rows):
        cols.remove("cos")

    def cell(m, c):
        if c == "name":
            return m.get("name", "")
        if c in ("backend", "format", "provider"):
            return str(m.get(c, ""))
        if c in ("top1", "top5"):
            return f"{100 * m['accuracy'][c]:.2f}" if "accuracy" in m else "-"
        if c == "cos":
            return f"{m['fidelity']['cosine_mean']:.4f}" if "fidelity" in m else "-"
        par = m.get("parity") or {}
        if c == "agree":
            return f"{100 * par['top1_agreement']:.2f}" if "top1_agreement" in par else "-"
        if c == "steps":
            s = [par.get("max_abs_diff_steps"), (m.get("parity_optimized") or {}).get("max_abs_diff_steps")]
            return "/".join("-" if v is None else f"{v:g}" for v in s) if par else "-"
        if c == "p50 ms":
            v = m["latency_ms"]["p50"]
            return "-" if v is None else f"{v:.2f}"
        v = m.get("throughput_ips")
        return "-" if v is None else f"{v:.0f}"

    table = [cols] + [[cell(m, c) for c in cols] for m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if title:
        lines.insert(0, title)
    return "\n".join(lines)
