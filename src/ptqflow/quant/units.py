"""The quantized reconstruction unit: one generic class for every block of every traced model.

A :class:`QuantUnit` is the FP unit's ``GraphModule`` (:func:`ptqflow.units.extract_units`) with every
conv/linear module swapped for a :class:`QuantLayer` (per-output-channel weight quantizer, AdaRound-capable)
and one :class:`~ptqflow.quant.quantizer.ActQuantizer` inserted after each producer node the unit owns
(the placement rule of :mod:`ptqflow.ops`: every input of a weight layer or activation matmul, quantized
once at its producer and shared by its consumers). For the block types of the papers this is BRECQ/QDrop's
placement (algorithms.md section 1.2): a layer's output after its ReLU/ReLU6, no quantizer on the last conv
of a residual branch or the shortcut conv, the block output once after add(+ReLU), the average-pooled
input of the classifier quantized before the pooling -- no block type is named anywhere.

Quantizer names are ``act_<node>``, the fx node name of the producer relative to the unit's module path
(``layer1.0.act_relu``, ``layer1.0.act_relu_1`` for the second use of one ``ReLU``); layer names are the
module paths relative to the unit (``layer1.0.conv1``, ``stem.conv1``, ``head.fc``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import torch
import torch.fx
from torch import nn

from ptqflow.errors import ModelError
from ptqflow.kernels import conv, linear
from ptqflow.ops import WEIGHT_MODULES, is_softmax
from ptqflow.quant.adaround import MIN_SCALE, AdaRound
from ptqflow.quant.quantizer import _EPS, ActQuantizer, Log2ActQuantizer, WeightQuantizer, round_ste
from ptqflow.units import Unit

__all__ = ["QuantLayer", "QuantUnit", "build_quant_unit"]


class QuantLayer(nn.Module):
    """A folded conv or linear layer whose weight passes through a :class:`WeightQuantizer`."""

    def __init__(self, layer: nn.Module, weight_bits: int, symmetric: bool = False) -> None:
        super().__init__()
        if type(layer) not in WEIGHT_MODULES:
            raise ModelError(
                f"QuantLayer wraps {', '.join(t.__name__ for t in WEIGHT_MODULES)}, got {type(layer).__name__}"
            )
        self.layer: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear = layer  # type: ignore[assignment]
        self.weight_quantizer = WeightQuantizer(weight_bits, self.layer.weight.shape[0], symmetric)
        self.quantize_weight = True
        self.adaround: AdaRound | None = None
        #: Round the bias to the int32 grid of step ``s_in * s_w`` (``QuantConfig.bias``), as integer runtimes do.
        self.bias_grid = False
        # The activation quantizer whose grid this layer's input lies on (None: the input is the image, an
        # average of quantized values, or several grids). A plain attribute, not a submodule: the quantizer
        # belongs to the unit (or an earlier unit) that produces the input.
        self.__dict__["input_grid"] = None
        #: The wrapped layer's module path in the FP model (``layer1.0.conv1``; set by :class:`QuantUnit`),
        #: the key of its BN's statistics (:func:`ptqflow.fold.bn_statistics`).
        self.source = ""

    @property
    def input_grid(self) -> ActQuantizer | None:
        """The activation quantizer whose integers this layer reads (:func:`ptqflow.quant.model.wire_input_grids`)."""
        grid: ActQuantizer | None = self.__dict__["input_grid"]
        return grid

    def set_input_grid(self, quantizer: ActQuantizer | None) -> None:
        """Record the quantizer producing this layer's input (not registered as a submodule)."""
        self.__dict__["input_grid"] = quantizer

    def weight_scale(self) -> torch.Tensor:
        """The per-channel weight step ``(C_out,)`` the forward uses (AdaRound's learned one while attached)."""
        if self.adaround is not None:
            scale = self.adaround.scale
            if isinstance(scale, nn.Parameter):
                scale = scale.clamp_min(MIN_SCALE)
            return scale.reshape(-1)
        return self.weight_quantizer.scale

    def bias_step(self) -> torch.Tensor | None:
        """``s_in * s_w`` per output channel (float32, the product an integer runtime quantizes the bias with),
        or ``None`` when the input is not on one quantized grid right now (image, average, quantizer off)."""
        source = self.input_grid
        if source is None or not source.enabled or source.observing or not self.quantize_weight:
            return None
        s_in = source.scale.abs().clamp_min(_EPS)
        return s_in * self.weight_scale()

    def effective_bias(self) -> torch.Tensor | None:
        """The bias the forward adds: with ``bias_grid`` and a quantized input, ``round(b / s) * s`` with
        ``s = s_in * s_w`` (saturated to int32) -- the int32 bias of an integer kernel (onnxruntime's QDQ bias
        quantization, TensorRT, OpenVINO), straight-through for the steps' gradients; else the float bias."""
        bias = self.layer.bias
        if bias is None or not self.bias_grid:
            return bias
        step = self.bias_step()
        if step is None:
            return bias
        q = round_ste(bias / step).clamp(-(2.0**31), 2.0**31 - 1)
        return q * step

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it (fake-quantized when ``quantize_weight``)."""
        w = self.layer.weight
        if not self.quantize_weight:
            return w
        if self.adaround is not None:
            return self.adaround()
        return self.weight_quantizer(w)

    def start_adaround(self, learn_scale: bool = False) -> AdaRound:
        """Attach learned rounding on the weight quantizer's grid (its step learned too with ``learn_scale``,
        Genie-M; else frozen); return it."""
        q = self.weight_quantizer
        self.adaround = AdaRound(self.layer.weight, q.scale, q.zero_point, q.bits, learn_scale)
        return self.adaround

    @torch.no_grad()
    def finish_adaround(self) -> None:
        """Write the hard-rounded weight into the layer and drop the rounding variables.

        The stored weight lies on the grid, so nearest rounding reproduces it exactly afterwards.
        """
        if self.adaround is None:
            raise RuntimeError("finish_adaround: no AdaRound attached; call start_adaround first")
        self.adaround.soft = False
        self.layer.weight.copy_(self.adaround())
        if isinstance(self.adaround.scale, nn.Parameter):  # the learned step becomes the quantizer's grid
            self.weight_quantizer.scale.copy_(self.adaround.scale.detach().clamp_min(MIN_SCALE).flatten())
        self.adaround = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        bias = self.effective_bias()
        if isinstance(self.layer, nn.Linear):
            return linear(self.layer, x, w, bias)
        return conv(self.layer, x, w, bias)


class QuantUnit(nn.Module):
    """A reconstruction unit: the unit's graph with quantized layers and activation quantizers.

    Args:
        unit: the FP unit (BN folded); it is copied, not modified.
        weight_bits: bits of every weight layer (the model applies the 8-bit exceptions afterwards).
        act_bits: bits of every activation quantizer of the unit.
        softmax: grid of the quantizers on softmax outputs: ``uniform`` or ``log2``
            (:class:`~ptqflow.quant.quantizer.Log2ActQuantizer`).
        symmetric: every weight and uniform activation quantizer on the signed, zero-point-0 grid.
    """

    def __init__(
        self, unit: Unit, weight_bits: int, act_bits: int, softmax: str = "uniform", symmetric: bool = False
    ) -> None:
        super().__init__()
        self.kind = unit.kind
        self.float_leaves = tuple(unit.float_leaves)
        body = copy.deepcopy(unit.module)
        graph = body.graph
        for node in graph.nodes:
            if node.op == "call_module":
                module = body.get_submodule(str(node.target))
                if type(module) in WEIGHT_MODULES:
                    layer = QuantLayer(module, weight_bits, symmetric)
                    layer.source = f"{unit.prefix}.{node.target}" if unit.prefix else str(node.target)
                    body.set_submodule(str(node.target), layer)
        prefix = re.sub(r"[^0-9a-zA-Z_]", "_", unit.prefix) + "_" if unit.prefix else ""  # as fx names nodes
        nodes = {n.name: n for n in graph.nodes}
        modules = dict(body.named_modules())
        for node_name in unit.quantized:
            node = nodes[node_name]
            name = "act_" + node_name.removeprefix(prefix)
            if hasattr(body, name):
                raise ModelError(f"unit {unit.name}: submodule {name} clashes with an activation quantizer name")
            log2 = softmax == "log2" and is_softmax(node, modules)
            body.add_submodule(name, Log2ActQuantizer(act_bits) if log2 else ActQuantizer(act_bits, symmetric))
            with graph.inserting_after(node):
                quantized = graph.call_module(name, (node,))
            node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
        body.recompile()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def quant_layers(self) -> Iterator[tuple[str, QuantLayer]]:
        """``(name within the unit, layer)`` for every quantized conv/linear, in forward order."""
        for name, module in self.body.named_modules():
            if isinstance(module, QuantLayer):
                yield name, module

    def act_quantizers(self) -> Iterator[tuple[str, ActQuantizer]]:
        """``(name within the unit, quantizer)`` for every activation quantizer, in forward order."""
        for name, module in self.body.named_modules():
            if isinstance(module, ActQuantizer):
                yield name, module

    def replace_act_quantizer(self, name: str, module: nn.Module) -> None:
        """Swap the activation quantizer ``name`` (as :meth:`act_quantizers` names it) for ``module``."""
        if not isinstance(getattr(self.body, name, None), ActQuantizer):
            raise ModelError(f"no activation quantizer {name} in this unit")
        self.body.set_submodule(name, module)

    def set_quant_state(self, weight: bool, act: bool) -> None:
        """Switch weight and activation quantization on or off for the whole unit."""
        for _, layer in self.quant_layers():
            layer.quantize_weight = weight
        for _, quantizer in self.act_quantizers():
            quantizer.enabled = act


def build_quant_unit(
    unit: Unit, weight_bits: int, act_bits: int, softmax: str = "uniform", symmetric: bool = False
) -> QuantUnit:
    """Quantize one FP unit (BN already folded); ``softmax``, ``symmetric``: see :class:`QuantUnit`."""
    return QuantUnit(unit, weight_bits, act_bits, softmax, symmetric)
