"""The CIFAR ResNets of He, Zhang, Ren and Sun (2016), "Deep Residual Learning for Image
Recognition", section 4.2.

Image ``[batch, in_channels, H, W]`` → 3×3 convolution of ``w`` channels, BatchNorm, ReLU →
three stages of ``n`` basic blocks with widths ``(w, 2w, 4w)``, the first block of stages 2 and
3 with stride 2 → global average pooling → ``Linear(4w, num_classes)``.  That is
``depth = 6n + 2`` weighted layers (2n per stage, the first convolution and the classifier);
the paper's ResNet-20 is n = 3, w = 16.

A basic block computes ``ReLU(BN(conv₂(ReLU(BN(conv₁(x))))) + s(x))`` with 3×3 convolutions and
the shortcut ``s`` the identity, or a 1×1 strided convolution and BatchNorm where the shape
changes (the paper's option B; its CIFAR models pad with zeros instead, option A).  Convolutions
have no bias: the BatchNorm after each one has its own.
"""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of ``depth = 6n + 2``; ``forward`` returns logits ``[batch, num_classes]``."""

    def __init__(self, depth: int = 8, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth}: a CIFAR ResNet has depth 6n + 2 with n ≥ 1 (8, 14, 20, 32, 44, 56, …)")
        blocks_per_stage = (depth - 2) // 6
        self.conv = conv3x3(in_channels, width)
        self.bn = nn.BatchNorm2d(width)
        widths = (width, 2 * width, 4 * width)
        stages, channels = [], width
        for stage, out_channels in enumerate(widths):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(torch.relu(self.bn(self.conv(images))))
        return self.fc(self.pool(x).flatten(1))


def resnet8(**kw) -> ResNet:
    """ResNet-8 (n = 1): 77,754 parameters at the defaults (width 16, 1 input channel, 10 classes)."""
    return ResNet(depth=8, **kw)


def resnet20(**kw) -> ResNet:
    """ResNet-20 (n = 3), the smallest model of the paper's CIFAR-10 table: 272,186 parameters at the defaults."""
    return ResNet(depth=20, **kw)
