"""qpipe sweep: every cell runs, results in three files, a killed sweep continues without recomputing, and a
failing cell is recorded with its error while the others run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

from helpers import ROOT, assert_one_line_error, run_cli

from qpipe.sweep import load_grid

GRID = """
model: digits-cnn
data: digits
base: w4a32
set: [calibration.images=64]
axes:
  quantizer:
    - {label: abs-max, weights.observer: absmax}
    - {label: Lp p=2.4, weights.observer: lp_norm, weights.p: 2.4}
  weights.bits: [8, 4, BITS]
rows: [quantizer]
cols: [weights.bits]
"""


def write_grid(tmp_path, bits="3"):
    p = tmp_path / "grid.yaml"
    p.write_text(GRID.replace("BITS", bits))
    return p


def test_grid_expands_axes_and_cells(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("base: w8a8\naxes: {weights.bits: [8, 4], fold_bn: [true, false]}\n"
                 "cells: [{weights.rounding: stochastic, seed: [0, 1, 2]}]\nrows: [weights.bits]\n")
    g = load_grid(p)
    assert len(g.cells) == 4 + 3
    assert g.cells[-1]["set"] == {"weights.rounding": "stochastic", "seed": 2}


def test_sweep_writes_results_and_a_failed_cell_does_not_stop_the_others(tmp_path, capsys):
    grid = write_grid(tmp_path, bits="9")  # bits 9 is out of range: those cells fail, with the error
    out = tmp_path / "out"
    code, printed, _ = run_cli(capsys, "sweep", str(grid), "--out", str(out), "--jobs", "2")
    assert code == 0
    assert "6 cells (0 reused, 2 failed)" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["weights.bits"] for r in failed} == {"9"} and all("outside 2..8" in r["error"] for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["top1"]) > 0.9 for r in ok)
    md = (out / "results.md").read_text()
    assert "| abs-max |" in md and "failed" in md
    res = json.loads((out / "results.json").read_text())
    assert res["failed"] == 2 and res["table"]["header"][1:] == ["8", "4", "9"]
    assert (out / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"


def test_killed_quantizer_sweep_continues_without_recomputing(tmp_path):
    grid = ROOT / "recipes/sweeps/quantizers.yaml"   # the real grid: 5 estimators x 2 x 2 x 2 = 40 cells
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qpipe", "sweep", str(grid), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("cells/*/result.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    assert 3 <= len(finished) < 40, "the sweep was not interrupted midway"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"40 cells ({len(finished)} reused, 0 failed)" in r.stdout
    for cid, mtime in finished.items():  # untouched: not recomputed
        assert (out / "cells" / cid / "result.json").stat().st_mtime_ns == mtime
    res = json.loads((out / "results.json").read_text())
    assert sum(1 for c in res["cells"] if c.get("reused")) == len(finished)
    assert all(c["status"] == "ok" and c["top1"] > 0.95 for c in res["cells"])
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 40 and (out / "results.md").is_file()
    assert (out / "accuracy_vs_bits.png").is_file()


def test_bad_grid_files_are_one_line_errors(tmp_path, capsys):
    for text, needle in [("axes: {weights.bits: 8}\n", "must be a non-empty list"),
                         ("colour: red\naxes: {weights.bits: [8]}\n", "unknown key 'colour'"),
                         ("axes: {weights.bits: [8]}\nrows: [seed]\n", "table key 'seed'")]:
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        code, _, err = run_cli(capsys, "sweep", str(p), "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, needle)


def test_cells_with_and_without_bits_and_a_per_cell_format(tmp_path):
    from qpipe.sweep import sweep

    p = tmp_path / "g.yaml"
    p.write_text("base: w8a8\nset: [calibration.images=64]\n"
                 "cells: [{label: a, weights.bits: 4}, {label: b, fold_bn: false}, {label: c, format: int}]\n"
                 "rows: [cell]\n")
    res = sweep(p, tmp_path / "o", progress=False)
    assert res["failed"] == 0 and [c["model_file"] for c in res["cells"]] == ["model.qdq.onnx"] * 2 + ["model.int.onnx"]
    assert (tmp_path / "o" / "accuracy_vs_bits.png").is_file()
