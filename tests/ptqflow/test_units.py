from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import TinyMobileNet, TinyResNet, assert_close_at_scale, randomize_bn
from torch import nn

from ptqflow.errors import ModelError
from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.units import UnitModel, extract_units, trace_model


def _check(model: nn.Module, x: torch.Tensor) -> list[str]:
    units = extract_units(fold_bn(model))
    with torch.no_grad():
        torch.testing.assert_close(UnitModel(units)(x), model(x), atol=1e-4, rtol=1e-4)
    return [u.name for u in units]


def test_resnet20_units() -> None:
    model = randomize_bn(build_model("resnet20"))
    names = _check(model, torch.randn(2, 1, 28, 28))
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)] + ["head"]


def test_mobilenetv2_s_units() -> None:
    model = randomize_bn(build_model("mobilenetv2_s"))
    names = _check(model, torch.randn(2, 1, 28, 28))
    assert names == ["stem"] + [f"features.{i}" for i in range(1, 10)] + ["head"]


def test_torchvision_resnet18_units() -> None:
    model = randomize_bn(build_model("torchvision.resnet18"))
    names = _check(model, torch.randn(1, 3, 64, 64))
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)] + ["head"]


def test_tiny_models_units() -> None:
    assert _check(randomize_bn(TinyResNet()), TinyResNet.example_inputs()) == ["stem", "layer1.0", "layer1.1", "head"]
    assert _check(randomize_bn(TinyMobileNet()), TinyMobileNet.example_inputs()) == [
        "stem", "features.1", "features.2", "head"
    ]  # fmt: skip


#: The papers' ImageNet models: units (stem + blocks + head) and blocks per stage, as the per-class
#: registry of earlier versions gave them (bench/placement_equivalence.py compares the two directly).
PAPER_MODELS = {
    "resnet18": (10, [2, 2, 2, 2]),
    "resnet50": (18, [3, 4, 6, 3]),
    "mobilenet_v2": (19, None),
    "regnet_x_600mf": (18, [1, 3, 5, 7]),
    "regnet_x_3_2gf": (27, [2, 6, 15, 2]),
    "mnasnet1_0": (18, [3, 3, 3, 2, 4, 1]),
}


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_model_units(name: str) -> None:
    count, per_stage = PAPER_MODELS[name]
    model = randomize_bn(build_model(f"torchvision.{name}"))
    units = extract_units(fold_bn(model))
    assert len(units) == count
    assert [u.kind for u in units] == ["stem"] + ["block"] * (count - 2) + ["head"]
    if per_stage is not None:
        stages = [u.name.rsplit(".", 1)[0] for u in units[1:-1]]
        assert [stages.count(s) for s in dict.fromkeys(stages)] == per_stage
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_at_scale(UnitModel(units)(x), model(x))


def test_mnasnet_stem_is_the_separable_conv_before_the_first_stack() -> None:
    units = extract_units(fold_bn(build_model("torchvision.mnasnet1_0")))
    stem = units[0].module
    convs = [
        n.target
        for n in stem.graph.nodes
        if n.op == "call_module" and isinstance(stem.get_submodule(n.target), nn.Conv2d)
    ]
    assert convs == ["layers.0", "layers.3", "layers.6"]
    assert units[1].name == "layers.8.0" and units[-2].name == "layers.13.0"


def test_block_units_fall_out_of_the_graph() -> None:
    """SE blocks, dense blocks, inception modules: units without any block class named in ptqflow."""
    cases = {
        "efficientnet_b0": ("features.1.0", 16),  # MBConv with squeeze-excitation
        "regnet_y_400mf": ("trunk_output.block1.block1-0", 16),  # RegNetY: SE inside the bottleneck
        "densenet121": ("features.denseblock1", 4),  # a dense block is one unit (its input stays live)
        "googlenet": ("inception3a", 12),  # 9 inception modules + its three BasicConv2d stem convs
        "shufflenet_v2_x0_5": ("stage2.0", 16),
    }
    for name, (first_block, blocks) in cases.items():
        extra = {"init_weights": False} if name == "googlenet" else {}  # its default init warns (FutureWarning)
        model = randomize_bn(torchvision.models.get_model(name, weights=None, **extra))
        units = extract_units(fold_bn(model))
        names = [u.name for u in units if u.kind == "block"]
        assert first_block in names and len(names) == blocks, (name, names)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(UnitModel(units)(x), fold_bn(model)(x), atol=1e-5, rtol=1e-5)


def test_skip_over_a_block_makes_one_unit() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            from torchvision.models.resnet import BasicBlock

            self.block = BasicBlock(4, 4)
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.block(x)) + x  # the input stays live across the block: no cut inside

    units = extract_units(Skip().eval())
    assert [u.name for u in units] == ["stem"]


def test_plain_chain_is_cut_per_weight_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    model(torch.randn(1, 3, 12, 12))
    units = extract_units(model.eval())
    assert [(u.name, u.kind) for u in units] == [("stem", "stem"), ("3", "block"), ("head", "head")]


def test_inplace_ops_are_rewritten_without_changing_values() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            z = y.clone()
            z.add_(1.0)
            w = torch.relu_(z)  # z is relu'd in place: later reads of z see it
            return self.relu(y) + z + w

    model = InPlace().eval()
    gm, _ = trace_model(model)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_method", "call_function")]
    assert "add_" not in targets and torch.relu_ not in targets
    assert model.relu.inplace  # the user's model is untouched
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_untraceable_model_is_refused_in_one_line() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ModelError, match=r"cannot be traced with torch.fx: .*base\.float_leaves") as info:
        extract_units(Branchy())
    assert "\n" not in str(info.value)


def test_float_leaf_must_exist() -> None:
    with pytest.raises(ModelError, match="base.float_leaves entry 'nope' is not a submodule"):
        extract_units(TinyResNet(), float_leaves=["nope"])
