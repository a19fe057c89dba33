"""Vision Transformer (Dosovitskiy et al. 2021): torchvision-compatible ViT-B/16 and the small digits ViT.

State-dict keys follow torchvision's ``VisionTransformer`` (``class_token``, ``conv_proj``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``, ``...mlp.0``, ``encoder.ln``, ``heads.head``), so a
torchvision ``vit_b_16`` checkpoint loads with ``--weights``. Attention is written out (``in_proj`` Linear, two
``torch.matmul``, an ``nn.Softmax`` module, ``out_proj`` Linear) so ``torch.fx`` sees every op. No torchvision import.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
_RENAMES = (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias"))


def _save_torchvision_names(module, state_dict, prefix, local_metadata):
    """``in_proj.weight`` -> ``in_proj_weight`` (nn.MultiheadAttention's names), keeping the key order."""
    own = [k for k in state_dict if k.startswith(prefix)]  # this module's keys: the last ones written
    values = [state_dict.pop(k) for k in own]
    names = {prefix + a: prefix + b for a, b in _RENAMES}
    for k, v in zip(own, values, strict=True):
        state_dict[names.get(k, k)] = v


def _load_torchvision_names(module, state_dict, prefix, *args):
    """``in_proj_weight`` -> ``in_proj.weight`` before the ``in_proj`` Linear loads."""
    for a, b in _RENAMES:
        if prefix + b in state_dict:
            state_dict[prefix + a] = state_dict.pop(prefix + b)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameters of ``nn.MultiheadAttention`` but a real ``in_proj`` Linear."""

    def __init__(self, hidden_dim: int, num_heads: int, seq_length: int):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        self.hidden_dim, self.num_heads, self.seq_length = hidden_dim, num_heads, seq_length
        self.head_dim = hidden_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.in_proj = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.softmax = nn.Softmax(dim=-1)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        nn.init.xavier_uniform_(self.in_proj.weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.register_state_dict_post_hook(_save_torchvision_names)
        self.register_load_state_dict_pre_hook(_load_torchvision_names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, h = self.seq_length, self.hidden_dim, self.num_heads
        qkv = self.in_proj(x).reshape(-1, n, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.softmax(attn)
        out = torch.matmul(attn, v)  # (B, H, N, d)
        return self.out_proj(out.transpose(1, 2).reshape(-1, n, d))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, seq_length: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = LayerNorm(hidden_dim)
        self.self_attention = SelfAttention(hidden_dim, num_heads, seq_length)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, hidden_dim), nn.Dropout(dropout))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # as torchvision's MLPBlock
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(inp)
        x = self.self_attention(x)
        x = self.dropout(x)
        x = x + inp
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, seq_length, dropout))
            for i in range(num_layers)))
        self.ln = LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class ViT(nn.Module):
    """Patch embedding (Conv2d, kernel = stride = patch), class token, pre-LN encoder, linear head on the token."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.num_patches = (image_size // patch_size) ** 2
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(self.num_patches + 1, num_layers, num_heads, hidden_dim, mlp_dim, dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        # torchvision zeroes the head (for fine-tuning); a small random head trains from scratch and gives
        # a random-weight model distinct outputs per class
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).reshape(-1, self.hidden_dim, self.num_patches).permute(0, 2, 1)  # (B, N, D)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


def vit_b_16(num_classes: int = 1000) -> ViT:
    """ViT-B/16 at 224x224: 12 layers, 12 heads, width 768, MLP 3072 (86.6M parameters, as torchvision)."""
    return ViT(224, 16, 3, 12, 12, 768, 3072, num_classes)


def digits_vit(num_classes: int = 10) -> ViT:
    """Small ViT for 1x8x8 digits: 2x2 patches (16 + class token = 17 tokens), 4 layers, 4 heads, width 64."""
    return ViT(8, 2, 1, 4, 4, 64, 128, num_classes)
