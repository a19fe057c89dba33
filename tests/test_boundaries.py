"""The stages stand side by side (DESIGN.md): the ONNX stage and the onnxruntime side of the runtime import
nothing from ``qpipe.pipeline``, and ``evaluate --backend ort --no-parity`` measures an artifact from its ONNX
file alone, without building the PyTorch model."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from helpers import assert_ok, run_cli

import qpipe

PKG = Path(qpipe.__file__).parent
# modules that must never reach qpipe.pipeline, not even through a lazy import inside a function
STAGE_FREE = [*sorted((PKG / "export").glob("*.py")), PKG / "record.py", PKG / "artifact.py", PKG / "kinds.py",
              PKG / "onnx_names.py", PKG / "runtime" / "session.py", PKG / "runtime" / "check.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, at any depth, relative imports resolved."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_the_onnx_stage_and_the_record_import_nothing_from_pipeline():
    offenders = {str(p.relative_to(PKG)): sorted(m for m in imported_modules(p) if m.startswith("qpipe.pipeline"))
                 for p in STAGE_FREE}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    # the check sees relative imports too: it finds the pipeline imports that do exist
    assert "qpipe.pipeline.calibrate" in imported_modules(PKG / "runtime" / "evaluate.py")


def test_export_and_evaluate_without_parity_build_no_pytorch_model(cnn_w8a8_64_qdq, artifacts, tmp_path):
    art = artifacts.copy(cnn_w8a8_64_qdq, tmp_path / "art")
    code = f"""
import json, sys
import qpipe.models

def refuse(*args, **kwargs):
    raise AssertionError("a PyTorch model was built")

qpipe.models.build_model = qpipe.models.load_model = refuse
from qpipe.export import export
from qpipe.runtime.check import check
from qpipe.runtime.evaluate import evaluate

export({str(art)!r}, "all")
m = evaluate({str(art)!r}, backend="ort", parity=False, latency=False, progress=False)
check({str(art)!r})
print(json.dumps({{"pipeline": sorted(k for k in sys.modules if k.startswith("qpipe.pipeline")),
                  "top1": m["accuracy"]["top1"], "parity": "parity" in m}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["pipeline"] == [] and res["parity"] is False
    from qpipe.runtime.evaluate import evaluate

    full = evaluate(art, backend="ort", latency=False, progress=False, write=False)  # builds the torch model
    assert "parity" in full and full["accuracy"]["top1"] == res["top1"]


def test_cli_evaluate_no_parity_writes_metrics_without_parity(cnn_w8a8_64_qdq, artifacts, tmp_path, capsys):
    art = artifacts.copy(cnn_w8a8_64_qdq, tmp_path / "art")
    code, out, err = run_cli(capsys, "evaluate", str(art), "--backend", "ort", "--no-parity", "--no-latency")
    assert_ok(code, err)
    metrics = json.loads((art / "metrics.json").read_text())
    assert "parity" not in metrics and metrics["accuracy"]["n"] == 450
    lines = out.strip().splitlines()
    cells = dict(zip(lines[-3].replace("p50 ms", "p50").split(), lines[-1].split(), strict=True))
    assert cells["name"] == "art" and cells["agree"] == cells["steps"] == "-"   # not measured
    assert float(cells["cos"]) > 0.99   # fidelity to the FP32 graph: from the ONNX files alone
    code, _, err = run_cli(capsys, "evaluate", str(art), "--backend", "torch", "--no-parity")
    assert code == 2 and "--no-parity" in err
