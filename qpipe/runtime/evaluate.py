"""``qpipe evaluate``: accuracy, latency and parity of an artifact (or a bare ONNX file) in onnxruntime or
PyTorch. Parity is onnxruntime against the PyTorch quantized model on the same inputs, in output steps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

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


def output_step(art: Artifact | None) -> float | None:
    """Scale of the model's output quantizer (one output step), or None for float outputs."""
    if art is None:
        return None
    return art.record.output_scale()


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

    n = top1 = top5 = fast_top1 = agree = agree_fast = agree_ort = 0
    max_diff = max_diff_fast = max_diff_ort = 0.0
    it = (b for _, b in dist.shard(source.batches("test", batch_size, limit)))  # this rank's share
    for x, y in tqdm(it, desc=f"evaluate {backend}", unit="batch", disable=None if progress else True, leave=False):
        xn, yn = x.numpy(), y.numpy()
        ort_logits = sess.run(None, {"input": xn})[0] if sess else None
        ort_fast = fast.run(None, {"input": xn})[0] if fast else None
        torch_logits = exact_logits = None
        if qmodel is not None:
            with torch.no_grad():
                torch_logits = qmodel(x.to(dev)).float().cpu().numpy()
                exact_logits = exact(x.to(dev)).float().cpu().numpy() if exact is not None else torch_logits
        main = ort_logits if backend == "ort" else torch_logits
        t1, t5 = _topk(main, yn)
        top1, top5, n = top1 + t1, top5 + t5, n + len(yn)
        if ort_fast is not None:
            fast_top1 += _topk(ort_fast, yn)[0]
        if torch_logits is not None and ort_logits is not None:
            agree += int((ort_logits.argmax(1) == torch_logits.argmax(1)).sum())
            agree_fast += int((ort_fast.argmax(1) == exact_logits.argmax(1)).sum())
            max_diff = max(max_diff, float(np.abs(ort_logits - torch_logits).max()))
            max_diff_fast = max(max_diff_fast, float(np.abs(ort_fast - exact_logits).max()))
            max_diff_ort = max(max_diff_ort, float(np.abs(ort_fast - ort_logits).max()))
            agree_ort += int((ort_fast.argmax(1) == ort_logits.argmax(1)).sum())
    if dist.active():  # sums of counts and maxima of differences over the ranks: the single-process numbers
        parts = dist.gather((n, top1, top5, fast_top1, agree, agree_fast, agree_ort, max_diff, max_diff_fast,
                             max_diff_ort))
        n, top1, top5, fast_top1, agree, agree_fast, agree_ort = (sum(p[i] for p in parts) for i in range(7))
        max_diff, max_diff_fast, max_diff_ort = (max(p[i] for p in parts) for i in (7, 8, 9))
    if n == 0:
        raise QpipeError(f"data {data}: no test images")

    metrics = {"backend": backend, "format": fmt, "model_file": onnx_path.name, "data": data, "device": device,
               "provider": provider(sess) if backend == "ort" else f"torch-{device}",
               "accuracy": {"top1": top1 / n, "top5": top5 / n, "n": n}}
    if fast is not None:
        metrics["accuracy_optimized"] = {"top1": fast_top1 / n, "n": n, "provider": provider(fast)}
    step = output_step(art)
    if qmodel is not None and sess is not None:
        steps = (lambda d: round(d / step, 3)) if step else (lambda d: None)
        reference = "torch integer model" if fmt == "int" else "torch quantized model"
        metrics["parity"] = {"reference": reference, "session": "validation (no graph optimisation)",
                             "top1_agreement": agree / n, "max_abs_diff": max_diff,
                             "max_abs_diff_steps": steps(max_diff), "output_step": step}
        metrics["parity_optimized"] = {"session": "fully optimised (fused integer kernels)",
                                       "top1_agreement": agree_fast / n, "max_abs_diff": max_diff_fast,
                                       "max_abs_diff_steps": steps(max_diff_fast)}
        if exact is not None:
            metrics["parity_optimized"]["reference"] = (f"{reference} with onnxruntime's fused-kernel arithmetic "
                                                        f"({exact.fused_groups} fused groups)")
            # layers onnxruntime runs as DequantizeLinear + float op (INT4 weights): float noise there too
            metrics["parity_optimized"]["float_layers"] = len(float_layers)
            # onnxruntime against itself: the float sums of its validation session break ties in other
            # places than its integer kernels, and the model amplifies each one-step move the same way
            metrics["ort_optimized_vs_validation"] = {"max_abs_diff": max_diff_ort,
                                                      "max_abs_diff_steps": steps(max_diff_ort),
                                                      "top1_agreement": agree_ort / n}
    if latency:
        xb = next(iter(source.batches("test", batch_size)))[0]
        if backend == "ort":
            xn = xb.numpy()
            ms = _timeit(lambda: fast.run(None, {"input": xn}))
        else:
            xt = xb.to(dev)

            def fn():
                with torch.no_grad():
                    qmodel(xt)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            ms = _timeit(fn)
        metrics["latency_ms"] = {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                                 "batch_size": len(xb), "runs": len(ms), "warmup": LATENCY_WARMUP,
                                 "session": "fully optimised" if backend == "ort" else "torch eager"}
        metrics["throughput_ips"] = len(xb) / (metrics["latency_ms"]["p50"] / 1000)
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
    cols = ["name", "backend", "format", "provider", "top1", "top5", "agree", "steps", "p50 ms", "img/s"]

    def cell(m, c):
        if c == "name":
            return m.get("name", "")
        if c in ("backend", "format", "provider"):
            return str(m.get(c, ""))
        if c == "top1":
            return f"{100 * m['accuracy']['top1']:.2f}"
        if c == "top5":
            return f"{100 * m['accuracy']['top5']:.2f}"
        par = m.get("parity") or {}
        if c == "agree":
            return f"{100 * par['top1_agreement']:.2f}" if par else "-"
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
