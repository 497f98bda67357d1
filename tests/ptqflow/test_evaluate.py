"""Inference helpers: frozen weights give the same bits; logits stream in data order with a wrapper."""

from __future__ import annotations

import torch
from helpers import calibrate_on, randomize_bn

from ptqflow.data import LabelledImages
from ptqflow.evaluate import accuracy, freeze_weights, predict_logits
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model


def _quantized() -> torch.nn.Module:
    model = build_quant_model(randomize_bn(build_model("resnet20")), QuantConfig(weight_bits=2, act_bits=4))
    return calibrate_on(model, torch.randn(8, 1, 28, 28))


def test_frozen_weights_give_identical_logits() -> None:
    model = _quantized()
    data = LabelledImages(torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8), torch.arange(20) % 10)
    cpu = torch.device("cpu")
    before = predict_logits(model, data, 7, lambda x: x.float()[:, None] / 255, cpu)
    freeze_weights(model)
    assert all(not layer.quantize_weight for _, layer in model.quant_layers())
    seen: list[int] = []

    def wrap(stream):  # type: ignore[no-untyped-def]
        for batch in stream:
            seen.append(len(batch[0]))
            yield batch

    after = predict_logits(model, data, 7, lambda x: x.float()[:, None] / 255, cpu, wrap)
    assert torch.equal(before, after)
    assert seen == [7, 7, 6]
    assert accuracy(after, data.labels, (1,)).keys() == {"top1"}


def test_model_trains_after_predict_logits() -> None:
    """Evaluating between training epochs must not turn parameters into inference tensors (its channels_last
    round trip re-lays out MobileNetV3's 5x5 depthwise weights; under inference mode that broke epoch 2)."""
    model = build_model("mobilenetv3_s")
    data = LabelledImages(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    predict_logits(model, data, 2, lambda x: x.float()[:, None], torch.device("cpu"))
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
