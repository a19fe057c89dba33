"""The ViT table on the digits demo ViT, shaped like the seed's ImageNet ViT-B/16 table: W/A bits 8/32, 4/32,
8/8, 4/8 with float Softmax / GELU / LayerNorm (QDQ graph); 8/8, 4/8 and 4/4 with the I-ViT integer ops, from
the integer-only graph (model.int.onnx). Every number is onnxruntime top-1 on the 450 test images.

    python benchmarks/vit_table.py [--model digits-vit] [--out benchmarks/results]

Weights: per-channel, min-max at 8 bits, MSE at 4 bits with the first and last layer at 8 (the w4a8-int recipe);
activations: symmetric moving-average abs-max (momentum 0.95), 16-bit residual stream, in every quantized row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import qpipe
from qpipe.runtime.evaluate import evaluate

FP_OPS = ["ops.softmax=fp", "ops.gelu=fp", "ops.layernorm=fp"]
ROWS = [  # name, recipe, overrides, evaluated format
    ("FP32", "fp32", [], "qdq"),
    ("W8/A32, FP ops", "w8a8-int", ["activations.bits=32", *FP_OPS], "qdq"),
    ("W4/A32, FP ops", "w4a8-int", ["activations.bits=32", *FP_OPS], "qdq"),
    ("W8/A8, FP ops", "w8a8-int", FP_OPS, "qdq"),
    ("W4/A8, FP ops", "w4a8-int", FP_OPS, "qdq"),
    ("W8/A8, int ops", "w8a8-int", [], "int"),
    ("W4/A8, int ops", "w4a8-int", [], "int"),
    ("W4/A4, int ops", "w4a8-int", ["activations.bits=4"], "int"),
]


def run(model: str, name: str, recipe: str, overrides: list[str], fmt: str, root: Path) -> dict:
    out = root / name.replace("/", "").replace(", ", "-").replace(" ", "_")
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    art = qpipe.calibrate(model, "digits", recipe, out, overrides=overrides, progress=False)
    qpipe.export(art, "all")
    m = evaluate(art.path, backend="ort", latency=False, progress=False, format=fmt)
    par = m.get("parity", {})
    row = {"name": name, "recipe": recipe, "overrides": overrides, "format": fmt, "model_file": m["model_file"],
           "top1": m["accuracy"]["top1"], "agreement": par.get("top1_agreement"),
           "max_diff_steps": par.get("max_abs_diff_steps"), "seconds": time.perf_counter() - t}
    print(f"{name:20s} {m['model_file']:16s} {100 * row['top1']:6.2f} %  ({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-vit")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vit-table-"))
    rows = [run(args.model, *r, root) for r in ROWS]
    shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit_table.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    fp32 = rows[0]["top1"]
    lines = [f"{args.model} on digits (450 test images, one image = 0.22 points), onnxruntime top-1", "",
             "| W/A bits, ops | model file | top-1 (%) | vs FP32 (points) | ORT vs torch agreement (%) | max diff (steps) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.2f}"
        steps = "-" if r["max_diff_steps"] is None else f"{r['max_diff_steps']:g}"
        lines.append(f"| {r['name']} | {r['model_file']} | {100 * r['top1']:.2f} | {100 * (r['top1'] - fp32):+.2f} "
                     f"| {agree} | {steps} |")
    (out / "vit_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
