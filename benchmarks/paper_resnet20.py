"""The FlexPool paper's own network, a CIFAR-style ResNet-20: `benchmarks/paper_resnet20.py:resnet20`.

Written from the description of the authors' public code, in our words:

- a stem convolution (3x3, to 16 channels), then three stages of three basic blocks with
  16, 32 and 64 channels; the first block of stages 2 and 3 has stride 2;
- the order inside is conv, ReLU, BatchNorm (not the usual conv, BN, ReLU), and a block ends
  with ``bn2(relu(conv2(...) + shortcut))``: the map that the global pool sees is a
  BatchNorm output, so it can be negative;
- convolutions carry biases; a shortcut that changes shape is "option A": every second row
  and column, and the new channels zero-padded (no parameters);
- conv and linear weights start Kaiming-normal.

The model ends in a plain global average pool and a linear classifier, as the paper's
baseline does: `flexsurgeon convert` replaces that pool with FlexPool and taps the outputs
of stages 1 and 2 for SAC heads.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the new channels on both sides."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.pad = (out_chs - in_chs) // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = PadShortcut(in_chs, out_chs) if stride != 1 or in_chs != out_chs else nn.Identity()

    def forward(self, x):
        out = self.bn1(F.relu(self.conv1(x)))
        return self.bn2(F.relu(self.conv2(out) + self.shortcut(x)))


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, STAGE_CHANNELS[0], 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        stages, in_chs = [], STAGE_CHANNELS[0]
        for i, chs in enumerate(STAGE_CHANNELS):
            blocks = [BasicBlock(in_chs if j == 0 else chs, chs, 2 if i > 0 and j == 0 else 1)
                      for j in range(BLOCKS_PER_STAGE)]
            stages.append(nn.Sequential(*blocks))
            in_chs = chs
        self.layer1, self.layer2, self.layer3 = stages
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x):
        x = self.bn1(F.relu(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x):
        return self.fc(self.global_pool(self.forward_features(x)).flatten(1))


def resnet20(num_classes: int = 10, in_chans: int = 1) -> ResNet20:
    """The paper's ResNet-20 (defaults: Fashion-MNIST, 10 classes, one channel)."""
    return ResNet20(num_classes=num_classes, in_chans=in_chans)


# The paper's Table 1 (one classifier) and Table 2 (with SAC heads), as `flexsurgeon ablate` variants:
# AvgPool, FlexPool, FlexPool + Reg (our linear FlexPool and its regulariser), FlexPool + Reg + Dropout.
PAPER_VARIANTS = ("avg", "flex", "flex-linear", "flex-linear+dropout",
                  "avg+sac", "flex+sac", "flex-linear+sac", "flex-linear+dropout+sac")
