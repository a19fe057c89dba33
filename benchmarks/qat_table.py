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


def write_table(model: str, rows: list[dict], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_table.json").write_text(json.dumps({"model": model, "rows": rows}, indent=2))
    fp32 = next(x for x in rows if x["method"] == "fp32")["top1"]
    bits = sorted({x["bits"] for x in rows if x["method"] != "fp32"}, reverse=True)

    def accs(method, b):
        return [100 * x["top1"] for x in rows if x["method"] == method and x["bits"] == b]

    def cell(method, b):
        a = accs(method, b)
        spread = f" ± {statistics.stdev(a):.2f}" if len(a) > 1 else ""
        return f"{statistics.mean(a):.2f}{spread} ({', '.join(f'{v:.2f}' for v in a)})"

    n = len({x["seed"] for x in rows if x["method"] != "fp32"})
    lines = [f"{model} on digits, QAT from the shipped float checkpoint; onnxruntime top-1 (%) of model.qdq.onnx "
             f"on 450 test images (one image = 0.22 points), mean ± std over {n} seed(s)", "",
             f"FP32: {100 * fp32:.2f}", "",
             "| W/A bits | uniform QAT | APoT QAT | APoT − FP32 (points) |", "|---|---|---|---:|"]
    for b in bits:
        lines.append(f"| {b}/{b} | {cell('uniform', b)} | {cell('apot', b)} | "
                     f"{statistics.mean(accs('apot', b)) - 100 * fp32:+.2f} |")
    lines.append("")
    for method in ("uniform", "apot"):
        r = [x for x in rows if x["method"] == method]
        worst = max(x["max_diff_steps"] or 0 for x in r)
        agree = min(x["agreement"] for x in r)
        lines.append(f"{method}: onnxruntime against the PyTorch Q-model over all {len(r)} runs: top-1 agreement "
                     f"≥ {100 * agree:.2f} %, max logit difference {worst:g} output steps")
    (out / "qat_table.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, marker in (("uniform", "s"), ("apot", "o")):
        means = [statistics.mean(accs(method, b)) for b in bits]
        (line,) = ax.plot(bits, means, marker=marker, label=f"{method} QAT (mean)")
        for b in bits:
            ax.scatter([b] * len(accs(method, b)), accs(method, b), marker=marker, s=12, alpha=0.4,
                       color=line.get_color())
    ax.axhline(100 * fp32, color="gray", ls="--", label="FP32")
    ax.set_xlabel("weight and activation bits")
    ax.set_ylabel("onnxruntime top-1 (%)")
    ax.set_xticks(bits)
    ax.set_title(f"{model}: QAT accuracy against bits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "qat_accuracy_vs_bits.png", dpi=120)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-cnn")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--from-json", default=None, help="redraw the table and plot from a qat_table.json")
    args = ap.parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        print(write_table(data["model"], data["rows"], Path(args.out)))
        return 0
    root = Path(tempfile.mkdtemp(prefix="qat-table-"))
    rows = [run(args.model, "fp32", 32, 0, root)]
    for bits in args.bits:
        for method in ("uniform", "apot"):
            rows += [run(args.model, method, bits, s, root) for s in args.seeds]
    shutil.rmtree(root, ignore_errors=True)
    print(write_table(args.model, rows, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
