"""The AdderQuant table on the digits AdderNet: FP32 against the naive shared-scale scheme and AdderQuant at 8, 6, 5
and 4 bits (adder weights and the inputs they read; the multiplicative stem and classifier and the tensors between
layers at 8 bits), each calibrated from the shipped checkpoint and measured in onnxruntime from the exported
integer-only graph (``model.int.onnx``) on the 450 test images, with its parity against the PyTorch integer model
and the QDQ graph's accuracy beside it.

    python benchmarks/adder_table.py [--model digits-adder] [--data digits] [--bits 8 6 5 4] [--out benchmarks/results]
    # CIFAR-10 ResNet20-adder, as the paper (its reference code observes and re-estimates BN on 202 x 128 images):
    python benchmarks/adder_table.py --model resnet20-adder --data cifar10:DIR --weights r20a.safetensors \
        --set calibration.images=25856 --set calibration.batch_size=128
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


def run(model: str, data: str, recipe: str, root: Path, weights: str | None = None, overrides=()) -> dict:
    out = root / recipe
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    art = qpipe.calibrate(model, data, recipe, out, weights=weights, overrides=list(overrides), progress=False)
    qpipe.export(art, "all")
    row = {"recipe": recipe}
    for fmt in ("int", "qdq") if art.qparams["int_graph"]["available"] else ("qdq",):
        m = evaluate(art.path, data, backend="ort", latency=False, progress=False, format=fmt)
        par = m.get("parity", {})
        row[fmt] = {"top1": m["accuracy"]["top1"], "agreement": par.get("top1_agreement"),
                    "max_abs_diff": par.get("max_abs_diff"), "max_diff_steps": par.get("max_abs_diff_steps")}
    row["seconds"] = time.perf_counter() - t
    main_fmt = "int" if "int" in row else "qdq"
    print(f"{recipe:18s} {main_fmt}: {100 * row[main_fmt]['top1']:6.2f} %  ({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-adder")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the model's shipped one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="adder-table-"))
    fp32 = run(args.model, args.data, "fp32", root, args.weights, args.overrides)
    rows = {b: {m: run(args.model, args.data, f"{m}-w{b}", root, args.weights, args.overrides)
                for m in ("adder-naive", "adderquant")} for b in args.bits}
    shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adder_table.json").write_text(json.dumps({"model": args.model, "fp32": fp32, "rows": rows}, indent=2))
    f = 100 * fp32["qdq"]["top1"]
    lines = [f"{args.model} on {args.data}: onnxruntime top-1 (%) from the integer-only graph model.int.onnx "
             f"(QDQ graph in brackets); FP32 {f:.2f}", "",
             "| bits | naive shared scale | AdderQuant | AdderQuant − naive (points) | AdderQuant − FP32 (points) |",
             "|---|---|---|---:|---:|"]
    worst = 0.0
    for b in args.bits:
        nv, aq = rows[b]["adder-naive"], rows[b]["adderquant"]
        lines.append(f"| {b} | {100 * nv['int']['top1']:.2f} ({100 * nv['qdq']['top1']:.2f}) | "
                     f"{100 * aq['int']['top1']:.2f} ({100 * aq['qdq']['top1']:.2f}) | "
                     f"{100 * (aq['int']['top1'] - nv['int']['top1']):+.2f} | {100 * aq['int']['top1'] - f:+.2f} |")
        worst = max(worst, nv["int"]["max_abs_diff"], aq["int"]["max_abs_diff"])
    lines += ["", f"Integer graph in onnxruntime against the PyTorch integer model, every row: max |logit difference| "
                  f"{worst:g}"]
    (out / "adder_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
