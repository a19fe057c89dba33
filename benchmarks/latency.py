"""onnxruntime CPU latency: FP32 against qpipe's QDQ exports (and onnxruntime's own quantizer as a control).

    python benchmarks/latency.py --out benchmarks/results          # full run (writes latency.json, latency.md)
    python benchmarks/latency.py --out /tmp/lat --quick            # smoke test: few runs

Models: the demo CNN (``digits-cnn`` on ``digits``, 1x8x8, its shipped checkpoint) and ResNet18 (random weights,
224x224, ``synthetic:3x224x224:16``), at batch 1 and 8; the demo ViT (``digits-vit``, shipped checkpoint) and
ViT-B/16 (random weights) at batch 1: FP32, QDQ with float ops, QDQ with the ai.qpipe integer ops and the
integer-only graph (``model.int.onnx``, whose ai.qpipe functions onnxruntime inlines into plain integer ops). Every session is fully optimised
(``timing_session``: intra-op N threads, inter-op 1, worker threads that sleep rather than spin when idle: with several
sessions in one process, the threads of the session that just ran would otherwise spin on the cores the next one
needs, which on 2 cores tripled FP32's median at batch 1 and made the ranking depend on which session ran before
which). After a warm-up, every
variant of a model runs once per iteration of ONE loop (the order rotates each iteration), so load drift on the
machine hits FP32 and the QDQ files alike; we report the median and the 90th percentile of each.

Also written: file sizes against ``model.fp32.onnx``, the fused-kernel census of each optimised graph, and the
parity of the qpipe QDQ files in the fully optimised session against the validation session
(``optimized=False``) in output steps (the scale of the output quantizer), with top-1 agreement.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import qpipe
from qpipe.artifact import Artifact
from qpipe.data import load_data
from qpipe.runtime.session import make_session

# worker threads sleep when idle: see the module docstring
NO_SPIN = {"session.intra_op.allow_spinning": "0"}
RESNET_OVERRIDES = ["calibration.images=16", "calibration.batch_size=8"]
RECIPES = {"w8a8": "qpipe W8A8 QDQ", "w7a8": "qpipe W7A8 QDQ (w within ±64: u8 x s8 kernel)",
           "w4a8": "qpipe W4A8 QDQ"}
VIT_RECIPES = {"w8a8": "qpipe W8A8 QDQ (float ops)", "w8a8-int": "qpipe W8A8 QDQ (ai.qpipe int ops)"}
INT_LABEL = "qpipe W8A8 integer-only (model.int.onnx)"
ADDER_RECIPES = {"adderquant-w8": "qpipe AdderQuant W8 QDQ (float Adder2d)",
                 "adderquant-w4": "qpipe AdderQuant W4 QDQ (float Adder2d)"}
MODELS = [
    # name, data spec, calibration overrides, onnxruntime quantize_static control?, loop multiplier
    # (the CNN runs in microseconds: 10x the samples cost nothing and steady its median), the recipes, the
    # recipe whose integer-only graph is timed too, batch sizes
    {"model": "digits-cnn", "data": "digits", "overrides": [], "ort_control": False, "runs_factor": 10,
     "recipes": RECIPES, "int": None, "batches": (1, 8)},
    {"model": "resnet18", "data": "synthetic:3x224x224:16", "overrides": RESNET_OVERRIDES, "ort_control": True,
     "runs_factor": 1, "recipes": RECIPES, "int": None, "batches": (1, 8)},
    {"model": "digits-vit", "data": "digits", "overrides": [], "ort_control": False, "runs_factor": 10,
     "recipes": VIT_RECIPES, "int": "w8a8-int", "batches": (1,)},
    {"model": "vit_b_16", "data": "synthetic:3x224x224:16", "overrides": RESNET_OVERRIDES, "ort_control": False,
     "runs_factor": 1, "recipes": VIT_RECIPES, "int": "w8a8-int", "batches": (1,)},
    # the demo AdderNet: the FP32 graph runs the float ai.qpipe Adder2d too; "int" is AdderQuant W4's graph
    {"model": "digits-adder", "data": "digits", "overrides": [], "ort_control": False, "runs_factor": 3,
     "recipes": ADDER_RECIPES, "int": "adderquant-w4", "batches": (1, 8), "int_label":
     "qpipe AdderQuant W4 integer-only (model.int.onnx)"},
]
ORT_LABEL = "onnxruntime quantize_static QDQ (U8 act / S8 weight, per-channel)"
FP32_LABEL = "FP32"
PARITY_IMAGES = 16  # images for the optimised-vs-validation parity (the 16 synthetic ones for ResNet18)


def machine_info(threads: int) -> dict:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    interesting = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"]
    import torch

    return {
        "platform_processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in interesting},
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "qpipe": qpipe.__version__,
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "session_config": NO_SPIN,
        "graph_optimization": "ORT_ENABLE_ALL",
        "provider": "CPUExecutionProvider",
    }


def get_artifact(root: Path, model: str, data: str, recipe: str, overrides: list[str]) -> Artifact:
    out = root / f"{model}-{recipe}"
    if (out / "model.qdq.onnx").is_file() and (out / "model.fp32.onnx").is_file() \
            and (out / "model.int.onnx").is_file() == bool(json.load(open(out / "qparams.json"))
                                                         .get("int_graph", {}).get("available")):
        print(f"  reusing {out}", file=sys.stderr)
        return Artifact(out)
    t = time.perf_counter()
    art = qpipe.calibrate(model, data, recipe, out, overrides=overrides, progress=False)
    qpipe.export(art, "all")
    print(f"  calibrated + exported {model} {recipe} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return art


def ort_quantize(fp32: Path, out: Path, source, overrides: list[str]) -> Path:
    """onnxruntime's own static quantizer on the same FP32 file and the same calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if out.is_file():
        return out
    opts = dict(o.split("=", 1) for o in overrides)
    images = int(opts.get("calibration.images", 16))
    bs = int(opts.get("calibration.batch_size", 8))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x.numpy()} for x, _ in source.batches("calib", bs, images)])

        def get_next(self):
            return next(self.it, None)

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quiet the "consider pre-processing" advice
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def op_census(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in m.graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def timing_session(path, threads: int, optimized_model_path=None) -> ort.InferenceSession:
    """A fully optimised session for the alternated loops: ``threads`` intra-op threads that do not spin when idle."""
    return make_session(path, optimized=True, threads=threads, optimized_model_path=optimized_model_path,
                        config=NO_SPIN)


def time_alternated(sessions: dict[str, ort.InferenceSession], x, warmup: int, runs: int) -> dict:
    """One loop; every iteration runs each session once, the starting session rotating each iteration. ``x``: the
    one input's array, or named arrays (each session gets the ones its graph takes)."""
    names = list(sessions)
    if isinstance(x, dict):
        feeds = {n: {i.name: x[i.name] for i in sessions[n].get_inputs()} for n in names}
    else:
        feeds = {n: {sessions[n].get_inputs()[0].name: x} for n in names}
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds[n])
    ms: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t = time.perf_counter()
            sessions[n].run(None, feeds[n])
            ms[n].append((time.perf_counter() - t) * 1000.0)
    return {n: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)),
                "min_ms": min(v), "runs": len(v), "warmup": warmup} for n, v in ms.items()}


def alternated_by_batch(sessions: dict[str, ort.InferenceSession], batches: dict[int, object], warmup: int,
                        runs: int) -> dict[str, dict]:
    """``time_alternated`` at each batch size (``{size: input}``), with every row's speed-up against "FP32"."""
    out = {}
    for bs, x in batches.items():
        res = time_alternated(sessions, x, warmup, runs)
        for label in res:
            res[label]["vs_fp32"] = res["FP32"]["median_ms"] / res[label]["median_ms"]
        out[str(bs)] = res
    return out


def write_result(out: Path, stem: str, result: dict, md: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` in ``out``; the table is printed too."""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(md)


def parity(art: Artifact, x: np.ndarray, threads: int, fmt: str = "qdq") -> dict:
    """Fully optimised session against the validation session on the same images, in output steps."""
    q = json.load(open(art.file("qparams.json")))
    oq = q.get("output_quantizer")
    step = float(q["tensors"][oq]["scale"]) if oq else None
    path = art.file(f"model.{fmt}.onnx")
    val = make_session(path, optimized=False).run(None, {"input": x})[0]
    fast = make_session(path, optimized=True, threads=threads).run(None, {"input": x})[0]
    d = np.abs(fast.astype(np.float64) - val.astype(np.float64))
    return {"images": len(x), "output_quantizer": oq, "output_step": step, "max_abs_diff": float(d.max()),
            "max_abs_diff_steps": float(d.max() / step) if step else None,
            "mean_abs_diff_steps": float(d.mean() / step) if step else None,
            "elements_differing": int((d > 0).sum()), "elements": int(d.size),
            "top1_agreement": float((fast.argmax(1) == val.argmax(1)).mean())}


def run_model(spec: dict, root: Path, args) -> dict:
    name, data = spec["model"], spec["data"]
    print(f"[{name}] calibrating", file=sys.stderr)
    recipes = spec["recipes"]
    arts = {r: get_artifact(root, name, data, r, spec["overrides"]) for r in recipes}
    fp32 = arts[next(iter(recipes))].file("model.fp32.onnx")  # every artifact writes the same float graph
    files = {FP32_LABEL: fp32}
    files.update({recipes[r]: arts[r].file("model.qdq.onnx") for r in recipes})
    int_label = spec.get("int_label", INT_LABEL)
    if spec["int"]:
        files[int_label] = arts[spec["int"]].file("model.int.onnx")
    source = load_data(data)
    if spec["ort_control"]:
        files[ORT_LABEL] = ort_quantize(fp32, root / f"{name}-ort-qdq.onnx", source, spec["overrides"])

    fp32_bytes = fp32.stat().st_size
    variants = {}
    sessions = {}
    for label, path in files.items():
        opt_path = root / f"{name}-{Path(path).parent.name}-{Path(path).name}.opt.onnx"
        sessions[label] = timing_session(path, args.threads, optimized_model_path=opt_path)
        size = Path(path).stat().st_size
        variants[label] = {"file": str(path.relative_to(root)), "bytes": size, "size_vs_fp32": size / fp32_bytes,
                           "optimized_ops": op_census(opt_path)}

    runs = args.runs * spec["runs_factor"]
    latency = {}
    for bs in spec["batches"]:
        x = next(iter(source.batches("test", bs)))[0].numpy()
        print(f"[{name}] batch {bs}: {runs} alternated runs of {len(sessions)} sessions", file=sys.stderr)
        res = time_alternated(sessions, x, args.warmup, runs)
        base = res[FP32_LABEL]["median_ms"]
        for label in res:
            res[label]["speedup_vs_fp32"] = base / res[label]["median_ms"]
            res[label]["images_per_s"] = bs / (res[label]["median_ms"] / 1000.0)
        latency[str(bs)] = res

    xp = next(iter(source.batches("test", PARITY_IMAGES)))[0].numpy()
    par = {recipes[r]: parity(arts[r], xp, args.threads) for r in recipes}
    if spec["int"]:
        par[spec.get("int_label", INT_LABEL)] = parity(arts[spec["int"]], xp, args.threads, "int")
    return {"model": name, "data": data, "input_shape": list(source.input_shape), "variants": variants,
            "latency": latency, "parity_optimized_vs_validation": par}


def markdown(result: dict) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, v in m["cpu_flags"].items() if v)
    lines = [
        "# onnxruntime CPU latency: FP32 vs QDQ",
        "",
        f"CPU: {m['cpu_model']} ({m['cpu_count']} logical CPUs; flags: {flags}); platform.processor(): "
        f"{m['platform_processor'] or '-'}; onnxruntime {m['onnxruntime']}, CPUExecutionProvider, "
        f"ORT_ENABLE_ALL, {m['intra_op_threads']} intra-op / {m['inter_op_threads']} inter-op threads. "
        f"Load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}.",
        "",
        f"Median and p90 of {result['runs']} runs per variant (digits-cnn: {result['runs'] * 10}) after "
        f"{result['warmup']} warm-up runs; all variants of a model alternate inside one loop. "
        "Speed-up = FP32 median / variant median.",
        "",
        "| model | variant | batch | median ms | p90 ms | speed-up | file MB | size / FP32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mr in result["models"]:
        for bs, res in mr["latency"].items():
            for label, r in res.items():
                v = mr["variants"][label]
                lines.append(f"| {mr['model']} | {label} | {bs} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | "
                             f"{r['speedup_vs_fp32']:.2f}x | {v['bytes'] / 1e6:.3f} | {100 * v['size_vs_fp32']:.1f}% |")
    lines += ["", "Parity of the fully optimised session against the validation session (no graph optimisation), "
              "same images:", "",
              "| model | variant | images | output step | max diff (steps) | mean diff (steps) | top-1 agreement |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for mr in result["models"]:
        for label, p in mr["parity_optimized_vs_validation"].items():
            step = "-" if p["output_step"] is None else f"{p['output_step']:.4g}"
            mx = "-" if p["max_abs_diff_steps"] is None else f"{p['max_abs_diff_steps']:.3g}"
            mean = "-" if p["mean_abs_diff_steps"] is None else f"{p['mean_abs_diff_steps']:.3g}"
            lines.append(f"| {mr['model']} | {label} | {p['images']} | {step} | {mx} | {mean} | "
                         f"{100 * p['top1_agreement']:.1f}% |")
    lines += ["", "Fused kernels in the optimised graphs (integer kernels / float Conv left):", ""]
    for mr in result["models"]:
        for label, v in mr["variants"].items():
            ops = v["optimized_ops"]
            qconv = ops.get("com.microsoft::QLinearConv", 0)
            fconv = sum(n for k, n in ops.items() if k.endswith("::Conv") or k.endswith("::FusedConv"))
            qadd = ops.get("com.microsoft::QLinearAdd", 0)
            lines.append(f"- {mr['model']} / {label}: QLinearConv {qconv}, float Conv {fconv}, QLinearAdd {qadd}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for latency.json and latency.md")
    ap.add_argument("--artifacts", default=None,
                    help="keep (and reuse) the artifacts in this folder; default: a temporary folder")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (inter-op is 1)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per variant (at least 20 unless --quick)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 runs, 1 warm-up")
    ap.add_argument("--models", nargs="+", default=None, help="only these models (default: all)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.warmup = 3, 1
    elif args.runs < 20:
        ap.error("--runs must be at least 20 (use --quick for a smoke test)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine_info(args.threads)
    with tempfile.TemporaryDirectory(prefix="qpipe-latency-") as tmp:
        root = Path(args.artifacts) if args.artifacts else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        specs = [m for m in MODELS if not args.models or m["model"] in args.models]
        models = [run_model(spec, root, args) for spec in specs]
    info["loadavg_end"] = list(os.getloadavg())
    result = {"machine": info, "runs": args.runs, "warmup": args.warmup, "quick": args.quick,
              "batches": {m["model"]: list(m["batches"]) for m in MODELS}, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "models": models}
    (out / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "latency.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
