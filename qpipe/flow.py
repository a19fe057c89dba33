"""The whole job in one call: calibrate -> export -> evaluate -> check.

``qpipe run``, every sweep cell and ``qpipe.run(...)`` in a script call ``run`` below; the CLI only parses its
arguments and prints what comes back.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qpipe.artifact import Artifact
from qpipe.errors import QpipeError

# the bundled default (`qpipe run` with no arguments): the demo CNN on digits as FP32, W8A8 and W4A8, gated by
# the expectations shipped in artifacts/expected
DEFAULT_RECIPES = ("fp32", "w8a8", "w4a8")
DEFAULT_MODEL = "digits-cnn"
DEFAULT_DATA = "digits"
DEFAULT_OUT_ROOT = "artifacts/runs"
DEFAULT_EXPECT_DIR = "artifacts/expected"
BACKENDS = ("torch", "ort")


@dataclass
class RunResult:
    """One recipe's run: the artifact, one metrics row per evaluation, and the checks (None when not checked)."""

    artifact: Artifact
    metrics: list[dict] = field(default_factory=list)
    checks: list | None = None

    @property
    def ok(self) -> bool:
        return self.checks is None or all(r.ok for r in self.checks)


def run(model, data, recipe, out: str | Path, *, weights: str | None = None, overrides=(), seed: int | None = None,
        device: str = "cpu", formats: tuple[str, ...] = ("qdq",), backends: tuple[str, ...] = BACKENDS,
        int_graph: bool = True, latency: bool = True, check: bool = True, expect: str | Path | None = None,
        replace: bool = False, command: str | None = None, progress: bool = True) -> RunResult:
    """Calibrate ``model`` on ``data`` by ``recipe`` into ``out``, export ``formats`` and evaluate each of them
    with ``backends`` (the torch backend once, on the first format), then gate the artifact with ``check``.

    ``int_graph``: also export and evaluate (onnxruntime) the integer-only graph where the artifact has one.
    ``replace``: an existing artifact folder at ``out`` is removed first (refused when it is not an artifact).
    """
    from qpipe.export import export
    from qpipe.pipeline.calibrate import calibrate
    from qpipe.runtime.check import check as run_check
    from qpipe.runtime.evaluate import evaluate

    for b in backends:
        if b not in BACKENDS:
            raise QpipeError(f"unknown backend {b!r}; use one of {', '.join(BACKENDS)}")
    out = Path(out)
    if out.exists():
        if not replace:
            raise QpipeError(f"output folder {out} already exists; choose another or remove it")
        Artifact(out)  # refuses a folder that is not an artifact
        shutil.rmtree(out)
    art = calibrate(model, data, recipe, out, weights=weights, overrides=overrides, seed=seed, device=device,
                    command=command, progress=progress)
    res = RunResult(art)

    def evaluate_into(backend: str, fmt: str) -> None:
        m = evaluate(art.path, backend=backend, device=device, latency=latency, command=command, format=fmt,
                     progress=progress)
        res.metrics.append(m)

    for i, fmt in enumerate(formats):
        export(art, fmt, command=command)
        for backend in backends:
            if backend == "ort" or i == 0:
                evaluate_into(backend, fmt)
    rec = art.record
    if int_graph and "int" not in formats and rec.int_graph is not None and rec.int_graph.available:
        export(art, "int", command=command)
        if "ort" in backends:
            evaluate_into("ort", "int")
    if check:
        res.checks = run_check(art, expect)
    return res
