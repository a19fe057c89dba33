"""AdaRound / BRECQ reconstruction speed and memory on the CPU.

    python benchmarks/adaround_speed.py --out benchmarks/results     # full run (adaround_speed.json / .md)
    python benchmarks/adaround_speed.py --out /tmp/ada --quick       # smoke test: few iterations

1. ResNet18 (random weights, 224x224, 256 images of ``synthetic:3x224x224:256``), recipe ``w4a32`` with
   ``weights.rounding=adaround`` and ``weights.observer=absmax``: for a 3x3 conv layer unit (``layer2.0.conv2``,
   granularity ``layer``) and a residual block unit (the ``block`` unit holding ``layer2.0``):

   - the time to fill the unit's input cache (quantized model, ``mode("quant")``) and target cache (float model)
     for the 256 images, with qpipe's own ``Stream`` / ``Cache`` (batch 64, as ``reconstruct``);
   - seconds per 1 000 optimisation steps at batch 32: the step ``reconstruct`` performs (random batch from the
     cache, forward of ``segment_module`` in ``mode("quant")`` with ``AdaRoundWeight`` soft weights, ``recon_loss`` +
     ``regularizer`` under ``BetaSchedule``, backward, Adam step), timed one step at a time after a few warm-up
     steps. The timed steps walk the beta schedule of a 1 000-step run (the first 20 % without the regulariser,
     as in a real run), so the mean is the cost of 1 000 real steps;
   - a cross-check: qpipe's real ``reconstruct`` run on that one unit (``find_units`` narrowed to it) with fewer
     steps, its cache fills (``Stream.value``) and ``_mse`` calls timed, so the rest is its optimisation loop;
   - the process's peak RSS (``ru_maxrss``) after all this, against 4 GiB.

2. The demo CNN (``digits-cnn`` on ``digits``, shipped checkpoint): the wall time of a full W4A32 AdaRound run
   through the public API (``qpipe.calibrate(..., "w4a32-adaround", overrides=["adaround.iters=2000"])``) against
   2 minutes, and the onnxruntime top-1 of its QDQ export (nearest rounding on the same grid as a reference).

CPU time / wall time is recorded next to every timing: about the torch thread count when the process had the
cores to itself, lower when other processes competed for them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

import qpipe
from qpipe.data import load_data
from qpipe.models import build_model
from qpipe.pipeline import adaround as ada_mod
from qpipe.pipeline.adaround import (
    BetaSchedule,
    attached,
    find_units,
    reconstruct,
    run_key,
    segment_module,
    train_step,
)
from qpipe.pipeline.qmodel import mode, prepare, quantize_weights
from qpipe.recipe import load_recipe
from qpipe.runtime.evaluate import evaluate

RESNET_DATA = "synthetic:3x224x224:256"
RESNET_OVERRIDES = ["weights.rounding=adaround", "weights.observer=absmax", "calibration.images=256",
                    "adaround.batch_size=32"]
FILL_BATCH = 64           # reconstruct fills its caches 64 images at a time
SCHEDULE_ITERS = 1000     # the timed steps walk the beta schedule of a run this long
UNITS = [
    # label, granularity, how to pick the unit
    ("3x3 conv layer2.0.conv2", "layer", lambda u: u.name == "layer2.0.conv2"),
    ("residual block layer2.0 (conv1, conv2, downsample, add, relu)", "block",
     lambda u: "layer2.0.conv1" in u.layers),
]
DIGITS_ITERS = 2000
DIGITS_LIMIT_S = 120.0
RSS_LIMIT_KIB = 4 * 1024 * 1024


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


@contextmanager
def clock(store: dict, key: str):
    """Wall and process CPU seconds of the block, written to ``store[key]`` / ``store[key + '_cpu']``."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        store[key] = time.perf_counter() - w
        store[key + "_cpu"] = time.process_time() - c


def thread_probe() -> dict:
    """Median ms of a small elementwise op (AdaRound's sigmoid on ResNet18 layer2.0.conv2's 147 456 weights) at
    torch's thread count and at 1 thread. Far slower at N threads than at 1: another process holds a core and
    OpenMP's barriers wait for the descheduled thread (every small op pays for it)."""
    v = torch.randn(147_456)
    res = {}
    threads = torch.get_num_threads()
    for key, n in (("ms_at_torch_threads", threads), ("ms_at_1_thread", 1)):
        torch.set_num_threads(n)
        ts = []
        for _ in range(60):
            t = time.perf_counter()
            torch.sigmoid(v)
            ts.append(time.perf_counter() - t)
        res[key] = 1000 * statistics.median(ts[10:])
    torch.set_num_threads(threads)
    res["threads"] = threads
    res["loadavg"] = os.getloadavg()[0]
    return res


def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                cpu = val.strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "qpipe": qpipe.__version__,
            "machine": platform.machine(), "loadavg_start": list(os.getloadavg()),
            "thread_probe_start": thread_probe()}


def resnet_setup():
    recipe = load_recipe("w4a32", RESNET_OVERRIDES)
    torch.manual_seed(recipe.seed)
    model = build_model("resnet18")  # random weights
    p = prepare(model, recipe)
    quantize_weights(p, recipe)
    source = load_data(RESNET_DATA, (3, 224, 224))
    images = torch.cat([x for x, _ in source.batches("calib", recipe.calibration.batch_size,
                                                     recipe.calibration.images)])
    return recipe, p, images


def pick_unit(p, granularity: str, pred):
    units = find_units(p, granularity)
    for k, u in enumerate(units):
        if pred(u):
            return k, u
    raise SystemExit(f"no {granularity} unit matches; units: {[u.name for u in units]}")


def time_fill(p, unit, images, recipe, workdir: Path) -> tuple[dict, object, object]:
    """Fill the input (quantized model) and target (float model) caches exactly as ``reconstruct`` does."""
    gm, t = p.gm, {}
    half = recipe.adaround.cache_mb << 19
    with clock(t, "input_fill_s"):
        inputs = ada_mod.Stream(gm, images, "quant", FILL_BATCH, half, workdir, "cpu", "in").value(unit.start)
    with clock(t, "target_fill_s"):
        targets = ada_mod.Stream(gm, images, "float", FILL_BATCH, half, workdir, "cpu", "out").value(unit.end)
    t["fill_s"] = t["input_fill_s"] + t["target_fill_s"]
    t["fill_cpu_s"] = t["input_fill_s_cpu"] + t["target_fill_s_cpu"]
    t["input_shape"] = list(inputs.data.shape[1:])
    t["target_shape"] = list(targets.data.shape[1:])
    t["cache_mb"] = (inputs.nbytes + targets.nbytes) / 2**20
    t["cache_memory_mapped"] = inputs.path is not None or targets.path is not None
    return t, inputs, targets


def time_steps(p, unit, k: int, inputs, targets, recipe, warmup: int, iters: int, granularity: str) -> dict:
    """The optimisation step of ``reconstruct`` (same calls, same order), timed step by step."""
    a, gm, device = recipe.adaround, p.gm, "cpu"
    # as reconstruct: a layer unit's tail (bounded activation, output quantizer) runs as one fused loss
    tail = ada_mod._tail(gm, unit) if granularity == "layer" and not a.lsq else None
    seg = segment_module(gm, unit.start, unit.nodes[:1] if tail is not None else unit.nodes)
    n = len(inputs.data)
    step_s, reg_steps = [], 0
    cpu0 = 0.0
    with attached(p, unit, device) as (ada, _), mode(gm, "quant"):
        opt = torch.optim.Adam([w.v for w in ada.values()], lr=a.lr)
        sched = BetaSchedule(SCHEDULE_ITERS, a.warmup, a.beta[0], a.beta[1])
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + k)
        for i in range(warmup + iters):
            if i == warmup:
                cpu0 = time.process_time()
                wall0 = time.perf_counter()
            # spread the timed steps over the schedule of a SCHEDULE_ITERS-step run
            t = SCHEDULE_ITERS // 2 if i < warmup else (i - warmup) * SCHEDULE_ITERS // iters
            t0 = time.perf_counter()
            rec, reg, beta = train_step(seg, inputs, targets, list(ada.values()), a, sched(t), gen, device, opt,
                                        None, tail)
            rec_v, reg_v = float(rec.detach()), float(reg.detach())  # noqa: F841 (as reconstruct syncs)
            if i >= warmup:
                step_s.append(time.perf_counter() - t0)
                reg_steps += beta is not None
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    mean = statistics.fmean(step_s)
    med = statistics.median(step_s)
    return {"warmup_steps": warmup, "timed_steps": iters, "steps_with_regulariser": reg_steps,
            "batch_size": min(a.batch_size, n), "mean_step_ms": 1000 * mean, "median_step_ms": 1000 * med,
            "min_step_ms": 1000 * min(step_s), "max_step_ms": 1000 * max(step_s),
            "s_per_1000": 1000 * mean, "s_per_1000_median": 1000 * med,
            "loop_wall_s": wall, "loop_cpu_s": cpu, "cpu_per_wall": cpu / wall,
            "weights": sum(w.v.numel() for w in ada.values())}


def crosscheck(p, unit, images, recipe, iters: int, workdir: Path) -> dict:
    """qpipe's own ``reconstruct`` on this one unit; its cache fills and MSE passes timed apart."""
    rec = load_recipe(recipe, [f"adaround.iters={iters}", "adaround.early_stop=0"])
    spent = {"fill": 0.0, "mse": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    with mock.patch.object(ada_mod, "find_units", lambda _p, _g: [unit]), \
            mock.patch.object(ada_mod.Stream, "value", timed(ada_mod.Stream.value, "fill")), \
            mock.patch.object(ada_mod, "_mse", timed(ada_mod._mse, "mse")):
        t, c = time.perf_counter(), time.process_time()
        report = reconstruct(p, rec, images, workdir / "reconstruct", run_key({"unit": unit.name, "i": iters}),
                             progress=False, cache_mb=rec.adaround.cache_mb)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    loop = wall - spent["fill"] - spent["mse"]
    return {"iters": iters, "iters_run": report[0]["iters"], "total_s": wall, "cpu_per_wall": cpu / wall,
            "fill_s": spent["fill"], "mse_s": spent["mse"], "loop_and_rest_s": loop,
            "s_per_1000": 1000 * loop / report[0]["iters"],
            "mse_before": report[0]["mse_before"], "mse_after": report[0]["mse_after"]}


def resnet_part(args, workdir: Path) -> dict:
    print("[resnet18] prepare + quantize weights + data", file=sys.stderr)
    t = {}
    with clock(t, "setup_s"):
        recipe, p, images = resnet_setup()
    rows = []
    for label, gran, pred in UNITS:
        k, unit = pick_unit(p, gran, pred)
        print(f"[resnet18] {gran} unit {unit.name} {unit.layers}: filling caches", file=sys.stderr)
        fill, inputs, targets = time_fill(p, unit, images, recipe, workdir)
        print(f"[resnet18]   fill {fill['fill_s']:.1f} s; {args.warmup}+{args.iters} steps", file=sys.stderr)
        steps = time_steps(p, unit, k, inputs, targets, recipe, args.warmup, args.iters, gran)
        print(f"[resnet18]   {steps['s_per_1000']:.1f} s / 1000 steps", file=sys.stderr)
        inputs.close()
        targets.close()
        del inputs, targets
        rows.append({"label": label, "granularity": gran, "unit": unit.name, "unit_index": k,
                     "layers": unit.layers, "fill": fill, "steps": steps})
    rss_after_steps = peak_rss_kib()
    if args.crosscheck_iters > 0:
        for row, (_, gran, pred) in zip(rows, UNITS, strict=True):
            _, unit = pick_unit(p, gran, pred)
            print(f"[resnet18] cross-check: reconstruct() on {unit.name}, {args.crosscheck_iters} steps",
                  file=sys.stderr)
            row["reconstruct_crosscheck"] = crosscheck(p, unit, images, recipe, args.crosscheck_iters, workdir)
    rss = peak_rss_kib()
    return {"model": "resnet18", "data": RESNET_DATA, "images": len(images), "recipe": "w4a32",
            "overrides": RESNET_OVERRIDES, "fill_batch": FILL_BATCH, "setup_s": t["setup_s"], "units": rows,
            "peak_rss_kib_after_steps": rss_after_steps, "peak_rss_kib": rss,
            "peak_rss_limit_kib": RSS_LIMIT_KIB, "rss_pass": rss < RSS_LIMIT_KIB}


def digits_part(args, root: Path) -> dict:
    iters = 100 if args.quick else DIGITS_ITERS
    res = {"model": "digits-cnn", "data": "digits", "recipe": "w4a32-adaround",
           "overrides": [f"adaround.iters={iters}"], "iters": iters, "limit_s": DIGITS_LIMIT_S}
    print(f"[digits-cnn] calibrate w4a32-adaround, {iters} iterations per unit", file=sys.stderr)
    t = {}
    with clock(t, "calibrate_s"):
        art = qpipe.calibrate("digits-cnn", "digits", "w4a32-adaround", root / "digits-adaround",
                              overrides=res["overrides"], progress=False)
    with clock(t, "export_s"):
        qpipe.export(art, "qdq")
    with clock(t, "evaluate_s"):
        m = evaluate(art.path, latency=False, progress=False)
    report = art.qparams.get("adaround", [])
    res.update(wall_s=t["calibrate_s"], cpu_per_wall=t["calibrate_s_cpu"] / t["calibrate_s"],
               export_s=t["export_s"], evaluate_s=t["evaluate_s"], top1=m["accuracy"]["top1"],
               top1_optimized=m.get("accuracy_optimized", {}).get("top1"), test_images=m["accuracy"]["n"],
               pass_=t["calibrate_s"] < DIGITS_LIMIT_S, units=len(report),
               iters_run=[u["iters"] for u in report],
               unit_report=[{k: u[k] for k in ("unit", "mse_before", "mse_after", "changed_from_nearest", "iters")}
                            for u in report])
    print(f"[digits-cnn]   {t['calibrate_s']:.1f} s, top-1 {100 * res['top1']:.2f}%; nearest reference",
          file=sys.stderr)
    ref = qpipe.calibrate("digits-cnn", "digits", "w4a32-adaround", root / "digits-nearest",
                          overrides=["weights.rounding=nearest"], progress=False)
    qpipe.export(ref, "qdq")
    res["nearest_top1"] = evaluate(ref.path, latency=False, progress=False)["accuracy"]["top1"]
    return res


def markdown(r: dict) -> str:
    m, rn, d = r["machine"], r["resnet18"], r["digits"]
    lines = [
        "# AdaRound / BRECQ reconstruction speed (CPU)",
        "",
        f"CPU: {m['cpu_model']} ({m['cpu_count']} logical CPUs, {m['cpu_affinity']} usable); torch {m['torch']}, "
        f"intra-op threads {m['torch_threads']}; Python {m['python']}. Load average at start "
        f"{m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}. CPU/wall: process CPU seconds per wall "
        f"second (about {m['torch_threads']} when the cores were free).{' **--quick run.**' if r['quick'] else ''}",
        "",
    ]
    probes = [(w, m[f"thread_probe_{w}"]) for w in ("start", "end") if f"thread_probe_{w}" in m]
    if probes:
        lines += ["Contention probe (median of a sigmoid over 147 456 floats, at the torch thread count vs 1 "
                  "thread; much slower at N threads means another process held a core): " + "; ".join(
                      f"{w}: {pr['ms_at_torch_threads']:.2f} ms at {pr['threads']} vs {pr['ms_at_1_thread']:.2f} ms "
                      f"at 1 (load {pr['loadavg']:.2f})" for w, pr in probes) + ".", ""]
    if rn is None:
        lines += ["ResNet18: skipped (--skip-resnet).", ""]
    else:
        lines += [
            f"ResNet18 (random weights, 224x224), `w4a32` + `weights.rounding=adaround`, `weights.observer=absmax`, "
            f"{rn['images']} images of `{rn['data']}`, Adam batch 32; each step timed separately after "
            f"{rn['units'][0]['steps']['warmup_steps']} warm-up steps, the timed steps spread over the beta "
            f"schedule of a {SCHEDULE_ITERS}-step run (20 % without the regulariser). Cache fill: {FILL_BATCH} "
            "images a batch, input from the quantized model, target from the float model. Cross-check: qpipe's "
            "`reconstruct()` itself on the unit, its cache fills and MSE passes subtracted.",
            "",
            "| unit | granularity | weights | timed steps | s / 1000 steps (mean) | s / 1000 (median) | CPU/wall | "
            "cache fill s (in + target) | cache MB | reconstruct() cross-check s / 1000 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for u in rn["units"]:
            s, f = u["steps"], u["fill"]
            cc = u.get("reconstruct_crosscheck")
            ccs = (f"{cc['s_per_1000']:.1f} ({cc['iters_run']} steps, CPU/wall {cc['cpu_per_wall']:.2f})"
                   if cc else "-")
            lines.append(f"| {u['label']} (`{u['unit']}`) | {u['granularity']} | {s['weights']:,} | "
                         f"{s['timed_steps']} | {s['s_per_1000']:.1f} | {s['s_per_1000_median']:.1f} | "
                         f"{s['cpu_per_wall']:.2f} | {f['fill_s']:.1f} ({f['input_fill_s']:.1f} + "
                         f"{f['target_fill_s']:.1f}) | {f['cache_mb']:.0f} | {ccs} |")
        rss = rn["peak_rss_kib"]
        lines += [
            "",
            f"Peak RSS (ru_maxrss) after the ResNet18 measurements: {rss / 2**20:.2f} GiB ({rss:,} KiB) "
            f"-> **{'PASS' if rn['rss_pass'] else 'FAIL'}** (limit 4 GiB).",
            "",
        ]
    if d is None:
        return "\n".join(lines + ["Demo CNN: skipped (--skip-digits)."]) + "\n"
    lines += [
        f"Demo CNN: `qpipe.calibrate(\"digits-cnn\", \"digits\", \"w4a32-adaround\", out, "
        f"overrides=[\"adaround.iters={d['iters']}\"])` ({d['units']} units, iterations run per unit: "
        f"{d['iters_run']}); then `qpipe.export(art, \"qdq\")` and onnxruntime top-1 on the "
        f"{d['test_images']} test images.",
        "",
        "| model | AdaRound iters / unit | calibrate wall s | CPU/wall | limit | result | export s | evaluate s | "
        "ORT top-1 (AdaRound) | ORT top-1 (nearest, same grid) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        f"| digits-cnn W4A32 | {d['iters']} | {d['wall_s']:.1f} | {d['cpu_per_wall']:.2f} | {d['limit_s']:.0f} s | "
        f"**{'PASS' if d['pass_'] else 'FAIL'}** | {d['export_s']:.1f} | {d['evaluate_s']:.1f} | "
        f"{100 * d['top1']:.2f}% | {100 * d['nearest_top1']:.2f}% |",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="folder for adaround_speed.json / .md")
    ap.add_argument("--iters", type=int, default=150, help="timed optimisation steps per ResNet18 unit")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per ResNet18 unit")
    ap.add_argument("--crosscheck-iters", type=int, default=40,
                    help="steps of the real reconstruct() per unit as a cross-check (0: skip)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--skip-digits", action="store_true", help="skip the digits-cnn calibrate run")
    ap.add_argument("--skip-resnet", action="store_true", help="skip the ResNet18 measurements")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 10 timed steps, 2 warm-up, 5 cross-check steps, digits at 100 iterations")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.warmup, args.crosscheck_iters = 10, 2, min(args.crosscheck_iters, 5)
    if args.iters < 1:
        ap.error("--iters must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qpipe-adaround-speed-") as tmp:
        root = Path(tmp)
        rn = None if args.skip_resnet else resnet_part(args, root)
        digits = None if args.skip_digits else digits_part(args, root)
    info["loadavg_end"] = list(os.getloadavg())
    info["thread_probe_end"] = thread_probe()
    result = {"machine": info, "quick": args.quick, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "total_s": time.perf_counter() - t0, "resnet18": rn, "digits": digits,
              "peak_rss_kib_end": peak_rss_kib()}
    (out / "adaround_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "adaround_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
