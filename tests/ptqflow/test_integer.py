from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from helpers import TinyMobileNet, TinyResNet, calibrate_on, randomize_bn

from ptqflow.data import LabelledImages
from ptqflow.errors import ModelError
from ptqflow.export import ExportConfig, export_onnx, onnx_logits
from ptqflow.integer import IntegerModel, _layer_int, _requantizer, integer_layers
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, load_quant_model, quant_payload
from ptqflow.quant.units import QuantLayer

MODELS = {"resnet": TinyResNet, "mobilenet": TinyMobileNet}


@functools.cache
def _quantized(kind: str, bits: int, bias: str = "int32") -> tuple[QuantModel, torch.Tensor]:
    """A calibrated tiny model and 64 inputs (cached: tests must not modify it)."""
    torch.manual_seed(0)
    fp = randomize_bn(MODELS[kind](), 0)
    config = QuantConfig(weight_bits=bits, act_bits=bits, first_last_weight_bits=None, bias=bias)  # type: ignore[arg-type]
    model = build_quant_model(fp, config)
    x = torch.randn(64, 3, 8, 8)
    calibrate_on(model, x[:16])
    return model.eval(), x


def _first_requantized(model: QuantModel) -> tuple[QuantLayer, torch.fx.Node, dict[str, torch.nn.Module]]:
    for _, unit in model.named_units():
        modules = dict(unit.body.named_modules())
        for node in unit.body.graph.nodes:
            layer = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(layer, QuantLayer) and layer.input_grid is not None and _requantizer(node, modules):
                return layer, node, modules
    raise AssertionError("no requantized layer")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_a_fused_layer_matches_a_hand_computed_integer_kernel(bits: int) -> None:
    model, x = _quantized("resnet", bits)
    layer, node, modules = _first_requantized(model)
    requant = _requantizer(node, modules)
    assert requant is not None and isinstance(layer.layer, torch.nn.Conv2d)
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x[:4])
    handle.remove()
    (inp,) = seen
    with torch.no_grad():
        got = _layer_int(layer, inp, requant)
    # By hand, in numpy int64: integers of the input and the weight, im2col, exact accumulation, int32 bias
    # round(b / (s_x s_w)) half to even, float32 multiplier (s_x s_w) / s_y, clamp, round half to even.
    s_x = np.float32(layer.input_grid.scale.detach().abs())  # type: ignore[union-attr]
    s_w = layer.weight_quantizer.scale.detach().numpy().astype(np.float32)
    q_x = np.rint(inp.numpy() / s_x).astype(np.int64)  # centred integers q - z
    w = layer.quantized_weight().detach().numpy()
    q_w = np.rint(w / s_w[:, None, None, None]).astype(np.int64)
    conv = layer.layer
    cols = (
        torch.nn.functional.unfold(
            torch.from_numpy(q_x.astype(np.float64)), conv.kernel_size, padding=conv.padding, stride=conv.stride
        )
        .numpy()
        .astype(np.int64)
    )  # (N, C*k*k, L): integer patches, zero (= the zero point) in the padding
    acc = np.einsum("ok,nkl->nol", q_w.reshape(q_w.shape[0], -1), cols)
    step = (s_x * s_w).astype(np.float32)
    q_b = np.rint(layer.layer.bias.detach().numpy().astype(np.float32) / step).astype(np.int64)
    total = acc + q_b[None, :, None]
    s_y = np.float32(requant.scale.detach().abs())
    z_y = int(requant.zero_point)
    multiplier = (step / s_y).astype(np.float32)
    value = total.astype(np.float32) * multiplier[None, :, None]
    q_y = np.clip(np.rint(np.clip(value, -z_y, 2**requant.bits - 1 - z_y)) + z_y, 0, 2**requant.bits - 1)
    expected = ((q_y - z_y).astype(np.float32) * s_y).reshape(got.shape)
    assert np.array_equal(got.numpy(), expected)
    assert torch.equal(got, torch.relu(got)) and got.abs().sum() > 0  # the ReLU is the clamp at z = 0


@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_layers_are_classified_as_the_runtime_fuses_them(kind: str) -> None:
    model, _ = _quantized(kind, 4)
    table = integer_layers(model)
    assert list(table) == [n for n, _ in model.quant_layers()]
    first, last = next(iter(table.values())), list(table.values())[-1]
    assert first == "float"  # the stem reads the image
    assert last == "float"  # the classifier reads an average of quantized values
    assert any(v.startswith("requantized by ") for v in table.values())


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_int32_bias_makes_the_fake_quant_model_the_integer_one(kind: str, bits: int) -> None:
    model, x = _quantized(kind, bits)
    with torch.no_grad():
        fake, exact = model(x), IntegerModel(model)(x)
    # The same arithmetic up to the multiplier's rounding and the float summation order.
    assert torch.equal(fake.argmax(1), exact.argmax(1))
    assert (fake - exact).abs().max() < 0.05 * fake.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", ["float", "int32"])
@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_integer_exact_matches_onnxruntime_fused_kernels(kind: str, bits: int, bias: str) -> None:
    pytest.importorskip("onnxruntime")
    model, x = _quantized(kind, bits, bias)
    model_bytes = export_onnx(model, x[:1], ExportConfig(opset=21))[0]
    data = LabelledImages(torch.arange(len(x)), torch.zeros(len(x), dtype=torch.int64))
    fused = onnx_logits(model_bytes, data, 16, lambda idx: x[idx], optimize=True)
    with torch.no_grad():
        exact = IntegerModel(model)(x)
    assert torch.equal(fused.argmax(1), exact.argmax(1))
    # Within one step of the head's input seen through the head's weights (a single rounding flip: the
    # multiplier or a float node's summation order lands a value on the other side of a half step).
    head_scale = list(model.act_quantizers())[-1][1].scale.abs().item()
    lsb = head_scale * list(model.quant_layers())[-1][1].quantized_weight().abs().amax().item()
    assert (fused - exact).abs().max() <= lsb


def test_bias_grid_is_on_the_int32_grid_and_passes_gradients() -> None:
    model, x = _quantized("resnet", 4)
    model = copy.deepcopy(model)
    layer = next(layer for _, layer in model.quant_layers() if layer.input_grid is not None)
    step = layer.bias_step()
    assert step is not None
    bias = layer.effective_bias()
    assert bias is not None and torch.equal(bias, torch.round(layer.layer.bias / step) * step)
    assert not torch.equal(bias, layer.layer.bias)
    model(x[:2]).sum().backward()  # straight-through: the input step gets a gradient through the bias too
    assert layer.input_grid is not None and layer.input_grid.scale.grad is not None
    layer.bias_grid = False
    assert layer.effective_bias() is layer.layer.bias
    layer.bias_grid = True
    layer.input_grid.enabled = False  # activations in float: no integer input, the float bias
    assert layer.effective_bias() is layer.layer.bias


def test_files_without_the_bias_key_load_with_float_biases() -> None:
    model, _ = _quantized("resnet", 4)
    payload = quant_payload(model, "tiny", QuantConfig(4, 4, first_last_weight_bits=None))
    payload["config"].pop("bias")
    loaded, _, config = load_quant_model(payload, lambda _: randomize_bn(TinyResNet(), 0), "old.pt")
    assert config.bias == "float" and not any(layer.bias_grid for _, layer in loaded.quant_layers())


def test_a_model_outside_its_inference_state_is_refused() -> None:
    model, _ = _quantized("resnet", 4)
    model = copy.deepcopy(model)
    _, quantizer = next(iter(model.act_quantizers()))
    quantizer.keep_prob = 0.5
    with pytest.raises(ModelError, match="not in its inference state"):
        IntegerModel(model)


@functools.cache
def _symmetric(kind: str, bits: int) -> tuple[QuantModel, torch.Tensor]:
    torch.manual_seed(0)
    fp = randomize_bn(MODELS[kind](), 0)
    config = QuantConfig(weight_bits=bits, act_bits=bits, first_last_weight_bits=None, scheme="symmetric")
    model = build_quant_model(fp, config)
    x = torch.randn(64, 3, 8, 8)
    calibrate_on(model, x[:16])
    return model.eval(), x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["resnet", "mobilenet"])
def test_symmetric_scheme_runs_integer_exact_in_onnxruntime(kind: str, bits: int) -> None:
    pytest.importorskip("onnxruntime")
    model, x = _symmetric(kind, bits)
    for _, layer in model.quant_layers():
        assert torch.all(layer.weight_quantizer.zero_point == 2 ** (bits - 1))
    for _, quantizer in model.act_quantizers():
        assert float(quantizer.zero_point) == 2 ** (quantizer.bits - 1)
    model_bytes, table = export_onnx(model, x[:1], ExportConfig(opset=21))
    assert {e["onnx_zero_point"] for e in table["activations"].values()} == {0}
    assert {e["container"] for e in table["activations"].values()} == {"INT8"}
    assert all(set(e["onnx_zero_point"]) == {0} for e in table["weights"].values())
    data = LabelledImages(torch.arange(len(x)), torch.zeros(len(x), dtype=torch.int64))
    fused = onnx_logits(model_bytes, data, 16, lambda idx: x[idx], optimize=True)
    with torch.no_grad():
        fake, exact = model(x), IntegerModel(model)(x)
    assert torch.equal(fused.argmax(1), exact.argmax(1))
    assert torch.equal(fake.argmax(1), exact.argmax(1))
