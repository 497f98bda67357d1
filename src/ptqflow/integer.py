"""Integer-exact evaluation: the quantized model computed the way an integer runtime computes it.

A deployed QDQ model does not run ptqflow's fake-quant float arithmetic. onnxruntime's CPU session (its
default graph optimisations) fuses every ``DequantizeLinear -> Conv/Gemm -> [Relu] -> QuantizeLinear``
group into one integer kernel (``QLinearConv``/``QGemm``); TensorRT and OpenVINO do the same. Such a
kernel, for input integers ``q_x`` (zero point ``z_x``, step ``s_x``) and per-channel weight integers
``q_w`` (``z_w``, ``s_w``):

1. accumulates ``acc = sum (q_x - z_x)(q_w - z_w)`` exactly, in int32;
2. adds the bias quantized to int32 on the grid of step ``s_x * s_w``: ``q_b = round(b / (s_x * s_w))``
   (onnxruntime's QDQ bias quantization, float32 product, round half to even);
3. requantizes to the output quantizer's grid with a float multiplier ``M = s_x * s_w / s_y`` (float32,
   in that order): ``q_y = clamp(round(float(acc + q_b) * M) + z_y, 0, 2^b - 1)``, rounding half to even
   (MLAS's ``MlasRequantizeOutput``); a ReLU between the layer and the quantizer disappears when
   ``z_y = 0`` because the clamp at 0 is the ReLU.

Everything else -- a layer whose input is the image or an average of quantized values (no integer input),
or whose output goes to a float op (the residual add) -- runs in float on dequantized values with its
float bias, as the runtime's unfused nodes do.

:class:`IntegerModel` evaluates a :class:`~ptqflow.quant.model.QuantModel` that way. The layers with an
integer input (:func:`~ptqflow.quant.model.wire_input_grids`) compute steps 1-3 exactly (integer sums in
float32 when every partial sum stays below 2^24, else float64: exact either way, and so the same bits on
every CPU and thread count); activations stay dequantized floats between layers (a ``DequantizeLinear``
of the integers, exact). Against ptqflow's fake-quant forward the differences are the three the runtime
introduces: the int32 bias (none when ``QuantConfig.bias`` is ``int32``: the fake-quant forward already
uses it), the multiplier's rounding and the float summation order (both well below half an output step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from ptqflow.errors import ModelError
from ptqflow.quant.model import QuantModel
from ptqflow.quant.quantizer import _EPS, ActQuantizer, Log2ActQuantizer
from ptqflow.quant.units import QuantLayer, QuantUnit

__all__ = ["IntegerModel", "integer_layers"]

#: float32 adds integers exactly while every partial sum stays below 2^24.
_FLOAT32_EXACT = 2**24
#: How far an input may lie from its grid (in steps) and still count as integers (float rounding of x / s).
_GRID_TOLERANCE = 1e-3
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _requantizer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> ActQuantizer | None:
    """The quantizer that requantizes ``node``'s output directly (its only reader, possibly after identities
    -- folded BatchNorms -- and a ReLU that the quantizer's clamp at ``z = 0`` implies), or ``None``."""
    relu = False
    user = node
    while True:  # through folded BatchNorms (identities) and at most one ReLU
        users = list(user.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op == "call_module" and type(modules.get(str(user.target))) is nn.Identity:
            continue
        if not relu and _is_relu(user, modules):
            relu = True
            continue
        break
    quantizer = modules.get(str(user.target)) if user.op == "call_module" else None
    if not isinstance(quantizer, ActQuantizer) or isinstance(quantizer, Log2ActQuantizer):
        return None
    if relu and float(quantizer.zero_point) != 0.0:
        return None  # a ReLU below a grid reaching negative values is a real op, not the clamp
    return quantizer


def integer_layers(model: QuantModel) -> dict[str, str]:
    """``{layer: how the integer runtime computes it}``: ``requantized by <quantizer>`` (a fused integer
    kernel), ``integer input, float output`` or ``float`` (no integer input)."""
    table = {}
    for unit_name, unit in model.named_units():
        modules = dict(unit.body.named_modules())
        for node in unit.body.graph.nodes:
            layer = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(layer, QuantLayer):
                continue
            name = f"{unit_name}.{node.target}"
            requant = _requantizer(node, modules)
            if layer.input_grid is None:
                table[name] = "float"
            elif requant is None:
                table[name] = "integer input, float output"
            else:
                by = next(f"{unit_name}.{n}" for n, q in unit.act_quantizers() if q is requant)
                table[name] = f"requantized by {by}"
    return table


def _integers(x: torch.Tensor, step: torch.Tensor, what: str) -> torch.Tensor:
    """``round(x / step)``: the centred integers ``q - z`` of values that lie on the grid (checked)."""
    ratio = x / step
    ints = torch.round(ratio)
    if ints.numel() and (ratio - ints).abs().max().item() > _GRID_TOLERANCE:
        raise ModelError(
            f"{what} does not lie on its quantization grid; integer evaluation needs a model in its inference state"
        )
    return ints


def _layer_int(layer: QuantLayer, x: torch.Tensor, requant: ActQuantizer | None) -> torch.Tensor:
    """One layer with an integer input: exact accumulation, int32 bias, float-multiplier requantization."""
    source = layer.input_grid
    assert source is not None
    s_x = source.scale.detach().abs().clamp_min(_EPS).float()
    weight = layer.quantized_weight().detach().float()
    s_w = layer.weight_scale().detach().float()
    channel = (-1,) + (1,) * (weight.dim() - 1)
    x_int = _integers(x.float(), s_x, f"the input of {type(layer.layer).__name__}")
    w_int = _integers(weight, s_w.view(channel), "a quantized weight")
    bound = w_int.abs().flatten(1).sum(1).max().item() * x_int.abs().max().item()
    dtype = torch.float32 if bound < _FLOAT32_EXACT else torch.float64
    if isinstance(layer.layer, nn.Linear):
        acc = torch.nn.functional.linear(x_int.to(dtype), w_int.to(dtype))
        out_view: tuple[int, ...] = (-1,)
    else:
        acc = layer.layer._conv_forward(x_int.to(dtype), w_int.to(dtype), None)
        out_view = (-1,) + (1,) * (acc.dim() - 2)
    step = layer.bias_step()  # s_x * s_w in float32: the product the runtime quantizes the bias with
    assert step is not None  # an integer input is an enabled quantizer's grid
    step = step.detach().float()
    bias = layer.effective_bias()
    if requant is None:  # an unfused node: float conv of the dequantized values plus the float bias
        out = acc * step.to(acc.dtype).view(out_view)
        return (out if bias is None else out + bias.detach().to(acc.dtype).view(out_view)).float()
    if bias is not None:
        q_b = torch.round(bias.detach().float() / step).clamp(-(2.0**31), 2.0**31 - 1)
        acc = acc + q_b.to(acc.dtype).view(out_view)
    s_y = requant.scale.detach().abs().clamp_min(_EPS).float()
    z_y = requant.zero_point.detach().float()
    multiplier = (step / s_y).view(out_view)
    top = float(2**requant.bits - 1)
    value = (acc.float() * multiplier).clamp(-z_y, top - z_y)  # MLAS clamps, then rounds half to even
    q = torch.round(value) + z_y
    return (q - z_y) * s_y


class _UnitInterpreter(torch.fx.Interpreter):
    """Runs one quantized unit's graph with its integer-input layers computed by :func:`_layer_int`."""

    def __init__(self, unit: QuantUnit) -> None:
        super().__init__(unit.body)
        modules = dict(unit.body.named_modules())
        self.requant: dict[str, ActQuantizer | None] = {}
        for node in unit.body.graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(str(node.target)), QuantLayer):
                self.requant[str(node.target)] = _requantizer(node, modules)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(str(target))
        if isinstance(module, QuantLayer) and module.input_grid is not None and not kwargs:
            return _layer_int(module, args[0], self.requant[str(target)])
        return super().call_module(target, args, kwargs)


class IntegerModel(nn.Module):
    """A quantized model evaluated as an integer runtime computes it (module docstring).

    Args:
        model: a quantized model in its inference state (AdaRound finished, quantizers enabled, no drop);
            it is shared, not copied, and must not be frozen by :func:`ptqflow.evaluate.freeze_weights`
            (the integer path needs the weight quantizers).
    """

    def __init__(self, model: QuantModel) -> None:
        super().__init__()
        for name, layer in model.quant_layers():
            if layer.adaround is not None or not layer.quantize_weight:
                raise ModelError(f"layer {name}: integer evaluation needs its weight quantizer on, AdaRound finished")
        for name, quantizer in model.act_quantizers():
            if not quantizer.enabled or quantizer.observing or quantizer.keep_prob < 1.0:
                raise ModelError(f"activation quantizer {name} is not in its inference state (enabled, no drop)")
        self.model = model
        self._units = [_UnitInterpreter(unit) for _, unit in model.named_units()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for unit in self._units:
                x = unit.run(x)
        return x
