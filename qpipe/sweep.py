"""``qpipe sweep GRID.yaml``: run a grid of recipes through calibrate -> export -> evaluate (onnxruntime) and
lay the results out like the reference tables.

A grid file::

    model: digits-cnn          # --model / --data on the command line override these
    data: digits
    base: w8a8                 # the recipe every cell starts from
    set: [activations.bits=32] # overrides for every cell
    axes:                      # the product of all axes (any recipe key, or a named axis of labelled settings)
      weights.bits: [8, 4]
      quantizer:
        - {label: abs-max, weights.observer: absmax}
        - {label: Lp p=2.4, weights.observer: lp_norm, weights.p: 2.4}
    cells:                     # and/or explicit cells; a list value in a cell expands (e.g. seeds)
      - {weights.rounding: stochastic, seed: [0, 1, 2]}
    rows: [quantizer]          # the table: row keys and column keys; every other key (typically seed) is
    cols: [weights.bits]       # summarised as mean +- std and best
    metric: top1               # top1 | top5
    format: qdq                # which export onnxruntime evaluates (qdq | int); a cell may set its own

Every cell runs in its own folder ``OUT/cells/<id>/`` (the id is a hash of its settings); its ``result.json`` is
written last and atomically, so a killed sweep rerun with the same command recomputes only unfinished cells. A
cell that fails (a bad value, an error in the model) is recorded with its error; the others still run.
Writes ``results.json``, ``results.csv``, ``results.md`` and, when ``weights.bits`` is an axis, ``accuracy_vs_bits.png``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpipe.artifact import write_atomic, write_json
from qpipe.errors import QpipeError
from qpipe.recipe import read_yaml_mapping

GRID_KEYS = {"model", "data", "base", "set", "axes", "cells", "rows", "cols", "metric", "format", "about",
             "weights", "calibration_images"}
METRICS = ("top1", "top5")


@dataclass
class Grid:
    model: str
    data: str
    base: str
    fixed: list[str]
    cells: list[dict[str, Any]]          # each: {"labels": {axis: label}, "set": {key: value}}
    rows: list[str]
    cols: list[str]
    metric: str = "top1"
    format: str = "qdq"
    weights: str | None = None
    about: str = ""
    axes: list[str] = field(default_factory=list)


def _label(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _axis_values(name: str, values) -> list[tuple[str, dict[str, Any]]]:
    """(label, settings) per value of an axis: a recipe key with plain values, or labelled settings."""
    if not isinstance(values, list) or not values:
        raise QpipeError(f"grid axis {name!r} must be a non-empty list, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, dict):
            v = dict(v)
            label = v.pop("label", None)
            if not v:
                raise QpipeError(f"grid axis {name!r}: a value {v!r} sets no recipe key")
            out.append((str(label) if label is not None else ", ".join(f"{k}={_label(x)}" for k, x in v.items()), v))
        else:
            out.append((_label(v), {name: v}))
    return out


def _expand_cell(cell: dict) -> list[tuple[dict[str, str], dict[str, Any]]]:
    if not isinstance(cell, dict) or not cell:
        raise QpipeError(f"a grid cell must be a mapping of recipe keys, got {cell!r}")
    cell = dict(cell)
    label = cell.pop("label", None)
    keys = list(cell)
    lists = [cell[k] if isinstance(cell[k], list) else [cell[k]] for k in keys]
    out = []
    for combo in itertools.product(*lists):
        settings = dict(zip(keys, combo, strict=True))
        labels = {k: _label(v) for k, v in settings.items()}
        if label is not None:
            labels["cell"] = str(label)
        out.append((labels, settings))
    return out


def load_grid(path: str | Path, model: str | None = None, data: str | None = None) -> Grid:
    p = Path(path)
    if not p.is_file():
        raise QpipeError(f"grid file {path} does not exist")
    g = read_yaml_mapping(p, "grid file")
    unknown = sorted(set(g) - GRID_KEYS)
    if unknown:
        raise QpipeError(f"grid file {path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(GRID_KEYS))}")
    axes = g.get("axes") or {}
    if not isinstance(axes, dict):
        raise QpipeError(f"grid file {path}: axes must be a mapping of axis -> values")
    cells: list[dict[str, Any]] = []
    if axes:
        per_axis = [[(name, lab, s) for lab, s in _axis_values(name, vals)] for name, vals in axes.items()]
        for combo in itertools.product(*per_axis):
            labels = {name: lab for name, lab, _ in combo}
            settings: dict[str, Any] = {}
            for _, _, s in combo:
                settings.update(s)
            cells.append({"labels": labels, "set": settings})
    for cell in g.get("cells") or []:
        for labels, settings in _expand_cell(cell):
            cells.append({"labels": labels, "set": settings})
    if not cells:
        raise QpipeError(f"grid file {path} has no axes and no cells")
    metric = g.get("metric", "top1")
    if metric not in METRICS:
        raise QpipeError(f"grid file {path}: metric {metric!r} is not one of {', '.join(METRICS)}")
    fmt = g.get("format", "qdq")
    if fmt not in ("qdq", "int"):
        raise QpipeError(f"grid file {path}: format {fmt!r} is not qdq or int")
    fixed = g.get("set") or []
    if not isinstance(fixed, list) or not all(isinstance(s, str) and "=" in s for s in fixed):
        raise QpipeError(f"grid file {path}: set must be a list of key=value strings")
    names = list(dict.fromkeys(k for c in cells for k in c["labels"]))
    rows, cols = list(g.get("rows") or names[:1]), list(g.get("cols") or [])
    for k in rows + cols:
        if k not in names:
            raise QpipeError(f"grid file {path}: table key {k!r} is not an axis or cell key ({', '.join(names)})")
    return Grid(model=model or g.get("model", "digits-cnn"), data=data or g.get("data", "digits"),
                base=str(g.get("base", "w8a8")), fixed=fixed, cells=cells, rows=rows, cols=cols, metric=metric,
                format=fmt, weights=g.get("weights"), about=str(g.get("about", "")), axes=names)


def cell_id(grid: Grid, cell: dict) -> str:
    key = json.dumps({"model": grid.model, "data": grid.data, "base": grid.base, "fixed": grid.fixed,
                      "weights": grid.weights, "format": grid.format, "set": cell["set"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


CELL_KEYS = ("format",)  # cell settings that are not recipe keys: which export onnxruntime evaluates


def _overrides(grid: Grid, cell: dict) -> list[str]:
    return list(grid.fixed) + [f"{k}={json.dumps(v)}" for k, v in cell["set"].items() if k not in CELL_KEYS]


def run_cell(grid: Grid, cell: dict, folder: Path) -> dict:
    """calibrate -> export -> evaluate one cell in ``folder``; returns (and writes last) its result record."""
    import torch

    from qpipe.flow import run

    torch.set_num_threads(1)
    art_dir = folder / "artifact"
    if art_dir.exists():  # left by a killed run: start the cell again
        shutil.rmtree(art_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"id": folder.name, "labels": cell["labels"], "set": cell["set"], "status": "ok"}
    t = time.perf_counter()
    try:
        fmt = cell["set"].get("format", grid.format)
        res = run(grid.model, grid.data, grid.base, art_dir, weights=grid.weights, overrides=_overrides(grid, cell),
                  formats=(fmt,), backends=("ort",), int_graph=False, latency=False, check=False, progress=False)
        m = res.metrics[-1]
        par = m.get("parity") or {}
        acc, fid = m.get("accuracy") or {}, m.get("fidelity") or {}
        rec.update(top1=acc.get("top1"), top5=acc.get("top5"), n=acc.get("n", fid.get("n")),
                   cosine=fid.get("cosine_mean"), agreement=par.get("top1_agreement"),
                   max_diff_steps=par.get("max_abs_diff_steps"), model_file=m["model_file"])
    except Exception as e:  # one cell's failure is its result; the sweep goes on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rec.update(status="failed", error=f"{type(e).__name__}: {msg}" if not isinstance(e, QpipeError) else msg)
        if not isinstance(e, QpipeError):
            rec["traceback"] = traceback.format_exc(limit=5)
    rec["seconds"] = round(time.perf_counter() - t, 2)
    write_json(folder / "result.json", rec)
    return rec


def _run_in_child(args):
    grid, cell, folder = args
    return run_cell(grid, cell, Path(folder))


def sweep(grid_path: str | Path, out: str | Path, jobs: int = 1, model: str | None = None, data: str | None = None,
          progress: bool = True) -> dict:
    """Run every cell not yet finished in ``out`` (``jobs`` at a time) and write the results."""
    grid = load_grid(grid_path, model, data)
    if jobs < 1:
        raise QpipeError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo, done = [], {}
    for cell in grid.cells:
        folder = out / "cells" / cell_id(grid, cell)
        res = folder / "result.json"
        if res.is_file():
            try:
                done[folder.name] = {**json.loads(res.read_text()), "reused": True}
                continue
            except json.JSONDecodeError:
                pass
        todo.append((grid, cell, str(folder)))
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"sweep ({len(done)} reused)", unit="cell", disable=None if progress else True)
    if jobs == 1:
        for t in todo:
            r = _run_in_child(t)
            done[r["id"]] = r
            bar.update()
    elif todo:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_in_child, t) for t in todo]
            for f in as_completed(futures):
                r = f.result()
                done[r["id"]] = r
                bar.update()
    bar.close()
    records = [done[cell_id(grid, c)] for c in grid.cells]
    return write_results(grid, records, out)


# ---------------------------------------------------------------- results

def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    s = {"n": len(values), "mean": statistics.fmean(values), "best": max(values)}
    s["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return s


def _fmt(s: dict) -> str:
    if not s.get("n"):
        return "failed"
    if s["n"] == 1:
        return f"{100 * s['mean']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (best {100 * s['best']:.2f}, n={s['n']})"


def table(grid: Grid, records: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    """Rows x columns of the metric, every other key summarised (mean +- std, best)."""
    def key(r, names):
        return tuple(r["labels"].get(k, "-") for k in names)

    row_keys = list(dict.fromkeys(key(r, grid.rows) for r in records))
    col_keys = list(dict.fromkeys(key(r, grid.cols) for r in records)) if grid.cols else [()]
    groups: dict[tuple, list[float]] = {}
    for r in records:
        g = groups.setdefault((key(r, grid.rows), key(r, grid.cols)), [])
        if r["status"] == "ok":
            g.append(r[grid.metric])
    corner = " / ".join(grid.rows) + (f" \\ {' / '.join(grid.cols)}" if grid.cols else "")
    header = [corner] + [" / ".join(c) or grid.metric for c in col_keys]
    body, summaries = [], {}
    for rk in row_keys:
        line = [", ".join(rk)]
        for ck in col_keys:
            if (rk, ck) not in groups:
                line.append("")
                continue
            s = _summary(groups[(rk, ck)])
            summaries[json.dumps([rk, ck])] = s
            line.append(_fmt(s))
        body.append(line)
    return header, body, summaries


def write_results(grid: Grid, records: list[dict], out: Path) -> dict:
    header, body, summaries = table(grid, records)
    failed = [r for r in records if r["status"] != "ok"]
    result = {"model": grid.model, "data": grid.data, "base": grid.base, "set": grid.fixed, "metric": grid.metric,
              "format": grid.format, "rows": grid.rows, "cols": grid.cols, "cells": records,
              "table": {"header": header, "rows": body}, "summaries": summaries,
              "failed": len(failed), "reused": sum(1 for r in records if r.get("reused"))}
    write_json(out / "results.json", result)
    buf = io.StringIO()
    keys = grid.axes
    w = csv.writer(buf)
    w.writerow(["id", *keys, "status", "top1", "top5", "agreement", "max_diff_steps", "seconds", "error"])
    for r in records:
        w.writerow([r["id"], *[r["labels"].get(k, "") for k in keys], r["status"], r.get("top1", ""),
                    r.get("top5", ""), r.get("agreement", ""), r.get("max_diff_steps", ""), r.get("seconds", ""),
                    r.get("error", "")])
    write_atomic(out / "results.csv", buf.getvalue())
    title = grid.about or f"{grid.model} on {grid.data}, recipe {grid.base}"
    md = [f"{title} — onnxruntime {grid.metric} (%) of model.{grid.format}.onnx", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in body]
    if failed:
        md += ["", f"{len(failed)} failed cell(s):"] + [f"- {r['labels']}: {r.get('error', '')}" for r in failed]
    write_atomic(out / "results.md", "\n".join(md) + "\n")
    if "weights.bits" in grid.axes:
        plot_accuracy_vs_bits(grid, records, out / "accuracy_vs_bits.png")
    return result


def plot_accuracy_vs_bits(grid: Grid, records: list[dict], path: Path) -> None:
    """One line per setting of the other axes: the metric against weights.bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, dict[int, list[float]]] = {}
    for r in records:
        bits = r["set"].get("weights.bits")
        if r["status"] != "ok" or not isinstance(bits, int):
            continue
        name = ", ".join(f"{v}" for k, v in r["labels"].items() if k not in ("weights.bits", "seed")) or grid.base
        lines.setdefault(name, {}).setdefault(bits, []).append(100 * r[grid.metric])
    if not lines:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in lines.items():
        bits = sorted(pts)
        ax.plot(bits, [statistics.fmean(pts[b]) for b in bits], marker="o", label=name)
    ax.set_xlabel("weight bits")
    ax.set_ylabel(f"{grid.metric} (%)")
    ax.set_title(f"{grid.model}: {grid.metric} against weight bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())

