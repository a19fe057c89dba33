"""Record comparison: prove that a behaviour-preserving redesign of qpipe left its artifacts identical.

The same qpipe commands run twice, once with an OLD source tree and once with the NEW one, each side in its own
processes (``python -m qpipe`` with ``PYTHONPATH`` set to that tree, ``OMP_NUM_THREADS=2``, the seeds the
recipes fix). Per case the script then compares:

* every tensor of ``quantized.safetensors`` (integer weights, int32 biases, scales, folded float weights):
  keys on one side only, dtype, shape and exact values (number of differing elements, max abs difference);
* the scales and zero points of every quantizer in ``qparams.json`` (exactly); other per-tensor fields that
  differ are listed for information;
* for the learned cases (AdaRound, BRECQ, APoT QAT), whose training loops would amplify any change: the QDQ
  export (``qpipe export``) and its onnxruntime top-1 (``qpipe evaluate --backend ort``, ``metrics.json``),
  plus the number of test images (450; one image = 0.22 points) whose top-1 prediction differs between the
  two QDQ models, computed here with onnxruntime on the digits test split.

Exit status 0 when every exact case is identical and every learned case is identical or within one test image of
the old top-1; 1 otherwise (or when a run failed).

Cases (``--cases`` takes any of these names): cnn-fp32, cnn-w8a8, cnn-w4a8 (digits-cnn), vit-w8a8-int
(digits-vit), adder-adderquant-w4 (digits-adder), and the learned cnn-w4a32-adaround (2000 iterations per
unit), cnn-w4a8-brecq (500 iterations per block) and cnn-apot-w4a4-qat (3 epochs).

Run (the old side at commit 84170c1, checked out as a temporary git worktree, against this checkout)::

    python benchmarks/record_compare.py --work /tmp/record_compare/work

Compute the old records once and reuse them while the new code changes::

    python benchmarks/record_compare.py --old-src /tmp/qpipe-old --work /tmp/record_compare/work --only old
    python benchmarks/record_compare.py --old-src /tmp/qpipe-old --work /tmp/record_compare/work --reuse old

``--reuse old`` keeps the old side's artifact folders (and their exports and metrics) where they exist and were
made by the same command, and runs the new side afresh; ``--reuse`` alone (or ``--reuse both``) keeps both sides'
(only a comparison, no runs, once both exist); without it both sides run again. Runs go to ``WORK/old/<case>`` and ``WORK/new/<case>`` (logs beside
them), the report to ``WORK/report.json`` and ``WORK/report.md``.
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDES = ("old", "new")
THREADS = "2"


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # the qpipe command that writes the artifact folder (``--out DIR`` is appended)
    learned: bool = False  # also export QDQ and evaluate in onnxruntime; pass within one test image of top-1


CASES = (
    Case("cnn-fp32", ("calibrate", "--model", "digits-cnn", "--recipe", "fp32")),
    Case("cnn-w8a8", ("calibrate", "--model", "digits-cnn", "--recipe", "w8a8")),
    Case("cnn-w4a8", ("calibrate", "--model", "digits-cnn", "--recipe", "w4a8")),
    Case("vit-w8a8-int", ("calibrate", "--model", "digits-vit", "--recipe", "w8a8-int")),
    Case("adder-adderquant-w4", ("calibrate", "--model", "digits-adder", "--recipe", "adderquant-w4")),
    Case("cnn-w4a32-adaround", ("calibrate", "--model", "digits-cnn", "--recipe", "w4a32-adaround",
                                "--set", "adaround.iters=2000"), learned=True),
    Case("cnn-w4a8-brecq", ("calibrate", "--model", "digits-cnn", "--recipe", "w4a8-brecq",
                            "--set", "adaround.iters=500"), learned=True),
    Case("cnn-apot-w4a4-qat", ("train", "--model", "digits-cnn", "--qat", "apot", "--bits", "4",
                               "--set", "qat.epochs=3"), learned=True),
)
BY_NAME = {c.name: c for c in CASES}


class RunError(Exception):
    """A qpipe command of one side failed; the message ends with the tail of its log."""


# ---------------------------------------------------------------------------------------------------- sources


def git(src: Path, *args: str) -> str | None:
    """Output of a read-only git command in ``src``, or None where it is not a git checkout."""
    p = subprocess.run(["git", "--no-optional-locks", "-C", str(src), *args], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def source_digest(src: Path) -> str:
    """sha256 of the package and recipe files as they are now (a tree being edited changes it between runs)."""
    h = hashlib.sha256()
    for f in sorted([*src.glob("qpipe/**/*.py"), *src.glob("recipes/**/*.yaml")]):
        h.update(f"{f.relative_to(src)}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def describe(src: Path) -> dict[str, Any]:
    """Where a step's code came from, at the moment it started."""
    status = git(src, "status", "--porcelain", "--untracked-files=no")
    return {"src": str(src), "commit": git(src, "rev-parse", "HEAD"),
            "modified_files": None if status is None else len(status.splitlines()),
            "source_digest": source_digest(src)}


class OldTree:
    """The old source: ``--old-src``, or a detached git worktree of ``--old-ref`` made on first use."""

    def __init__(self, src: str | None, ref: str):
        self.given = Path(src).resolve() if src else None
        self.ref = ref
        self.made: Path | None = None

    def path(self) -> Path:
        if self.given:
            return self.given
        if self.made is None:
            tmp = Path(tempfile.mkdtemp(prefix="qpipe-old-")) / "src"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp), self.ref], check=True,
                           capture_output=True, text=True)
            self.made = tmp
        return self.made

    def cleanup(self) -> None:
        if self.made is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.made)],
                           capture_output=True)
            shutil.rmtree(self.made.parent, ignore_errors=True)


def side_env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS,
            "PYTHONHASHSEED": "0", "QPIPE_DEBUG": "1"}


@functools.cache
def check_import(src: Path, cwd: Path) -> str:
    """The ``qpipe/__init__.py`` a side imports; it must lie in that side's source tree."""
    p = subprocess.run([sys.executable, "-c", "import qpipe; print(qpipe.__file__)"], env=side_env(src), cwd=cwd,
                       capture_output=True, text=True)
    where = p.stdout.strip()
    if p.returncode or not Path(where).resolve().is_relative_to(src.resolve()):
        raise RunError(f"with PYTHONPATH={src} qpipe imports from {where or '?'}: {p.stderr.strip()[-300:]}")
    return where


# ---------------------------------------------------------------------------------------------------- running


def steps_of(case: Case, art: Path) -> list[tuple[str, list[str], Path]]:
    """(name, qpipe argv, the file that shows the step is done)."""
    steps = [("create", [*case.argv, "--out", str(art)], art / "quantized.safetensors")]
    if case.learned:
        steps += [("export", ["export", str(art)], art / "model.qdq.onnx"),
                  ("evaluate", ["evaluate", str(art), "--backend", "ort"], art / "metrics.json")]
    return steps


def tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def run_side(case: Case, side: str, src_of, root: Path, reuse: bool) -> dict[str, Any]:
    """Run (or reuse) one case on one side; returns its run record (also saved as ``<case>.run.json``)."""
    root.mkdir(parents=True, exist_ok=True)
    art, log, rec_path = root / case.name, root / f"{case.name}.log", root / f"{case.name}.run.json"
    steps = steps_of(case, art)
    old_rec = json.loads(rec_path.read_text()) if rec_path.is_file() else None
    same_command = old_rec is None or old_rec.get("argv") == list(case.argv)
    if art.exists() and not (reuse and same_command):
        shutil.rmtree(art)
    if not art.exists():
        old_rec = None
        log.unlink(missing_ok=True)
    record = old_rec or {"case": case.name, "side": side, "argv": list(case.argv), "steps": {}}
    record["error"] = None
    for name, argv, done in steps:
        if done.is_file():
            record["steps"].setdefault(name, {"seconds": None})["reused"] = True
            continue
        src = src_of()
        record["imports"] = check_import(src, root)
        source, load = describe(src), os.getloadavg()[0]
        cmd = [sys.executable, "-m", "qpipe", *argv]
        with open(log, "a") as f:
            f.write(f"$ PYTHONPATH={src} OMP_NUM_THREADS={THREADS} {shlex.join(cmd)}\n")
            f.flush()
            t = time.perf_counter()
            p = subprocess.run(cmd, env=side_env(src), cwd=root, stdout=f, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - t
        record["steps"][name] = {"seconds": round(seconds, 2), "reused": False, "returncode": p.returncode,
                                 "load_average_before": load, **source}
        print(f"  {side:3s} {case.name:22s} {name:8s} {seconds:7.1f} s  exit {p.returncode}  "
              f"(load {load:.1f} before; {source['commit'] and source['commit'][:9]}, "
              f"{source['modified_files']} modified, source {source['source_digest']})", flush=True)
        if p.returncode or not done.is_file():
            record["error"] = f"{name} exited {p.returncode} (log {log}):\n{tail(log)}"
            break
    rec_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------------------- comparing


def compare_tensors(old_file: Path, new_file: Path) -> dict[str, Any]:
    """Every key of two safetensors files: exact values, dtype and shape."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(old_file)), load_file(str(new_file))
    common = sorted(set(a) & set(b))
    diffs, differing, max_abs = [], 0, 0.0
    for k in common:
        x, y = a[k], b[k]
        kind = "value"
        if x.shape != y.shape:
            diffs.append({"key": k, "kind": "shape", "old": list(x.shape), "new": list(y.shape)})
            differing += max(x.numel(), y.numel())
            continue
        if x.dtype != y.dtype:
            kind = "dtype"
            dt = torch.promote_types(x.dtype, y.dtype)
            x, y = x.to(dt), y.to(dt)
        ne = x != y
        if x.is_floating_point():
            ne &= ~(x.isnan() & y.isnan())
        n = int(ne.sum())
        if n or kind == "dtype":
            d = float((x[ne].double() - y[ne].double()).abs().max()) if n else 0.0
            diffs.append({"key": k, "kind": kind, "dtype": f"{a[k].dtype} / {b[k].dtype}", "shape": list(x.shape),
                          "differing": n, "max_abs_diff": d})
            differing += n
            max_abs = max(max_abs, d)
    only_old, only_new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return {"compared": len(common), "only_old": only_old, "only_new": only_new, "differing_elements": differing,
            "max_abs_diff": max_abs, "diffs": diffs,
            "identical": not (diffs or only_old or only_new)}


def _array(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


def compare_qparams(old_file: Path, new_file: Path) -> dict[str, Any]:
    """Scales and zero points of every quantizer in ``qparams.json`` (exactly); other differing fields listed."""
    a = json.loads(old_file.read_text()).get("tensors", {})
    b = json.loads(new_file.read_text()).get("tensors", {})
    common = sorted(set(a) & set(b))
    diffs, other = [], []
    for name in common:
        for key in sorted(set(a[name]) | set(b[name])):
            va, vb = a[name].get(key), b[name].get(key)
            if va == vb:
                continue
            if key in ("scale", "zero_point"):
                x, y = _array(va if va is not None else np.nan), _array(vb if vb is not None else np.nan)
                d = float(np.abs(x - y).max()) if x.shape == y.shape else None
                diffs.append({"tensor": name, "field": key, "max_abs_diff": d})
            else:
                other.append({"tensor": name, "field": key, "old": va, "new": vb})
    only_old, only_new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return {"compared": len(common), "only_old": only_old, "only_new": only_new, "scale_zp_diffs": diffs,
            "other_field_diffs": other, "identical": not (diffs or only_old or only_new)}


def digits_test() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split exactly as ``qpipe.data.digits`` makes it (450 images, stratified, random_state 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    _, xte, _, yte = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return np.ascontiguousarray(xte), yte


def predict(onnx_file: Path, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Top-1 class per image from onnxruntime's validation session (no graph optimisation), as qpipe evaluates."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = int(THREADS)
    sess = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch_size]})[0].argmax(1)
                           for i in range(0, len(x), batch_size)])


def compare_accuracy(old_art: Path, new_art: Path, test) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for side, art in (("old", old_art), ("new", new_art)):
        acc = json.loads((art / "metrics.json").read_text())["accuracy"]
        res[f"top1_{side}"], res["n"] = acc["top1"], acc["n"]
        res[f"correct_{side}"] = round(acc["top1"] * acc["n"])
    res["correct_diff"] = res["correct_new"] - res["correct_old"]
    res["qdq_bytes_identical"] = filecmp.cmp(old_art / "model.qdq.onnx", new_art / "model.qdq.onnx", shallow=False)
    try:
        x, y = test
        p_old, p_new = predict(old_art / "model.qdq.onnx", x), predict(new_art / "model.qdq.onnx", x)
        res["images_differing"] = int((p_old != p_new).sum())
        # the predictions here must reproduce qpipe's own count, else they are not the same images
        res["predictions_match_metrics"] = (int((p_old == y).sum()) == res["correct_old"]
                                            and int((p_new == y).sum()) == res["correct_new"])
    except Exception as e:  # the per-image check is extra; the metrics above still decide
        res["images_differing"] = None
        res["predict_error"] = f"{type(e).__name__}: {e}"
    return res


def compare_case(case: Case, old: dict, new: dict, old_art: Path, new_art: Path, test) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case.name, "learned": case.learned}
    errors = [f"{s}: {r['error']}" for s, r in (("old", old), ("new", new)) if r.get("error")]
    if errors:
        return {**row, "error": "\n".join(errors), "passed": False}
    row["tensors"] = compare_tensors(old_art / "quantized.safetensors", new_art / "quantized.safetensors")
    row["qparams"] = compare_qparams(old_art / "qparams.json", new_art / "qparams.json")
    row["identical"] = row["tensors"]["identical"] and row["qparams"]["identical"]
    row["passed"] = row["identical"]
    if case.learned:
        row["accuracy"] = acc = compare_accuracy(old_art, new_art, test)
        row["passed"] = row["identical"] or abs(acc["correct_diff"]) <= 1
    return row


# ---------------------------------------------------------------------------------------------------- report


def _fmt_diff(v: float | None) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.3g}")


def markdown(rows: list[dict], runs: dict[str, dict[str, dict]], sources: dict[str, list[dict]]) -> str:
    out = []
    for side, srcs in sources.items():
        names = [f"{s['src']} at {(s['commit'] or '?')[:9]} + {s['modified_files']} modified files "
                 f"(source {s['source_digest']})" for s in srcs]
        out.append(f"{side}: {'; '.join(names) or '?'}"
                   + ("  **the tree changed between this side's runs**" if len(srcs) > 1 else ""))
    out += ["", "| case | tensors compared | identical | differing elements | max abs diff | qparams scale/zp "
           "| top-1 old | top-1 new | images differing | result |",
           "|---|---:|:---:|---:|---:|---|---:|---:|---:|:---:|"]
    for r in rows:
        if "error" in r:
            first = r["error"].splitlines()[0]
            out.append(f"| {r['case']} | - | - | - | - | - | - | - | - | ERROR: {first} |")
            continue
        t, q, a = r["tensors"], r["qparams"], r.get("accuracy")
        extra = len(t["only_old"]) + len(t["only_new"])
        qp = "identical" if q["identical"] else (f"{len(q['scale_zp_diffs'])} differ, "
                                                 f"{len(q['only_old']) + len(q['only_new'])} one side")
        top = ["-", "-", "-"]
        if a:
            top = [f"{100 * a['top1_old']:.2f}", f"{100 * a['top1_new']:.2f}",
                   "-" if a["images_differing"] is None else str(a["images_differing"])]
        out.append(f"| {r['case']} | {t['compared']}{f' (+{extra} one side)' if extra else ''} "
                   f"| {'yes' if r['identical'] else 'no'} | {t['differing_elements']} | "
                   f"{_fmt_diff(t['max_abs_diff'])} | {qp} | {' | '.join(top)} | "
                   f"{'pass' if r['passed'] else 'FAIL'} |")
    out += ["", "| side | case | create s | export s | evaluate s |", "|---|---|---:|---:|---:|"]
    totals = {}
    for side, by_case in runs.items():
        for name, rec in by_case.items():
            cells = []
            for step in ("create", "export", "evaluate"):
                s = rec["steps"].get(step)
                cells.append("-" if s is None or s.get("seconds") is None else
                             f"{s['seconds']:.1f}{' (reused)' if s.get('reused') else ''}")
                totals[side] = totals.get(side, 0.0) + ((s or {}).get("seconds") or 0.0)
            out.append(f"| {side} | {name} | {' | '.join(cells)} |")
    out.append("")
    out += [f"{side} side: {total:.1f} s of qpipe commands in all (reused steps count their recorded time)"
            for side, total in totals.items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", help="old source tree put on PYTHONPATH (default: a git worktree of --old-ref)")
    ap.add_argument("--old-ref", default="84170c1", help="commit for the old side (default: %(default)s)")
    ap.add_argument("--new-src", default=str(REPO), help="new source tree (default: this checkout, %(default)s)")
    ap.add_argument("--cases", nargs="+", choices=list(BY_NAME), default=list(BY_NAME), metavar="CASE",
                    help=f"subset of: {', '.join(BY_NAME)}")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "qpipe-record-compare"),
                    help="where the runs go: WORK/old/<case>, WORK/new/<case> (default: %(default)s)")
    ap.add_argument("--reuse", nargs="?", const="both", choices=(*SIDES, "both"),
                    help="keep the artifact folders of this side (old, new; bare --reuse: both) where they exist "
                         "and were made by the same command")
    ap.add_argument("--only", choices=SIDES, help="run this side only (e.g. to record the old side), no comparison")
    ap.add_argument("--report", help="JSON report path (default: WORK/report.json)")
    args = ap.parse_args(argv)

    work = Path(args.work).resolve()
    old_tree = OldTree(args.old_src, args.old_ref)
    new_src = Path(args.new_src).resolve()
    src_of = {"old": old_tree.path, "new": lambda: new_src}
    cases = [BY_NAME[n] for n in dict.fromkeys(args.cases)]
    runs: dict[str, dict[str, dict]] = {}
    try:
        for side in ((args.only,) if args.only else SIDES):
            t = time.perf_counter()
            print(f"== {side} side", flush=True)
            runs[side] = {c.name: run_side(c, side, src_of[side], work / side, args.reuse in (side, "both")) for c in cases}
            print(f"== {side} side done in {time.perf_counter() - t:.1f} s", flush=True)
    except RunError as e:  # a side that does not import from its own tree: nothing it wrote would mean anything
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        old_tree.cleanup()
    if args.only:
        bad = [n for n, r in runs[args.only].items() if r["error"]]
        for n in bad:
            print(f"error: {args.only} {n}: {runs[args.only][n]['error']}", file=sys.stderr)
        return 1 if bad else 0

    test = digits_test() if any(c.learned for c in cases) else None
    rows = [compare_case(c, runs["old"][c.name], runs["new"][c.name], work / "old" / c.name,
                         work / "new" / c.name, test) for c in cases]
    passed = all(r["passed"] for r in rows)
    keys = ("src", "commit", "modified_files", "source_digest")
    sources = {side: [json.loads(s) for s in sorted({json.dumps({k: st.get(k) for k in keys})
                                                     for r in runs[side].values() for st in r["steps"].values()
                                                     if "src" in st})] for side in SIDES}
    report = {"passed": passed, "sources": sources, "cases": rows, "runs": runs}
    text = markdown(rows, runs, sources)
    report_path = Path(args.report) if args.report else work / "report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report_path.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    for r in rows:
        if "error" in r:
            print(f"\n{r['case']}: {r['error']}")
        elif not r["identical"]:
            t, q = r["tensors"], r["qparams"]
            print(f"\n{r['case']}: only old {t['only_old']}, only new {t['only_new']}; first differences:")
            for d in t["diffs"][:10] + q["scale_zp_diffs"][:10]:
                print(f"  {d}")
    print(f"\n{'PASS' if passed else 'FAIL'}: report in {report_path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
