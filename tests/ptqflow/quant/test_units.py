from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyMobileNet, TinyResNet, assert_close_at_scale, calibrate_on, randomize_bn
from torch import nn

from ptqflow.errors import ModelError
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model
from ptqflow.quant.units import QuantUnit

#: (weight quantizers, activation quantizers) of the papers' families: the counts of the per-class
#: forwards this generic unit replaced (bench/placement_equivalence.py: equal counts, equal scales, equal
#: RTN logits at W4A4 and W2A4 under both conventions).
PLACEMENT = {
    "resnet20": (22, 19),
    "mobilenetv2_s": (29, 28),
    "torchvision.resnet18": (21, 17),
    "torchvision.resnet50": (54, 49),
    "torchvision.mobilenet_v2": (53, 52),
    "torchvision.regnet_x_600mf": (54, 49),
    "torchvision.mnasnet1_0": (53, 52),
}


@pytest.mark.parametrize("name", list(PLACEMENT))
def test_placement_counts_and_quantization_off_equals_fp(name: str) -> None:
    model = randomize_bn(build_model(name))
    quant = build_quant_model(model, QuantConfig(convention="qdrop"), init_weights=False)
    assert (len(list(quant.quant_layers())), len(list(quant.act_quantizers()))) == PLACEMENT[name]
    assert quant.unquantized_inputs() == []
    quant.set_quant_state(weight=False, act=False)
    x = torch.randn(2, 1, 28, 28) if "." not in name else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_at_scale(quant(x), model(x))


def _unit(model: nn.Module, name: str, bits: int = 4) -> tuple[QuantUnit, torch.Tensor]:
    """Unit ``name`` of ``model`` at W``bits``A``bits`` (RTN, calibrated) and its input on a random batch."""
    x = model.example_inputs(8)  # type: ignore[operator]
    quant = calibrate_on(build_quant_model(model, QuantConfig(weight_bits=bits, act_bits=bits)), x)
    h = x
    with torch.no_grad():
        for unit_name, unit in quant.named_units():
            if unit_name == name:
                return unit, h
            h = unit(h)
    raise KeyError(name)


def test_basic_block_positions_match_the_hand_written_forward() -> None:
    """BRECQ's BasicBlock: conv1+ReLU quantized, conv2 and the shortcut not, the output after add+ReLU --
    each use of the block's one ReLU module its own quantizer."""
    unit, x = _unit(randomize_bn(TinyResNet()), "layer1.1")
    layers, acts = dict(unit.quant_layers()), dict(unit.act_quantizers())
    assert list(layers) == ["conv1", "conv2", "downsample.0"]
    assert list(acts) == ["act_relu", "act_relu_1"]
    with torch.no_grad():
        identity = layers["downsample.0"](x)
        h = acts["act_relu"](F.relu(layers["conv1"](x)))
        reference = acts["act_relu_1"](F.relu(layers["conv2"](h) + identity))
        assert torch.equal(unit(x), reference)


def test_inverted_residual_positions_match_the_hand_written_forward() -> None:
    """MobileNetV2: expand and depthwise ReLU6 outputs quantized, the linear projection not, the block
    output once after the residual add."""
    unit, x = _unit(randomize_bn(TinyMobileNet()), "features.1")
    layers, acts = dict(unit.quant_layers()), dict(unit.act_quantizers())
    assert list(layers) == ["conv.0.0", "conv.1.0", "conv.2"] and list(acts) == [
        "act_conv_0_2",
        "act_conv_1_2",
        "act_add",
    ]
    with torch.no_grad():
        h = acts["act_conv_0_2"](F.relu6(layers["conv.0.0"](x)))
        h = acts["act_conv_1_2"](F.relu6(layers["conv.1.0"](h)))
        assert torch.equal(unit(x), acts["act_add"](x + layers["conv.2"](h)))


def test_squeeze_excitation_and_hardswish_are_placed() -> None:
    """MobileNetV3: Hardswish outputs and the SE-gated tensor are quantized where a conv reads them; the
    SE gate itself (read only by the multiply) stays float, as every runtime computes it."""
    model = randomize_bn(build_model("torchvision.mobilenet_v3_small"))
    quant = build_quant_model(model, QuantConfig(), init_weights=False)
    assert quant.unquantized_inputs() == []
    unit = dict(quant.named_units())["features.4"]  # expand, depthwise (Hardswish each), SE, project (no residual)
    assert [n for n, _ in unit.act_quantizers()] == [
        "act_block_0_2",  # expand Hardswish
        "act_block_1_2",  # depthwise Hardswish: read by the project conv (after the gate) and the SE pooling
        "act_block_2_activation",  # SE fc1's ReLU, read by fc2
        "act_mul_1",  # the gated tensor, read by the project conv
        "act_block_3_0",  # the block output (the project conv; read by the next block)
    ]


def test_distinct_value_probe_on_efficientnet(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ptqflow.coverage import check_model

    report = check_model(randomize_bn(build_model("torchvision.efficientnet_b0")), torch.randn(2, 3, 32, 32), tmp_path,
                         recon_iters=1, export=False)  # fmt: skip
    assert report.probed > 50 and report.probe_violations == [] and report.unquantized == []
    assert report.passed


def test_stem_and_head_quantizers() -> None:
    config = QuantConfig(convention="qdrop")
    mnas = build_quant_model(build_model("torchvision.mnasnet1_0"), config, init_weights=False)
    # ReLU, ReLU and the stem's linear 1x1 conv output (read by the first block's conv)
    assert [n for n, _ in mnas.units[0].act_quantizers()] == ["act_layers_2", "act_layers_5", "act_layers_6"]
    for name in ("resnet20", "mobilenetv2_s", "torchvision.resnet18", "torchvision.regnet_x_600mf"):
        model = build_quant_model(build_model(name), config, init_weights=False)
        assert len(list(model.units[0].act_quantizers())) == 1, name  # the stem's ReLU output (then max-pooled)
        head = dict(model.units[-1].body.named_modules())
        output = [n for n in model.units[-1].body.graph.nodes if n.op == "output"][0]
        assert not isinstance(head.get(str(output.args[0].target)), type(model.units[0].act_quantizers())), name


def test_shared_quantizer_feeds_every_consumer() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(3, 4, 1)
            self.conv1 = nn.Conv2d(4, 4, 1)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.sigmoid(self.conv0(x))  # read by two convs and an add: one quantizer
            y = self.conv1(h) + self.conv2(h) + h
            return self.fc(y.mean((2, 3)))

        @staticmethod
        def example_inputs(n: int = 4) -> torch.Tensor:
            return torch.randn(n, 3, 6, 6)

    quant = build_quant_model(Fork().eval(), QuantConfig(), init_weights=False)
    names = [n for n, _ in quant.act_quantizers()]
    # a plain chain, cut per weight layer: h quantized once (stem), the sum read by fc after the mean
    assert names == ["stem.act_sigmoid", "conv1.act_add_1"]


def test_unknown_op_producing_a_conv_input_is_refused() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(3, 3, 1)
            self.conv1 = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv1(torch.special.erfcx(self.conv0(x)))

    with pytest.raises(ModelError, match=r"function special_erfcx produces the input of module conv1 .*float_leaves"):
        build_quant_model(Odd().eval(), QuantConfig(), init_weights=False)


def test_custom_autograd_function_is_refused() -> None:
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def, override]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def, override]
            return g * 2

    class UsesIt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(Twice.apply(x))

    with pytest.raises(ModelError, match="custom autograd function Twice cannot be traced"):
        build_quant_model(UsesIt().eval(), QuantConfig(), init_weights=False)
    assert Twice.apply(torch.ones(1)).item() == 2.0  # the patch is undone


def test_hidden_weights_are_refused_unless_kept_float() -> None:
    class Bilinear(nn.Module):
        """A weight used by a functional op (as timm's ``Linear`` or ``nn.Bilinear`` do): out of placement's reach."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.bilinear(x, x, self.weight)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.mix = Bilinear()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.mix(self.proj(x)).relu())

    with pytest.raises(ModelError, match=r"function bilinear in mix holds weights .*base\.float_leaves"):
        build_quant_model(Model().eval(), QuantConfig(), init_weights=False)
    quant = build_quant_model(Model().eval(), QuantConfig(float_leaves=("mix",)), init_weights=False)
    assert quant.float_leaves == ["mix"] and quant.unquantized_inputs() == []
    # only the fc's input: the float leaf's own input is read by no quantized layer (reported as float instead)
    assert [n.split(".")[-1] for n, _ in quant.act_quantizers()] == ["act_relu"]


def test_weight_module_called_twice_is_refused() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    with pytest.raises(ModelError, match="module conv is called more than once"):
        build_quant_model(Reuse().eval(), QuantConfig(), init_weights=False)
