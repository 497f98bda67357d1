from __future__ import annotations

import pytest
import torch
from helpers import TinyResNet, randomize_bn
from torch import nn

from ptqflow.fold import find_conv_bn_pairs, fold_bn, fold_conv_bn
from ptqflow.models import build_model


def test_fold_conv_bn_matches_reference() -> None:
    conv = nn.Conv2d(3, 5, 3, bias=True)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(5)))[0]
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("resnet20", (2, 1, 28, 28)), ("mobilenetv2_s", (2, 1, 28, 28)), ("torchvision.resnet18", (2, 3, 64, 64))],
)
def test_fold_bn_model_equivalence(name: str, shape: tuple[int, ...]) -> None:
    model = randomize_bn(build_model(name))
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)


def test_pairs_follow_data_flow_not_attribute_order() -> None:
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)  # declared before the conv it follows
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    model = randomize_bn(Swapped())
    assert find_conv_bn_pairs(model) == [("conv", "bn")]
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fold_bn(model)(x), model(x), atol=1e-5, rtol=1e-5)


def test_bn_without_conv_input_is_kept() -> None:
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval()
    assert isinstance(fold_bn(model)[1], nn.BatchNorm2d)


def test_fold_does_not_touch_the_original() -> None:
    model = randomize_bn(TinyResNet())
    fold_bn(model)
    assert isinstance(model.bn1, nn.BatchNorm2d)
