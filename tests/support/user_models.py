"""A user's own model, loaded through the entry point ``user_models:tiny_net`` (tests/support is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class UserNet(nn.Module):
    """Fashion-MNIST sized: a stem with its own ReLU, two torchvision BasicBlocks, a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))


def tiny_net() -> nn.Module:
    """The entry point's factory: no arguments, returns the module."""
    return UserNet()


def not_a_module() -> object:
    """A broken factory (returns no module)."""
    return [1, 2, 3]


def raises() -> nn.Module:
    """A broken factory (raises)."""
    raise RuntimeError("no weights for you")


class _Head(nn.Module):
    """A one-conv net with ``classes`` outputs on ``channels``-channel images."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def three_outputs() -> nn.Module:
    """Grey images, three outputs (fewer than Fashion-MNIST's ten classes)."""
    return _Head(1, 3)


def rgb_ten_outputs() -> nn.Module:
    """RGB images, ten outputs (more than a three-class image folder has)."""
    return _Head(3, 10)
