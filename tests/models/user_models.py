"""Models written the way users write them (timm / torchvision / BERT style), for the graph-capture tests: nothing
here knows about qpipe."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm's attention: fused qkv, unbind, ``q @ k.transpose(-2, -1) * scale``, ``.softmax(-1)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class TimmViT(nn.Module):
    """A timm-style ViT for 1x8x8 digits: 2x2 patches, a class token, learned position embeddings, a functional
    final LayerNorm (F.layer_norm with the model's own parameters)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, num_classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = F.layer_norm(x, (x.shape[-1],), self.norm_weight, self.norm_bias, 1e-6)
        return self.head(x[:, 0])


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class PlainResNet(nn.Module):
    """A ResNet written with ``x + identity`` and ``F.relu``, mean pooling and torch.flatten."""

    def __init__(self, c: int = 16, blocks: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.layers = nn.Sequential(*[BasicBlock(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layers(x)
        x = x.mean((2, 3), keepdim=True)
        return self.fc(torch.flatten(x, 1))


class EncoderLayer(nn.Module):
    """A pre-LN encoder layer with a causal attention mask: separate q/k/v projections, torch.bmm,
    masked_fill(-inf) and F.softmax."""

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.ln1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)))

    def forward(self, x):
        B, N, C = x.shape
        h = self.ln1(x)
        d = C // self.heads

        def split(t):
            return t.reshape(B, N, self.heads, d).transpose(1, 2).reshape(B * self.heads, N, d)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~self.mask, float("-inf"))
        a = torch.bmm(F.softmax(scores, dim=-1), v)
        a = a.reshape(B, self.heads, N, d).transpose(1, 2).reshape(B, N, C)
        x = x + self.out(a)
        x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return x


class MaskedEncoder(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(8, dim)            # each image row is a token
        self.pos = nn.Parameter(torch.randn(1, 8, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, 8) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x.flatten(1, 2)) + self.pos
        x = self.ln(self.layers(x))
        return self.head(x[:, -1])


class Gate(nn.Module):
    """Data-dependent control flow: traceable by nobody's graph capture."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.gate(F.relu(self.conv(x))), 1))


def timm_vit():
    return TimmViT()


def plain_resnet():
    return PlainResNet()


def masked_encoder():
    return MaskedEncoder()


def gated_net():
    return GatedNet()


class ShapeUnpack(nn.Module):
    """Spreads a shape into a call (``reshape(*y.shape[:2], -1)``, as Hugging Face attention does): torch.fx cannot
    iterate a traced shape; torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc(y.reshape(*y.shape[:2], -1).mean(-1))


def shape_unpack():
    torch.manual_seed(0)
    return ShapeUnpack()
