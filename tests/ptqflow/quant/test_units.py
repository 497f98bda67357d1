from __future__ import annotations

import pytest
import torch
from helpers import randomize_bn
from torch import nn
from torchvision.models.mnasnet import _InvertedResidual
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock

from ptqflow.errors import ModelError
from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model
from ptqflow.quant.quantizer import ActQuantizer
from ptqflow.quant.units import QuantMnasInvertedResidual, QuantResBottleneck, build_quant_unit

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "regnet_x_600mf", "regnet_x_3_2gf", "mnasnet1_0"]


def _calibrated_block(block: nn.Module, x: torch.Tensor, bits: int = 8) -> nn.Module:
    unit = build_quant_unit(fold_bn(randomize_bn(block)), "block", bits, bits)
    for _, layer in unit.quant_layers():
        layer.weight_quantizer.init_range(layer.layer.weight)
    unit.set_quant_state(weight=True, act=False)
    quantizers = [q for _, q in unit.act_quantizers()]
    for q in quantizers:
        q.observing = True
    with torch.no_grad():
        unit(x)
    for q in quantizers:
        q.init_range()
    unit.set_quant_state(weight=True, act=True)
    return unit


@pytest.mark.parametrize("name", MODELS)
def test_quantization_off_reproduces_the_fp_model(name: str) -> None:
    """Each block's forward is rewritten: with quantizers off it must equal torchvision's (shared ReLU
    modules, in-place activations and all)."""
    model = randomize_bn(build_model(f"torchvision.{name}"))
    quant = build_quant_model(model, QuantConfig(convention="qdrop"), init_weights=False)
    quant.set_quant_state(weight=False, act=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(quant(x), model(x), atol=1e-4, rtol=1e-3)


def test_basic_block_gets_a_quantizer_per_relu_use() -> None:
    block = BasicBlock(8, 8)  # one ReLU module, called twice
    unit = build_quant_unit(fold_bn(block), "block", 4, 4)
    assert [n for n, _ in unit.act_quantizers()] == ["act1", "act_out"]


def test_regnet_block_placement() -> None:
    block = ResBottleneckBlock(16, 32, stride=2, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, group_width=8)
    x = torch.randn(4, 16, 8, 8)
    unit = _calibrated_block(block, x)
    assert isinstance(unit, QuantResBottleneck)
    assert [n for n, _ in unit.quant_layers()] == ["layers.0", "layers.1", "layers.2", "proj"]
    assert [n for n, _ in unit.act_quantizers()] == ["acts.0", "acts.1", "act_out"]  # a, b, after add+ReLU
    assert unit.layers[1].layer.groups == 4  # RegNetX grouped 3x3: 32 channels, group width 8
    with torch.no_grad():
        out, ref = unit(x), fold_bn(randomize_bn(block))(x)
    assert out.min() >= 0  # quantized after the final ReLU
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99  # 8-bit


def test_regnet_identity_block_has_no_projection() -> None:
    block = ResBottleneckBlock(16, 16, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, group_width=8)
    unit = build_quant_unit(fold_bn(block), "block", 4, 4)
    assert isinstance(unit, QuantResBottleneck) and unit.proj is None


def test_regnet_y_squeeze_excitation_is_refused() -> None:
    block = ResBottleneckBlock(
        16, 16, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, group_width=8, se_ratio=0.25
    )
    with pytest.raises(ModelError, match="RegNetX only"):
        build_quant_unit(fold_bn(block), "block", 4, 4)


@pytest.mark.parametrize(("in_ch", "out_ch", "stride", "residual"), [(16, 16, 1, True), (16, 24, 2, False)])
def test_mnasnet_block_placement(in_ch: int, out_ch: int, stride: int, residual: bool) -> None:
    block = _InvertedResidual(in_ch, out_ch, 3, stride, 3)
    x = torch.randn(4, in_ch, 8, 8)
    unit = _calibrated_block(block, x)
    assert isinstance(unit, QuantMnasInvertedResidual) and unit.apply_residual is residual
    assert len(list(unit.quant_layers())) == 3
    # pointwise and depthwise ReLU outputs, then the block output (after the add, or the linear conv)
    assert [n for n, _ in unit.act_quantizers()] == ["acts.0", "acts.1", "act_out"]
    with torch.no_grad():
        out, ref = unit(x), fold_bn(randomize_bn(block))(x)
    assert out.min() < 0  # no final activation
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_stem_output_quantizer_only_where_the_stem_ends_in_a_conv() -> None:
    config = QuantConfig(convention="qdrop")
    mnas = build_quant_model(build_model("torchvision.mnasnet1_0"), config, init_weights=False)
    assert [n for n, _ in mnas.units[0].act_quantizers()] == ["segment.act0", "segment.act1", "segment.act_out"]
    for name in ("resnet20", "mobilenetv2_s", "torchvision.resnet18", "torchvision.regnet_x_600mf"):
        model = build_quant_model(build_model(name), config, init_weights=False)
        stem = [n for n, _ in model.units[0].act_quantizers()]
        head = [n for n, _ in model.units[-1].act_quantizers()]
        assert stem == ["segment.act0"], name  # the ReLU output (resnet: then max-pooled, still on the grid)
        assert not any(
            isinstance(m, ActQuantizer) and n.endswith("act_out") for n, m in model.units[-1].named_modules()
        )
        assert "segment.act_out" not in head  # logits are never quantized
