from __future__ import annotations

import pytest
import torch
from helpers import TinyResNet, randomize_bn
from torch import nn

from ptqflow.fold import bn_statistics, find_conv_bn_pairs, fold_bn, fold_conv_bn
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


def test_bn_statistics_recover_the_pre_bn_output_of_every_folded_conv() -> None:
    """What folding forgets, kept: from a folded conv's output, ``pre_bn`` gives the unfolded conv's own
    output, whose running statistics the BN holds (PD-Quant's distribution correction reads them)."""
    model = randomize_bn(TinyResNet())
    model.layer1[0].bn1.weight.data[3] = 0.0  # a dead channel: constant after its BN
    stats = bn_statistics(model)
    folded = fold_bn(model)
    assert set(stats) == {conv for conv, _ in find_conv_bn_pairs(model)}
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        for name in ("layer1.0.conv1", "layer1.0.conv2"):
            z = stats[name].pre_bn(folded.get_submodule(name)(x))
            expected = model.get_submodule(name)(x)
            live = stats[name].live()
            torch.testing.assert_close(z[:, live], expected[:, live], atol=1e-4, rtol=1e-4)
        bn1 = model.layer1[0].bn1
        torch.testing.assert_close(stats["layer1.0.conv1"].mean, bn1.running_mean)
        torch.testing.assert_close(stats["layer1.0.conv1"].std, torch.sqrt(bn1.running_var + bn1.eps))
        assert not bool(stats["layer1.0.conv1"].live()[3]) and int(stats["layer1.0.conv1"].live().sum()) == 7
