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


#: The papers' ImageNet models: units (stem + blocks + head), block type, blocks per stage.
PAPER_MODELS = {
    "resnet18": (10, "BasicBlock", [2, 2, 2, 2]),
    "resnet50": (18, "Bottleneck", [3, 4, 6, 3]),
    "mobilenet_v2": (19, "InvertedResidual", None),
    "regnet_x_600mf": (18, "ResBottleneckBlock", [1, 3, 5, 7]),
    "regnet_x_3_2gf": (27, "ResBottleneckBlock", [2, 6, 15, 2]),
    "mnasnet1_0": (18, "_InvertedResidual", [3, 3, 3, 2, 4, 1]),
}


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_model_units(name: str) -> None:
    count, block_type, per_stage = PAPER_MODELS[name]
    model = randomize_bn(build_model(f"torchvision.{name}"))
    units = extract_units(fold_bn(model))
    assert len(units) == count
    assert [u.kind for u in units] == ["stem"] + ["block"] * (count - 2) + ["head"]
    assert {type(u.module).__name__ for u in units[1:-1]} == {block_type}
    if per_stage is not None:
        stages = [u.name.rsplit(".", 1)[0] for u in units[1:-1]]
        assert [stages.count(s) for s in dict.fromkeys(stages)] == per_stage
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(UnitModel(units)(x), model(x), atol=1e-4, rtol=1e-3)


def test_mnasnet_stem_is_the_separable_conv_before_the_first_stack() -> None:
    units = extract_units(fold_bn(build_model("torchvision.mnasnet1_0")))
    stem = units[0].module
    assert isinstance(stem, torch.fx.GraphModule)
    convs = [
        n.target
        for n in stem.graph.nodes
        if n.op == "call_module" and isinstance(stem.get_submodule(n.target), nn.Conv2d)
    ]
    assert convs == ["layers.0", "layers.3", "layers.6"]
    assert units[1].name == "layers.8.0" and units[-2].name == "layers.13.0"
