"""Quantized reconstruction units: one registered class per block type, one generic class for the rest.

Activation-quantizer placement follows BRECQ/QDrop (algorithms.md section 1.2): a layer's output is
quantized after its fused ReLU/ReLU6; inside a residual block the last conv and the shortcut conv are
not output-quantized; the block output is quantized once, after add+ReLU (ResNet) or after the add
(inverted residuals, which have no final activation). Each block's forward is written out here, so a
torchvision block that reuses one ``ReLU`` module twice still gets one quantizer per use, and no
in-place activation of the FP block can overwrite a tensor the quantized forward still needs.

Registered blocks: ResNet ``BasicBlock``/``Bottleneck`` (He et al., CVPR 2016), MobileNetV2
``InvertedResidual`` (Sandler et al., CVPR 2018), RegNet ``ResBottleneckBlock`` (Radosavovic et al.,
CVPR 2020; RegNetX, i.e. without squeeze-excitation) and MNasNet ``_InvertedResidual`` (Tan et al.,
CVPR 2019). BRECQ's code leaves the last one unmapped (algorithms.md section 8.7); QDrop maps it, and so
do we.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torchvision.models.mnasnet import _InvertedResidual as MnasInvertedResidual
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

from ptqflow.errors import ModelError
from ptqflow.quant.adaround import AdaRound
from ptqflow.quant.quantizer import ActQuantizer, WeightQuantizer

__all__ = [
    "QuantBasicBlock",
    "QuantBottleneck",
    "QuantInvertedResidual",
    "QuantLayer",
    "QuantMnasInvertedResidual",
    "QuantResBottleneck",
    "QuantSegment",
    "QuantUnit",
    "build_quant_unit",
    "register_quant_unit",
    "registered_block_types",
]


class QuantLayer(nn.Module):
    """A folded conv or linear layer whose weight passes through a :class:`WeightQuantizer`."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, weight_bits: int) -> None:
        super().__init__()
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise ModelError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.weight_quantizer = WeightQuantizer(weight_bits, layer.weight.shape[0])
        self.quantize_weight = True
        self.adaround: AdaRound | None = None

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it (fake-quantized when ``quantize_weight``)."""
        w = self.layer.weight
        if not self.quantize_weight:
            return w
        if self.adaround is not None:
            return self.adaround()
        return self.weight_quantizer(w)

    def start_adaround(self) -> AdaRound:
        """Attach learned rounding on the weight quantizer's (frozen) grid; return it."""
        q = self.weight_quantizer
        self.adaround = AdaRound(self.layer.weight, q.scale, q.zero_point, q.bits)
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
        self.adaround = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


class QuantUnit(nn.Module):
    """Base class of a reconstruction unit: quantized layers plus activation quantizers."""

    kind: str = "block"

    def quant_layers(self) -> Iterator[tuple[str, QuantLayer]]:
        """``(name within the unit, layer)`` for every quantized conv/linear, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, QuantLayer):
                yield name, module

    def act_quantizers(self) -> Iterator[tuple[str, ActQuantizer]]:
        """``(name within the unit, quantizer)`` for every activation quantizer."""
        for name, module in self.named_modules():
            if isinstance(module, ActQuantizer):
                yield name, module

    def set_quant_state(self, weight: bool, act: bool) -> None:
        """Switch weight and activation quantization on or off for the whole unit."""
        for _, layer in self.quant_layers():
            layer.quantize_weight = weight
        for _, quantizer in self.act_quantizers():
            quantizer.enabled = act


_Factory = Callable[[nn.Module, int, int], QuantUnit]
_REGISTRY: dict[type[nn.Module], _Factory] = {}


def register_quant_unit(*block_types: type[nn.Module]) -> Callable[[_Factory], _Factory]:
    """Class decorator: ``cls(block, weight_bits, act_bits)`` quantizes blocks of ``block_types``."""

    def decorator(factory: _Factory) -> _Factory:
        for block_type in block_types:
            _REGISTRY[block_type] = factory
        return factory

    return decorator


def registered_block_types() -> tuple[type[nn.Module], ...]:
    """Block types that form one reconstruction unit each."""
    return tuple(_REGISTRY)


def build_quant_unit(module: nn.Module, kind: str, weight_bits: int, act_bits: int) -> QuantUnit:
    """Quantize one FP unit (BN already folded): a registered block or an fx segment."""
    if kind == "block":
        factory = _REGISTRY.get(type(module))
        if factory is None:
            allowed = ", ".join(t.__name__ for t in _REGISTRY)
            raise ModelError(f"no quantized unit is registered for {type(module).__name__}; registered: {allowed}")
        return factory(module, weight_bits, act_bits)
    if not isinstance(module, torch.fx.GraphModule):
        raise ModelError(f"a {kind} unit must be an fx GraphModule, got {type(module).__name__}")
    return QuantSegment(module, kind, weight_bits, act_bits)


def _conv_of(module: nn.Module | None) -> nn.Conv2d | None:
    """The conv inside a (folded) ``Sequential(conv, Identity)`` shortcut, or ``None``."""
    if module is None:
        return None
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    others = [m for m in module.children() if not isinstance(m, nn.Conv2d | nn.Identity)]
    if len(convs) != 1 or others:
        raise ModelError(f"unsupported shortcut {module}: expected one conv (+ folded BN)")
    return convs[0]


@register_quant_unit(BasicBlock)
class QuantBasicBlock(QuantUnit):
    """ResNet BasicBlock: conv1+ReLU (quantized), conv2, shortcut conv, add, ReLU, output quantized."""

    def __init__(self, block: nn.Module, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        assert isinstance(block, BasicBlock)
        self.conv1 = QuantLayer(block.conv1, weight_bits)
        self.act1 = ActQuantizer(act_bits)
        self.conv2 = QuantLayer(block.conv2, weight_bits)
        shortcut = _conv_of(block.downsample)
        self.downsample = QuantLayer(shortcut, weight_bits) if shortcut is not None else None
        self.act_out = ActQuantizer(act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        h = self.act1(F.relu(self.conv1(x)))
        return self.act_out(F.relu(self.conv2(h) + identity))


@register_quant_unit(Bottleneck)
class QuantBottleneck(QuantUnit):
    """ResNet Bottleneck: two conv+ReLU (quantized), conv3, shortcut conv, add, ReLU, output quantized."""

    def __init__(self, block: nn.Module, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        assert isinstance(block, Bottleneck)
        self.conv1 = QuantLayer(block.conv1, weight_bits)
        self.act1 = ActQuantizer(act_bits)
        self.conv2 = QuantLayer(block.conv2, weight_bits)
        self.act2 = ActQuantizer(act_bits)
        self.conv3 = QuantLayer(block.conv3, weight_bits)
        shortcut = _conv_of(block.downsample)
        self.downsample = QuantLayer(shortcut, weight_bits) if shortcut is not None else None
        self.act_out = ActQuantizer(act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        h = self.act1(F.relu(self.conv1(x)))
        h = self.act2(F.relu(self.conv2(h)))
        return self.act_out(F.relu(self.conv3(h) + identity))


_ACTIVATIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: F.relu,
    nn.ReLU6: F.relu6,
}


@register_quant_unit(InvertedResidual)
class QuantInvertedResidual(QuantUnit):
    """MobileNetV2 inverted residual: expand/depthwise conv+ReLU6 (each quantized), linear projection,
    optional residual add; the block output is quantized once (after the add when there is one)."""

    def __init__(self, block: nn.Module, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        assert isinstance(block, InvertedResidual)
        self.use_res_connect = bool(block.use_res_connect)
        self.layers = nn.ModuleList()
        self.acts = nn.ModuleList()
        self._act_fns: list[Callable[[torch.Tensor], torch.Tensor] | None] = []
        for child in block.conv:
            if isinstance(child, Conv2dNormActivation):
                conv, act = child[0], child[-1]
                if type(act) not in _ACTIVATIONS:
                    raise ModelError(f"unsupported activation {type(act).__name__} in {type(block).__name__}")
                self.layers.append(QuantLayer(conv, weight_bits))
                self.acts.append(ActQuantizer(act_bits))
                self._act_fns.append(_ACTIVATIONS[type(act)])
            elif isinstance(child, nn.Conv2d):
                self.layers.append(QuantLayer(child, weight_bits))
                self.acts.append(nn.Identity())
                self._act_fns.append(None)
            elif not isinstance(child, nn.Identity):
                raise ModelError(f"unsupported layer {type(child).__name__} in an unfolded InvertedResidual")
        self.act_out = ActQuantizer(act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer, quantizer, fn in zip(self.layers, self.acts, self._act_fns, strict=True):
            h = layer(h)
            if fn is not None:
                h = quantizer(fn(h))
        return self.act_out(x + h if self.use_res_connect else h)


def _conv_act_sequence(seq: nn.Module, owner: str) -> list[tuple[nn.Conv2d, type[nn.Module] | None]]:
    """``(conv, activation type or None)`` per conv of a folded conv/BN/activation sequence, in order.

    Folded BNs are ``nn.Identity`` and skipped; an activation attaches to the conv before it.

    Raises:
        ModelError: an unfolded BN, an unsupported activation or layer, or an activation with no conv.
    """
    found: list[tuple[nn.Conv2d, type[nn.Module] | None]] = []
    for child in _flat_children(seq):
        if isinstance(child, nn.Conv2d):
            found.append((child, None))
        elif type(child) in _ACTIVATIONS:
            if not found or found[-1][1] is not None:
                raise ModelError(f"{owner}: activation {type(child).__name__} does not follow a conv")
            found[-1] = (found[-1][0], type(child))
        elif not isinstance(child, nn.Identity):
            raise ModelError(
                f"unsupported layer {type(child).__name__} in {owner} (BN must be folded first; activations: "
                f"{', '.join(t.__name__ for t in _ACTIVATIONS)})"
            )
    return found


def _flat_children(module: nn.Module) -> Iterator[nn.Module]:
    """Leaves of nested ``Sequential`` containers (e.g. ``Conv2dNormActivation``), in order."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _flat_children(child)
        else:
            yield child


class _ConvChain(QuantUnit):
    """Shared body of blocks that are a chain of convs (each optionally followed by a quantized ReLU/ReLU6)."""

    def _build_chain(
        self, convs: list[tuple[nn.Conv2d, type[nn.Module] | None]], weight_bits: int, act_bits: int
    ) -> None:
        self.layers = nn.ModuleList()
        self.acts = nn.ModuleList()
        self._act_fns: list[Callable[[torch.Tensor], torch.Tensor] | None] = []
        for conv, act in convs:
            self.layers.append(QuantLayer(conv, weight_bits))
            self.acts.append(ActQuantizer(act_bits) if act is not None else nn.Identity())
            self._act_fns.append(_ACTIVATIONS[act] if act is not None else None)

    def _chain(self, x: torch.Tensor) -> torch.Tensor:
        for layer, quantizer, fn in zip(self.layers, self.acts, self._act_fns, strict=True):
            x = layer(x)
            if fn is not None:
                x = quantizer(fn(x))
        return x


@register_quant_unit(ResBottleneckBlock)
class QuantResBottleneck(_ConvChain):
    """RegNetX ``ResBottleneckBlock``: ``a`` (1x1) and ``b`` (3x3, grouped) conv+ReLU, each output
    quantized; ``c`` (1x1, linear); the ``proj`` shortcut conv when the shape changes; add, ReLU, output
    quantized once (BRECQ/QDrop place RegNetX's block quantizer after add+ReLU, algorithms.md 1.2)."""

    def __init__(self, block: nn.Module, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        assert isinstance(block, ResBottleneckBlock)
        names = list(block.f._modules)
        if names != ["a", "b", "c"]:
            raise ModelError(
                f"ResBottleneckBlock with parts {names} is not supported (RegNetX only: a, b, c; RegNetY's "
                "squeeze-excitation 'se' is not)"
            )
        convs = _conv_act_sequence(block.f, "ResBottleneckBlock.f")
        if [a is not None for _, a in convs] != [True, True, False]:
            raise ModelError("ResBottleneckBlock.f must be conv+act, conv+act, conv (a, b, c)")
        if type(block.activation) not in _ACTIVATIONS:
            raise ModelError(f"unsupported activation {type(block.activation).__name__} in ResBottleneckBlock")
        self._build_chain(convs, weight_bits, act_bits)
        self._out_fn = _ACTIVATIONS[type(block.activation)]
        shortcut = _conv_of(block.proj)
        self.proj = QuantLayer(shortcut, weight_bits) if shortcut is not None else None
        self.act_out = ActQuantizer(act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.proj(x) if self.proj is not None else x
        return self.act_out(self._out_fn(identity + self._chain(x)))


@register_quant_unit(MnasInvertedResidual)
class QuantMnasInvertedResidual(_ConvChain):
    """MNasNet ``_InvertedResidual``: pointwise and depthwise conv+ReLU (each output quantized), linear
    pointwise conv, residual add when the shape allows; the block output is quantized once, after the add
    or after the last conv when there is no residual (QDrop's mapping; BRECQ leaves it layer-wise)."""

    def __init__(self, block: nn.Module, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        assert isinstance(block, MnasInvertedResidual)
        self.apply_residual = bool(block.apply_residual)
        convs = _conv_act_sequence(block.layers, "MNasNet _InvertedResidual")
        if not convs or convs[-1][1] is not None:
            raise ModelError("MNasNet _InvertedResidual must end in a linear (activation-free) conv")
        self._build_chain(convs, weight_bits, act_bits)
        self.act_out = ActQuantizer(act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._chain(x)
        return self.act_out(h + x if self.apply_residual else h)


_ACT_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.nn.functional.hardtanh}


#: Modules that keep an already quantized tensor on its grid (max-pooling picks grid values).
_GRID_PRESERVING = (nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Flatten)


class QuantSegment(QuantUnit):
    """A stem, head or glue segment (an fx GraphModule): every conv/linear quantized, an activation
    quantizer after every ReLU/ReLU6 use (so a stem ending in ReLU has its output quantized; logits,
    which come from a linear layer, never are). A stem or glue segment whose output is not already a
    quantized activation (MNasNet's stem ends in a linear 1x1 conv) gets one more quantizer, ``act_out``,
    on its output, as BRECQ/QDrop quantize every layer output outside a block."""

    def __init__(self, segment: torch.fx.GraphModule, kind: str, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        self.kind = kind
        gm = copy.deepcopy(segment)
        modules = dict(gm.named_modules())
        count = 0
        for node in list(gm.graph.nodes):
            module = modules.get(node.target) if node.op == "call_module" else None
            if isinstance(module, nn.Conv2d | nn.Linear):
                gm.set_submodule(str(node.target), QuantLayer(module, weight_bits))
            is_act = (module is not None and type(module) in _ACTIVATIONS) or (
                node.op == "call_function" and node.target in _ACT_FUNCTIONS
            )
            if is_act:
                name = f"act{count}"
                count += 1
                gm.add_submodule(name, ActQuantizer(act_bits))
                with gm.graph.inserting_after(node):
                    quantized = gm.graph.call_module(name, (node,))
                node.replace_all_uses_with(quantized, delete_user_cb=lambda user, q=quantized: user is not q)
        if kind != "head" and _ends_in_unquantized_conv(gm):
            gm.add_submodule("act_out", ActQuantizer(act_bits))
            (output,) = [n for n in gm.graph.nodes if n.op == "output"]
            (result,) = output.all_input_nodes
            with gm.graph.inserting_before(output):
                quantized = gm.graph.call_module("act_out", (result,))
            output.replace_input_with(result, quantized)
        gm.recompile()
        self.segment = gm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segment(x)


def _ends_in_unquantized_conv(gm: torch.fx.GraphModule) -> bool:
    """Whether the segment's output is a conv's, reached through grid-preserving modules only.

    An output that is already a quantizer's, a linear layer's (logits) or anything else's is left alone.
    """
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    node = output.all_input_nodes[0] if len(output.all_input_nodes) == 1 else None
    while node is not None and node.op == "call_module" and len(node.all_input_nodes) == 1:
        module = gm.get_submodule(str(node.target))
        if isinstance(module, QuantLayer):
            return isinstance(module.layer, nn.Conv2d)
        if not isinstance(module, _GRID_PRESERVING):
            return False
        node = node.all_input_nodes[0]
    return False
