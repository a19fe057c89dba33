"""Data parallelism: torchrun --nproc-per-node 2 (gloo, CPU) gives the single-process scales and accuracy."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

import qpipe

SCALE_RTOL = 1e-6  # statistics reduced across two ranks (gloo) and in one process may round differently


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "qpipe",
           *args]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize(("recipe", "extra"), [
    ("w8a8", []),                                                          # min-max: min/max over all batches
    ("w4a8", ["activations.observer=percentile", "calibration.batch_size=128"]),  # samples (subsampled per batch)
    ("w8a8-int", ["calibration.batch_size=32"]),                           # EMA: depends on the batch order
], ids=["minmax", "percentile", "ema-absmax"])
def test_torchrun_calibrate_and_evaluate_equal_a_single_process(tmp_path, artifacts, recipe, extra):
    sets = [a for e in extra for a in ("--set", e)]
    torchrun("calibrate", "--model", "digits-cnn", "--recipe", recipe, "--out", str(tmp_path / "dp"), *sets)
    single = artifacts.get("digits-cnn", "digits", recipe, *extra)  # read only: qparams and manifest
    a = json.loads((tmp_path / "dp" / "qparams.json").read_text())["tensors"]
    b = single.qparams["tensors"]
    assert a.keys() == b.keys()
    for k in a:
        sa, sb = a[k]["scale"], b[k]["scale"]
        if isinstance(sa, list):
            assert all(abs(x - y) <= SCALE_RTOL * abs(y) for x, y in zip(sa, sb, strict=True)), k
        else:
            assert abs(sa - sb) <= SCALE_RTOL * abs(sb), (k, sa, sb)
        assert a[k]["zero_point"] == b[k]["zero_point"], k
    dp = json.loads((tmp_path / "dp" / "manifest.json").read_text())
    assert dp["calibration_images"] == single.manifest["calibration_images"] == 512
    assert not list(tmp_path.glob(".dp*"))  # only rank 0 wrote, and nothing half-written is left

    qpipe.export(tmp_path / "dp", "qdq")
    torchrun("evaluate", str(tmp_path / "dp"), "--no-latency")
    m_dp = json.loads((tmp_path / "dp" / "metrics-ort-qdq.json").read_text())
    m_sp = qpipe.evaluate(tmp_path / "dp", latency=False, progress=False, write=False)
    assert m_dp["world_size"] == 2
    assert m_dp["accuracy"] == m_sp["accuracy"] and m_dp["accuracy"]["n"] == 450
    assert m_dp["parity"]["top1_agreement"] == m_sp["parity"]["top1_agreement"]
    assert m_dp["parity"]["max_abs_diff"] == m_sp["parity"]["max_abs_diff"]
