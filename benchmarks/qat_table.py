"""The APoT table on the digits CNN: FP32 against uniform-level QAT and APoT QAT at 4, 3 and 2 bits (weights and
activations; first and last layers at 8 bits), each fine-tuned from the shipped float checkpoint with the
``{uniform,apot}-w{b}a{b}`` recipe and measured in onnxruntime from the exported ``model.qdq.onnx`` on the 450
test images, with its parity against the PyTorch quantized model.

    python benchmarks/qat_table.py [--model digits-cnn] [--bits 4 3 2] [--seeds 0 1 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import qpipe
from qpipe.runtime.evaluate import evaluate


def run(model: str, method: str, bits: int, seed: int, root: Path) -> dict:
    out = root / f"{method}-w{bits}a{bits}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if method == "fp32":
        art = qpipe.calibrate(model, "digits", "fp32", out, progress=False)
    else:
        art = qpipe.train_qat(model, "digits", out, method=method, bits=bits, seed=seed, progress=False)
    qpipe.export(art, "qdq")
    m = evaluate(art.path, backend="ort", latency=False, progress=False, format="qdq")
    par = m.get("parity", {})
    row = {"method": method, "bits": bits, "seed": seed, "top1": m["accuracy"]["top1"],
           "agreement": par.get("top1_agreement"), "max_diff_steps": par.get("max_abs_diff_steps"),
           "seconds": time.perf_counter() - t}
    print(f"{method:8s} W{bits}A{bits} seed {seed}: {100 * row['top1']:6.2f} %  agreement "
          f"{100 * (row['agreement'] or 0):.2f} %, {row['max_diff_steps']} steps ({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="qat-table-"))
    rows = [run(args.model, "fp32", 32, 0, root)]
    for bits in args.bits:
        for method in ("uniform", "apot"):
            rows += [run(args.model, method, bits, s, root) for s in args.seeds]
    shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_table.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    fp32 = rows[0]["top1"]

    def cell(method, bits):
        r = [x for x in rows if x["method"] == method and x["bits"] == bits]
        accs = [100 * x["top1"] for x in r]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        return f"{statistics.mean(accs):.2f}{spread} ({', '.join(f'{a:.2f}' for a in accs)})"

    n = len(args.seeds)
    lines = [f"{args.model} on digits, QAT from the shipped float checkpoint; onnxruntime top-1 (%) of "
             f"model.qdq.onnx on 450 test images (one image = 0.22 points), mean ± std over {n} seed(s)", "",
             f"FP32: {100 * fp32:.2f}", "",
             "| W/A bits | uniform QAT | APoT QAT | APoT − FP32 (points) |", "|---|---|---|---:|"]
    for bits in args.bits:
        apot = statistics.mean(100 * x["top1"] for x in rows if x["method"] == "apot" and x["bits"] == bits)
        lines.append(f"| {bits}/{bits} | {cell('uniform', bits)} | {cell('apot', bits)} | {apot - 100 * fp32:+.2f} |")
    worst = max((x["max_diff_steps"] or 0) for x in rows)
    agree = min((x["agreement"] or 1) for x in rows)
    lines += ["", f"ORT vs PyTorch Q-model, every run: top-1 agreement ≥ {100 * agree:.2f} %, max logit difference "
                  f"{worst:g} output steps"]
    (out / "qat_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
