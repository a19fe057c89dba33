"""Batch-norm folding: W' = W * gamma / sqrt(var + eps) per output channel,
b' = gamma * (b - mean) / sqrt(var + eps) + beta (ALGORITHMS.md §1)."""

from __future__ import annotations

import torch
from torch import fx, nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv computing bn(conv(x)) in eval mode (always with a bias)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        inv = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        fused.weight.copy_((conv.weight.double() * inv.reshape(-1, 1, 1, 1)).float())
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(bn.running_mean, dtype=torch.float64)
        fused.bias.copy_((inv * (b - bn.running_mean.double()) + bn.bias.double()).float())
    return fused


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm2d whose input is a Conv2d used only by it; returns how many were folded."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_var is None:
            continue
        fused = fold_conv_bn(modules[src.target], bn)
        parent, _, leaf = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded
