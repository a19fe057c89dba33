"""``qpipe check``: gate an artifact in CI: manifest hashes, onnx.checker, the allowed op set, integer weights
equal to the record, parity and accuracy floors (``--expect FILE``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qpipe.artifact import Artifact, sha256
from qpipe.errors import QpipeError

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool",
           "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Identity", "Transpose", "Concat",
           "ReduceMean", "Mul"}
# Parity of a QDQ export with the PyTorch quantized model. onnxruntime computes the same integers, but float
# convolution sums in a different order than the integer kernels, so a value on a rounding tie may land one
# output step away (seen: 1 step); 2 leaves room for one such tie in each of two successive layers.
PARITY_MAX_STEPS = 2
PARITY_MIN_AGREEMENT = 0.995


@dataclass
class Result:
    name: str
    ok: bool
    detail: str = ""


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def check_integers(art: Artifact, model: onnx.ModelProto) -> Result:
    """Every quantized weight appears in the QDQ graph as a DequantizeLinear of exactly the recorded integers."""
    from safetensors.numpy import load_file

    ints = load_file(str(art.file("quantized.safetensors")))
    inits = {t.name: t for t in model.graph.initializer}
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    bad = []
    weights = [k for k, v in art.qparams["tensors"].items() if v["kind"] == "weight"]
    for name in weights:
        t = inits.get(f"{name}_quantized")
        if t is None or t.name not in dq_inputs:
            bad.append(f"{name}: no integer initializer")
            continue
        got = weight_codes(t)
        if not np.array_equal(got, ints[f"{name}_int"].astype(np.int32)):
            bad.append(f"{name}: integers differ")
    return Result("integer weights equal quantized.safetensors", not bad,
                  "; ".join(bad[:5]) or f"{len(weights)} tensors")


def weight_codes(t: onnx.TensorProto) -> np.ndarray:
    """The signed integer codes of a weight initializer in any container (int4, int8, uint8 + 128)."""
    a = numpy_helper.to_array(t).astype(np.int32)
    if t.data_type == onnx.TensorProto.UINT8:
        a = a - 128
    return a


def check(artifact: str | Path | Artifact, expect: str | Path | None = None) -> list[Result]:
    art = artifact if isinstance(artifact, Artifact) else Artifact(artifact)
    results: list[Result] = []
    manifest = art.manifest
    files = manifest.get("files", {})
    bad = [n for n, h in files.items() if not art.file(n).is_file() or sha256(art.file(n)) != h]
    results.append(Result("manifest hashes", not bad, ", ".join(bad) or f"{len(files)} files"))
    stray = [p.name for p in art.path.iterdir() if p.name.endswith(".tmp")]
    results.append(Result("no half-written files", not stray, ", ".join(stray)))

    qdq = art.file("model.qdq.onnx")
    for path in sorted(art.path.glob("model.*.onnx")):
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            results.append(Result(f"onnx.checker {path.name}", True))
        except Exception as e:
            results.append(Result(f"onnx.checker {path.name}", False, str(e).splitlines()[0][:200]))
            continue
        ops = {n.op_type for n in model.graph.node}
        extra = sorted(ops - QDQ_OPS)
        results.append(Result(f"op set {path.name}", not extra, f"not allowed: {extra}" if extra else ""))
        if path == qdq:
            results.append(check_integers(art, model))

    exp = {}
    if expect is not None:
        p = Path(expect)
        if not p.is_file():
            raise QpipeError(f"expectation file {expect} does not exist")
        try:
            exp = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise QpipeError(f"expectation file {expect} is not valid JSON: {e}") from e
    mfile = exp.get("metrics_file", "metrics-ort-qdq.json" if qdq.is_file() else "metrics-ort-fp32.json")
    if not art.file(mfile).is_file():
        results.append(Result(f"metrics {mfile}", False, "missing: run qpipe evaluate --backend ort first"))
        return results
    metrics = art.read_json(mfile)
    floors = dict(exp.get("floors", {}))
    ceilings = dict(exp.get("ceilings", {}))
    if "parity" in metrics:
        for key in ("parity", "parity_optimized"):
            floors.setdefault(f"{key}.top1_agreement", PARITY_MIN_AGREEMENT)
            if metrics[key].get("max_abs_diff_steps") is not None:
                ceilings.setdefault(f"{key}.max_abs_diff_steps", PARITY_MAX_STEPS)
    for key, lo in floors.items():
        v = _get(metrics, key)
        results.append(Result(f"{key} >= {lo}", v is not None and v >= lo, f"got {v}"))
    for key, hi in ceilings.items():
        v = _get(metrics, key)
        results.append(Result(f"{key} <= {hi}", v is not None and v <= hi, f"got {v}"))
    return results


def format_results(results: list[Result]) -> str:
    return "\n".join(f"{'PASS' if r.ok else 'FAIL'}  {r.name}" + (f"  ({r.detail})" if r.detail else "")
                     for r in results)
