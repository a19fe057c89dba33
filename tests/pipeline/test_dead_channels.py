"""Encodings that survive real checkpoints: dead output channels (weights ~1e-9, BatchNorm variance 0, as pretrained
CNNs ship them) calibrate, stay exactly zero, and their folded biases fit int32 -- decided right after calibration,
so a learned-rounding run does not fail at its very end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

import qpipe
from qpipe.record import int_key

DEAD = (2, 5)


class DeadChannelNet(nn.Module):
    """conv-BN-ReLU x2 and a classifier; conv1's channels 2 and 5 are dead: |w| ~ 1e-9 and BN variance 0, so the
    folded bias is beta - gamma mean / sqrt(eps) ~ -155 on a weight scale near 1e-11."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            for c in DEAD:
                self.conv1.weight[c] = torch.randn(self.conv1.weight[c].shape, generator=g) * 1e-9
                self.bn1.running_var[c] = 0.0
                self.bn1.running_mean[c] = 0.5
                self.bn1.bias[c] = 3.0

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("recipe, overrides", [("w8a8", []), ("w4a8-adaround", ["adaround.iters=20"])],
                         ids=["w8a8", "w4a8-adaround"])
def test_dead_channels_calibrate_stay_zero_and_pass_check(tmp_path, recipe, overrides):
    art = qpipe.calibrate(DeadChannelNet(), "digits", recipe, tmp_path / "art",
                          overrides=["calibration.images=128", *overrides], progress=False)
    state = load_file(str(art.file("quantized.safetensors")))
    w = state[int_key("conv1.weight")]
    assert np.all(w[list(DEAD)] == 0)                              # dead channels stay exactly zero
    assert np.abs(w[[c for c in range(8) if c not in DEAD]]).max() > 0
    bias = np.abs(state[int_key("conv1.bias")].astype(np.int64))
    assert art.record.layers["conv1"].bias_fit_channels == DEAD     # the record says which channels were raised
    # the raised scale is just large enough: the dead channels' biases take half of the int32 range, no more
    assert np.all(bias[list(DEAD)] <= 2**30) and np.all(bias[list(DEAD)] >= 2**29)
    assert bias.max() <= 2**31 - 1
    qpipe.export(art, "qdq")
    # the model was calibrated in memory: parity needs it at hand
    m = qpipe.evaluate(art.path, backend="ort", latency=False, progress=False, model=DeadChannelNet())
    assert m["parity"]["max_abs_diff_steps"] <= 2 and m["parity"]["top1_agreement"] >= 0.995
    failed = [r for r in qpipe.check(art) if not r.ok]
    assert not failed, failed
