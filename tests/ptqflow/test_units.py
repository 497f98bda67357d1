from __future__ import annotations

import pytest
import torch
from helpers import TinyResNet, randomize_bn
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

from ptqflow.errors import ModelError
from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.units import UnitModel, extract_units


def _check(model: nn.Module, x: torch.Tensor) -> list[str]:
    units = extract_units(fold_bn(model))
    with torch.no_grad():
        torch.testing.assert_close(UnitModel(units)(x), model(x), atol=1e-4, rtol=1e-4)
    return [u.name for u in units]


def test_resnet20_units() -> None:
    model = randomize_bn(build_model("resnet20"))
    names = _check(model, torch.randn(2, 1, 28, 28))
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["head"]
    units = extract_units(fold_bn(model))
    assert all(isinstance(u.module, BasicBlock) for u in units[1:-1])


def test_mobilenetv2_s_units() -> None:
    model = randomize_bn(build_model("mobilenetv2_s"))
    names = _check(model, torch.randn(2, 1, 28, 28))
    assert names[0] == "stem" and names[-1] == "head" and len(names) == 11
    units = extract_units(fold_bn(model))
    assert all(isinstance(u.module, InvertedResidual) for u in units[1:-1])


def test_torchvision_resnet18_units() -> None:
    model = randomize_bn(build_model("torchvision.resnet18"))
    names = _check(model, torch.randn(1, 3, 64, 64))
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)] + ["head"]


def test_torchvision_resnet50_bottlenecks() -> None:
    units = extract_units(fold_bn(build_model("torchvision.resnet50")))
    assert len(units) == 18 and all(isinstance(u.module, Bottleneck) for u in units[1:-1])


def test_tiny_resnet_units() -> None:
    assert _check(randomize_bn(TinyResNet()), TinyResNet.example_inputs()) == ["stem", "layer1.0", "layer1.1", "head"]


def test_non_chain_model_is_rejected() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = BasicBlock(4, 4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.block(x)) + x  # reads the model input after a block

    with pytest.raises(ModelError, match="not a chain of units"):
        extract_units(Skip())
