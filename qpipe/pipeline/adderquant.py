"""AdderQuant (Nie et al., NeurIPS 2022; ALGORITHMS.md section 6): post-training quantization of AdderNet layers.

Steps, in ``qpipe calibrate`` for a recipe with ``adder.method``:

1. a float pass over the calibration images records each adder layer's activation range r: the running max over
   batches of the ``adder.percentile`` (99.94) of |x| (the outlier clamp), floored at 1e-3;
2. ``adderquant``: per layer, each output filter's max |w|, clustered by 1-D k-means (k-means++, seeded) into
   ``adder.groups`` groups; a group's scale is S = min(max |w| of the group, r); weights beyond +-S are clipped
   and the clipped part becomes a per-filter bias (lossless for inputs in [0, S]). ``naive``: one group per layer
   with S = max(max |w|, r). Weight codes are signed b-bit at step 2S/(2^b-1), the group's input unsigned b-bit at
   S/(2^b-1) (``qpipe.reference.adder``);
3. BatchNorm statistics re-estimated on the calibration images with the adder layers quantized (the reference
   code's ``adjust_BN``; cumulative average instead of momentum), if ``adder.bn_reestimate``;
4. then the usual activation calibration, observing the network with its adder layers quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from qpipe.errors import QpipeError
from qpipe.record import AdderGroup, AdderRecord
from qpipe.reference import adder as ref

from .qmodel import AdderRangeObserver, Prepared, mode, observing, only_quantize, sqnr_db


@torch.no_grad()
def observe_ranges(p: Prepared, batches) -> int:
    """Step 1: the float model over ``batches``; each adder layer's range observer keeps its running-max range r,
    which becomes the layer's ``act_range`` when the batches are done."""
    adders = [p.gm.get_submodule(name) for name in p.adders]
    n = 0
    try:
        for m in adders:
            m.range_observer = AdderRangeObserver(m.percentile)
        with observing(p.gm) as state:
            for x, _ in batches:
                state.batch = n
                p.gm(x)
                n += len(x)
        if n == 0:
            raise QpipeError("calibration data is empty")
        for m in adders:
            m.act_range = m.range_observer.range().to(m.act_range.device)
    finally:
        for m in adders:
            m.range_observer = None
    return n


@torch.no_grad()
def freeze_adders(p: Prepared, recipe) -> dict[str, AdderRecord]:
    """Step 2: groups, scales, integer weight codes and clamp biases of every adder layer; returns the record for
    ``qparams.json["adders"]``."""
    a = recipe.adder
    record = {}
    for i, name in enumerate(p.adders):
        m = p.gm.get_submodule(name)
        w = m.weight.detach().float().numpy()
        if not torch.isfinite(m.weight).all():
            raise QpipeError(f"adder layer {name} has NaN/Inf weights")
        r = max(float(m.act_range), ref.R_FLOOR)
        ids, scales = ref.group_scales(w, r, a.groups, a.method, seed=recipe.seed * 1000 + i)
        codes, bias = ref.weight_codes(w, ids, scales, a.bits)
        m.weight_int = torch.as_tensor(codes, dtype=torch.int8)
        m.group = torch.as_tensor(ids)
        m.group_scale = torch.as_tensor(scales, dtype=torch.float32)
        m.clamp_bias = torch.as_tensor(bias, dtype=torch.float32)
        m.bits = torch.tensor(a.bits)
        wq = torch.as_tensor(codes, dtype=torch.float32) * (2 * m.steps()[m.group]).reshape(-1, 1, 1, 1)
        clipped = int((bias < 0).sum())
        groups = tuple(AdderGroup(float(scales[g]), int((ids == g).sum())) for g in range(len(scales)))
        record[name] = AdderRecord(p.layer_input.get(name), a.bits, a.method, r, groups, clipped,
                                   sqnr_db(m.weight, wq), m.stride, m.padding)
    return record


@torch.no_grad()
def reestimate_bn(p: Prepared, batches) -> int:
    """Step 3: BatchNorm running statistics averaged over ``batches`` with only the adder layers quantized."""
    bns = [m for m in p.gm.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the batches
        m.train()
    n = 0
    try:
        with mode(p.gm, "quant"), only_quantize(p.gm, p.adders):
            for x, _ in batches:
                p.gm(x)
                n += len(x)
    finally:
        for m, (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)
    return n
