"""The Python API: an nn.Module in memory and plain (x, y) batches, as users call it from notebooks."""

import torch
from helpers import PARITY_TOP1

import qpipe
from qpipe.data import digits
from qpipe.models import load_model


def test_module_and_batches_through_calibrate_export_evaluate_check(tmp_path):
    src = digits()
    xtr, ytr = src.splits["calib"]
    calib = [(xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, 256, 64)]
    test = list(src.batches("test", 128))
    model = load_model("digits-cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    art = qpipe.calibrate(model, calib, "w8a8", out=tmp_path / "api", progress=False)
    assert art.manifest["calibration_images"] == 256
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    qpipe.export(art, format="qdq")
    m = qpipe.evaluate(art.path, test, backend="ort", model=model, latency=False, progress=False)
    assert m["accuracy"]["n"] == 450 and m["accuracy"]["top1"] >= 0.985
    assert m["parity"]["top1_agreement"] >= PARITY_TOP1
    assert all(r.ok for r in qpipe.check(art))
    # without the module at hand, onnxruntime still evaluates (no parity)
    m2 = qpipe.evaluate(art.path, test, backend="ort", latency=False, progress=False, write=False)
    assert "parity" not in m2 and m2["accuracy"]["top1"] == m["accuracy"]["top1"]
