"""The AdaRound table on the digits demo CNN: FP32, nearest, AdaRound (layer) and BRECQ-style (block) at 4, 3
and 2 bits (per-channel, abs-max base, float activations), and W4A8 with and without LSQ; every number is the
onnxruntime top-1 of the exported QDQ model.

    python benchmarks/adaround_table.py [--iters 10000] [--jobs 2] [--out benchmarks/results]

With ``--jobs N`` the settings run in N processes of one torch thread each.
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


def _one_thread():
    import torch

    torch.set_num_threads(1)


def run(name: str, recipe: str, overrides: list[str], root: Path) -> dict:
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    art = qpipe.calibrate("digits-cnn", "digits", recipe, out, overrides=overrides, progress=False)
    qpipe.export(art, "qdq")
    m = evaluate(art.path, backend="ort", latency=False, progress=False)
    row = {"name": name, "recipe": recipe, "overrides": overrides, "top1": m["accuracy"]["top1"],
           "parity_agreement": m["parity"]["top1_agreement"], "seconds": time.perf_counter() - t}
    print(f"{name:32s} {100 * row['top1']:6.2f} %  ({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10_000, help="AdaRound iterations per unit")
    ap.add_argument("--jobs", type=int, default=1, help="settings run in this many processes")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="adaround-table-"))
    base = ["weights.observer=absmax", "weights.granularity=per_channel", "calibration.images=512"]
    it = [f"adaround.iters={args.iters}"]
    jobs = [("fp32", "fp32", [])]
    for b in args.bits:
        wb = [f"weights.bits={b}"]
        jobs.append((f"w{b}a32 nearest", "w4a32", base + wb))
        jobs.append((f"w{b}a32 adaround layer", "w4a32-adaround", base + wb + it))
        jobs.append((f"w{b}a32 adaround block", "w4a32-adaround", base + wb + it + ["adaround.granularity=block"]))
    jobs.append(("w4a8 nearest", "w4a8", base))
    jobs.append(("w4a8 adaround layer, no LSQ", "w4a8-adaround", base + it))
    jobs.append(("w4a8 adaround layer + LSQ", "w4a8-adaround", base + it + ["adaround.lsq=true"]))
    jobs.append(("w4a8 adaround block, no LSQ", "w4a8-brecq", base + it + ["adaround.lsq=false"]))
    jobs.append(("w4a8 adaround block + LSQ (BRECQ)", "w4a8-brecq", base + it))
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
            rows = list(pool.map(run, *zip(*[(n, r, o, root) for n, r, o in jobs], strict=True)))
    else:
        rows = [run(n, r, o, root) for n, r, o in jobs]
    shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaround_table.json").write_text(json.dumps({"iters_per_unit": args.iters, "rows": rows}, indent=2))
    lines = [f"digits-cnn, per-channel abs-max base, {args.iters} AdaRound iterations per unit, onnxruntime top-1",
             "", "| setting | top-1 (%) | ORT vs torch agreement (%) | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {100 * r['top1']:.2f} | {100 * r['parity_agreement']:.2f} | {r['seconds']:.0f} |"
              for r in rows]
    (out / "adaround_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
