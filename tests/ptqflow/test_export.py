from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from helpers import TinyMobileNet, TinyResNet, calibrate_on, randomize_bn

from ptqflow.data import LabelledImages
from ptqflow.errors import ConfigError, ModelError
from ptqflow.export import (
    ExportConfig,
    compare_logits,
    export_onnx,
    onnx_logits,
    plain_state_dict,
    quant_table,
    tensor_quants,
    tensorrt_violations,
)
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper

MODELS: dict[str, Callable[[], torch.nn.Module]] = {"resnet": TinyResNet, "mobilenet": TinyMobileNet}


@functools.cache
def _quantized(kind: str, bits: int, seed: int = 0) -> tuple[QuantModel, torch.Tensor]:
    """A calibrated tiny model and 64 inputs (cached: tests must not modify it)."""
    torch.manual_seed(seed)
    fp = randomize_bn(MODELS[kind](), seed)
    model = build_quant_model(fp, QuantConfig(weight_bits=bits, act_bits=bits, first_last_weight_bits=None))
    x = torch.randn(64, 3, 8, 8)
    calibrate_on(model, x[:16])  # a small calibration batch keeps the Lp range search quick
    return model, x


def _run(model_bytes: bytes, x: torch.Tensor, optimize: bool) -> torch.Tensor:
    # The "images" are indices into x; the preprocess looks the float inputs up.
    data = LabelledImages(torch.arange(len(x)), torch.zeros(len(x), dtype=torch.int64))
    return onnx_logits(model_bytes, data, 16, lambda idx: x[idx], optimize=optimize)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_onnxruntime_matches_torch_fake_quant(kind: str, bits: int) -> None:
    model, x = _quantized(kind, bits)
    model_bytes = export_onnx(model, x[:1], ExportConfig(opset=21))[0]
    with torch.no_grad():
        ref = model(x)
    # One step of the last activation quantizer, seen through the head's weights: what a single rounding
    # flip (float accumulation order differs between the runtimes) moves a logit by.
    head_scale = list(model.act_quantizers())[-1][1].scale.abs().item()
    lsb = head_scale * list(model.quant_layers())[-1][1].quantized_weight().abs().amax().item()
    # Node by node, onnxruntime repeats the torch fake-quant arithmetic: equal up to rare one-step flips.
    exact = _run(model_bytes, x, optimize=False)
    assert (exact - ref).abs().max().item() <= lsb + 1e-5
    assert ((exact - ref).abs() > 1e-4).float().mean() < 0.05
    assert torch.equal(exact.argmax(1), ref.argmax(1))
    # With its default optimisations, QDQ groups run as integer kernels (requantization rounds on its
    # own): a few steps apart at most, nearly always the same class.
    fused = _run(model_bytes, x, optimize=True)
    assert (fused - ref).abs().max().item() <= 8 * lsb
    assert compare_logits(ref, fused, ref.argmax(1))["agreement"] >= 90.0


@pytest.mark.parametrize(
    ("bits", "config", "weights", "acts"),
    [
        (8, ExportConfig(opset=21), "INT8", "UINT8"),
        (4, ExportConfig(opset=21), "INT4", "UINT8"),  # auto: INT4 weights, 8-bit activation containers
        (4, ExportConfig(opset=17), "INT8", "UINT8"),  # auto below opset 21: all 8-bit containers
        (4, ExportConfig(opset=21, containers="int8"), "INT8", "UINT8"),
        (4, ExportConfig(opset=21, containers="int4"), "INT4", "UINT4"),
        (3, ExportConfig(opset=21), "INT8", "UINT8"),
        (2, ExportConfig(opset=23), "INT8", "UINT8"),
    ],
)
def test_containers_and_clip(bits: int, config: ExportConfig, weights: str, acts: str) -> None:
    model, x = _quantized("resnet", bits)
    proto = onnx.load_from_string(export_onnx(model, x[:1], config)[0])
    types = {n: onnx.TensorProto.DataType.Name(t.data_type) for n, t in ((t.name, t) for t in proto.graph.initializer)}
    assert {t for n, t in types.items() if n.endswith(".weight_q")} == {weights}
    stem, *rest = (q for _, q in model.act_quantizers())  # the stem's output stays 8-bit (brecq convention)
    assert types[f"{list(model.act_quantizers())[0][0]}.zero_point"] == "UINT8" and stem.bits == 8
    assert {types[f"{n}.zero_point"] for n, q in model.act_quantizers() if q.bits == bits} == {acts}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == len(rest) + 1  # one per activation quantizer; weights are integers
    assert ops.count("DequantizeLinear") == len(rest) + 1 + len(list(model.quant_layers()))
    clipped = acts == "UINT8" and bits != 8
    assert ops.count("Clip") == (len(rest) if clipped else 0)
    assert proto.opset_import[0].version == config.opset and all(o.domain != "ptqflow" for o in proto.opset_import)
    onnx.checker.check_model(proto, full_check=True)
    for node in proto.graph.node:
        if node.op_type == "Clip":
            lo, hi = (numpy_helper.to_array(_init(proto, n)) for n in node.input[1:])
            assert (int(lo), int(hi)) == (0, 2**bits - 1)
    # Every variant runs in onnxruntime node by node and reproduces torch's classes.
    with torch.no_grad():
        ref = model(x)
    assert torch.equal(_run(proto.SerializeToString(), x, optimize=False).argmax(1), ref.argmax(1))


def _init(proto: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def test_export_is_deterministic() -> None:
    model, x = _quantized("mobilenet", 4)
    first = export_onnx(model, x[:1], ExportConfig())
    again = copy.deepcopy(model)
    assert export_onnx(again, x[:2], ExportConfig()) == first  # same model, another example batch size


@pytest.mark.parametrize("bits", [4, 3])
def test_sidecar_and_initializers_match_the_model(bits: int) -> None:
    model, x = _quantized("resnet", bits)
    config = ExportConfig(opset=21)
    model_bytes, table = export_onnx(model, x[:1], config)
    assert table == quant_table(tensor_quants(model, config), config)
    proto = onnx.load_from_string(model_bytes)
    state = plain_state_dict(model)
    for name, layer in model.quant_layers():
        entry, wq = table["weights"][name], layer.weight_quantizer
        assert torch.equal(torch.tensor(entry["scale"], dtype=torch.float32), wq.scale)
        assert torch.equal(torch.tensor(entry["zero_point"], dtype=torch.float32), wq.zero_point)
        assert entry["bits"] == bits and entry["axis"] == 0
        # The graph's integers dequantize to exactly the weight the torch forward uses.
        q = numpy_helper.to_array(_init(proto, f"{name}.weight_q")).astype(np.int64)
        zero = numpy_helper.to_array(_init(proto, f"{name}.zero_point")).astype(np.int64)
        assert zero.tolist() == entry["onnx_zero_point"]
        scale = numpy_helper.to_array(_init(proto, f"{name}.scale"))
        view = (-1,) + (1,) * (q.ndim - 1)
        deq = torch.from_numpy((q - zero.reshape(view)).astype(np.float32) * scale.reshape(view))
        with torch.no_grad():
            expected = layer.quantized_weight()
        assert torch.equal(deq, expected)
        assert torch.equal(state[f"{name}.weight"], expected)
        with torch.no_grad():
            bias, step = layer.effective_bias(), layer.bias_step()
        assert torch.equal(state[f"{name}.bias"], bias)
        if layer.input_grid is not None:  # the int32-grid bias (QuantConfig.bias int32, the default)
            assert step is not None and torch.equal(bias, torch.round(layer.layer.bias / step) * step)
        assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    for name, aq in model.act_quantizers():
        entry = table["activations"][name]
        assert torch.tensor(entry["scale"], dtype=torch.float32) == aq.scale.detach().abs()
        assert entry["zero_point"] == int(aq.zero_point) == entry["onnx_zero_point"]
        # 8-bit activation containers (the stem's output is 8-bit, brecq convention; the rest clipped)
        assert entry["bits"] == aq.bits and entry["container"] == "UINT8"
        assert entry["clip"] == (None if aq.bits == 8 else [0, 2**aq.bits - 1])


def test_tensor_quants_cover_every_quantizer() -> None:
    model, _ = _quantized("mobilenet", 2)
    quants = tensor_quants(model, ExportConfig(opset=17))
    assert [q.name for q in quants if q.kind == "weight"] == [n for n, _ in model.quant_layers()]
    assert [q.name for q in quants if q.kind == "activation"] == [n for n, _ in model.act_quantizers()]
    assert {q.container for q in quants} == {"INT8", "UINT8"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 12}, "opset must be an integer in 13..23"),
        ({"opset": 24}, "opset must be an integer in 13..23"),
        ({"opset": 17, "containers": "int4"}, "containers 'int4' needs opset >= 21"),
        ({"containers": "int2"}, "containers must be one of"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**kwargs)  # type: ignore[arg-type]


def test_auto_falls_back_to_int8_below_opset_21() -> None:
    assert ExportConfig(opset=21).int4 and not ExportConfig(opset=20).int4
    assert not ExportConfig(opset=23, containers="int8").int4
    assert not ExportConfig(opset=21).int4_activations and ExportConfig(containers="int4").int4_activations


def test_model_mid_reconstruction_is_refused() -> None:
    model, x = _quantized("resnet", 4)
    model = copy.deepcopy(model)
    next(layer for _, layer in model.quant_layers()).start_adaround()
    with pytest.raises(ModelError, match="soft AdaRound"):
        export_onnx(model, x[:1], ExportConfig())


class _TinyAttention(torch.nn.Module):
    """Conv patches -> tokens -> nn.MultiheadAttention -> linear head (the ViT shape, in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.head((tokens + mixed).mean(1))


def test_multihead_attention_float_leaf_exports() -> None:
    """A float-leaf nn.MultiheadAttention must not take its fused inference kernel during export (that op has
    no ONNX symbolic); the exported graph matches torch, and the fast-path switch is restored."""
    torch.manual_seed(0)
    model = build_quant_model(_TinyAttention().eval(), QuantConfig(4, 4, float_leaves=("attn",)))
    x = torch.randn(32, 3, 8, 8)
    calibrate_on(model, x[:16])
    model_bytes = export_onnx(model, x[:1], ExportConfig(opset=21))[0]
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        ref = model(x)
    agreement = compare_logits(ref, _run(model_bytes, x, optimize=False), torch.zeros(32, dtype=torch.int64))
    assert agreement["agreement"] >= 95.0  # percent; node by node, only rare rounding flips differ


def _symmetric(bits: int) -> tuple[QuantModel, torch.Tensor]:
    torch.manual_seed(0)
    fp = randomize_bn(TinyResNet(), 0)
    config = QuantConfig(weight_bits=bits, act_bits=bits, first_last_weight_bits=None, scheme="symmetric")
    model = build_quant_model(fp, config)
    x = torch.randn(16, 3, 8, 8)
    return calibrate_on(model, x), x


def test_symmetric_w8a8_graph_follows_tensorrt_rules() -> None:
    model, x = _symmetric(8)
    assert tensorrt_violations(export_onnx(model, x[:1], ExportConfig(opset=21))[0]) == []


def test_tensorrt_rules_name_what_breaks_them() -> None:
    asym, x = _quantized("resnet", 8)
    found = tensorrt_violations(export_onnx(asym, x[:1], ExportConfig(opset=21))[0])
    assert {v.split(":")[0] for v in found} == {"rule 1", "rule 2"}  # zero points; UINT8 activations
    assert any("UINT8" in v for v in found)
    sym4, x = _symmetric(4)
    found = tensorrt_violations(export_onnx(sym4, x[:1], ExportConfig(opset=21))[0])
    assert any(v.startswith("rule 3:") and "Clip" in v for v in found)  # 4-bit activations: Q -> Clip -> DQ
    assert any(v.startswith("rule 2:") and "INT4" in v for v in found)  # INT4 convolution weights
    assert not any(v.startswith("rule 1:") for v in found)
