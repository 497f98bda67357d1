"""Model zoo: the embedded Fashion-MNIST nets and torchvision classifiers loaded from local files.

* ``resnet20``: the CIFAR-style ResNet of He et al., "Deep Residual Learning for Image Recognition"
  (CVPR 2016, section 4.2): a 3x3 stem, three stages of three BasicBlocks (16/32/64 channels),
  global pooling and one linear layer. Its :class:`BasicBlock` computes what torchvision's does, op for op
  and with the same attribute names (so state_dicts and traced graphs match), without importing torchvision:
  a stage process building ResNet-20 skips torchvision's import (3.5 s on a 2-core AMD EPYC, a third of the
  tiny pipeline's per-stage start). Shortcuts that change shape use a 1x1 convolution + BN (the paper's
  option B).
* ``mobilenetv2_s``: torchvision's ``MobileNetV2`` (Sandler et al., CVPR 2018) with a narrow
  inverted-residual table for 28x28 inputs and a 1-channel, stride-1 stem.
* ``mobilenetv3_s``: torchvision's ``MobileNetV3`` (Howard et al., "Searching for MobileNetV3", ICCV
  2019) narrowed the same way: Hardswish, squeeze-excitation with Hardsigmoid gates -- blocks no
  per-class code ever covered, quantized by the graph rules alone.
* ``vit_s``: torchvision's ``VisionTransformer`` (Dosovitskiy et al., "An Image is Worth 16x16 Words",
  ICLR 2021) for 28x28: 4x4 patches (49 tokens + the class token), width 96, 4 encoder layers of 4 heads,
  MLP 192, a 1-channel patch embedding (0.31 M parameters) -- attention quantized through
  :mod:`ptqflow.attention`.
* any classifier in ``torchvision.models`` by name (``torchvision.resnet18``), weights read from a local
  file -- never downloaded. ``torchvision.regnet_x_600mf`` (in the BRECQ/QDrop tables, not shipped by
  torchvision) is built from torchvision's ``RegNet`` class with the RegNetX-600MF design parameters of
  Radosavovic et al., "Designing Network Design Spaces" (CVPR 2020): depth 16, w0 48, wa 36.97, wm 2.24,
  group width 24 (stage widths 48/96/240/528, depths 1/3/5/7, 6.2 M parameters).
* a user's own model from an entry point ``package.module:factory``: ``factory()`` is called without
  arguments and must return an ``nn.Module``; the package must be importable (installed, or on
  ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ptqflow.atomic import safe_load_failure
from ptqflow.errors import ModelError

__all__ = [
    "EMBEDDED_MODELS",
    "BasicBlock",
    "ResNetCifar",
    "TORCHVISION_EXTRA_MODELS",
    "build_model",
    "load_state_dict_file",
    "load_weights",
    "mobilenetv2_s",
    "mobilenetv3_s",
    "register_model",
    "regnet_x_600mf",
    "resnet20",
    "vit_s",
    "weights_hint",
]

ModelFactory = Callable[[int, int], nn.Module]
#: name -> factory(in_channels, num_classes) for models defined here.
EMBEDDED_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory ``f(in_channels, num_classes) -> nn.Module`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        EMBEDDED_MODELS[name] = factory
        return factory

    return decorator


class BasicBlock(nn.Module):
    """The two-3x3-convolution residual block of He et al. 2016 (Fig. 2, left): conv-BN-ReLU, conv-BN, the
    shortcut added in place, ReLU; one ReLU module used twice, as torchvision's ``BasicBlock`` (whose
    checkpoints and traced graphs this block reproduces, node for node)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else None
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        y += shortcut
        return self.relu(y)


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) with 6n+2 layers."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"ResNetCifar depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        self.layer1 = self._stage(width, blocks_per_stage, stride=1)
        self.layer2 = self._stage(2 * width, blocks_per_stage, stride=2)
        self.layer3 = self._stage(4 * width, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            # Zero-init the last BN of each residual branch (Goyal et al. 2017): blocks start as identity.
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet20")
def resnet20(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """ResNet-20 for 28x28 or 32x32 inputs (0.27 M parameters)."""
    return ResNetCifar(20, in_channels, num_classes)


#: (expansion t, channels c, repeats n, first stride s) as in Sandler et al. 2018, Table 2, narrowed.
_MBV2_S_SETTING = [[1, 16, 1, 1], [4, 24, 2, 2], [4, 32, 3, 2], [4, 64, 2, 1], [4, 96, 1, 1]]
_MBV2_S_LAST = 384


@register_model("mobilenetv2_s")
def mobilenetv2_s(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small MobileNetV2 for 28x28 inputs: stride-1 stem, 28 -> 14 -> 7, 9 inverted residuals."""
    from torchvision.models.mobilenetv2 import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    model = MobileNetV2(num_classes=num_classes, inverted_residual_setting=_MBV2_S_SETTING)
    stem_out = model.features[1].conv[0][0].in_channels
    last_in = model.features[-1][0].in_channels
    model.features[0] = Conv2dNormActivation(
        in_channels, stem_out, kernel_size=3, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    model.features[-1] = Conv2dNormActivation(
        last_in, _MBV2_S_LAST, kernel_size=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    model.classifier[-1] = nn.Linear(_MBV2_S_LAST, num_classes)
    for m in (model.features[0][0], model.features[-1][0]):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
    nn.init.normal_(model.classifier[-1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[-1].bias)
    return model


#: MobileNetV3 blocks for 28x28 (Howard et al., ICCV 2019, Table 2 narrowed): (kernel, expanded, out,
#: squeeze-excitation, activation, stride); 28 -> 14 -> 7, Hardswish and SE in the second half.
_MBV3_S_SETTING = [
    (3, 16, 16, True, "RE", 2),
    (3, 64, 24, False, "RE", 1),
    (3, 72, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 160, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
]
_MBV3_S_LAST = 256


@register_model("mobilenetv3_s")
def mobilenetv3_s(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small MobileNetV3 for 28x28 inputs (torchvision's class): a stride-1 Hardswish stem, seven inverted
    residuals (ReLU, then Hardswish; squeeze-excitation with a Hardsigmoid gate in four), 0.2 M parameters."""
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
    from torchvision.ops.misc import Conv2dNormActivation

    settings = []
    channels = 16
    for kernel, expanded, out, se, act, stride in _MBV3_S_SETTING:
        settings.append(InvertedResidualConfig(channels, kernel, expanded, out, se, act, stride, 1, 1.0))
        channels = out
    model = MobileNetV3(settings, last_channel=_MBV3_S_LAST, num_classes=num_classes)
    model.features[0] = Conv2dNormActivation(
        in_channels, 16, kernel_size=3, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.Hardswish
    )
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


@register_model("vit_s")
def vit_s(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small ViT for 28x28 inputs (torchvision's class; module docstring): 4x4 patches, 4 layers, width 96."""
    from torchvision.models.vision_transformer import VisionTransformer

    hidden = 96
    model = VisionTransformer(
        image_size=28, patch_size=4, num_layers=4, num_heads=4, hidden_dim=hidden, mlp_dim=2 * hidden,
        num_classes=num_classes,
    )  # fmt: skip
    model.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=4, stride=4)
    fan_in = in_channels * 4 * 4
    nn.init.trunc_normal_(model.conv_proj.weight, std=(1.0 / fan_in) ** 0.5)  # as torchvision's own init
    nn.init.zeros_(model.conv_proj.bias)
    return model


def regnet_x_600mf(num_classes: int = 1000) -> nn.Module:
    """RegNetX-600MF (Radosavovic et al. 2020) from torchvision's ``RegNet`` class (see the module docstring)."""
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
    return RegNet(params, num_classes=num_classes)


#: torchvision-architecture models torchvision has no builder for: name -> factory(num_classes).
TORCHVISION_EXTRA_MODELS: dict[str, Callable[[int], nn.Module]] = {"regnet_x_600mf": regnet_x_600mf}


def build_model(name: str, in_channels: int = 1, num_classes: int | None = None) -> nn.Module:
    """Build a model by name, randomly initialised.

    Args:
        name: an embedded model (``resnet20``), ``torchvision.<name>`` or an entry point
            ``package.module:factory``.
        in_channels: input channels of an embedded model.
        num_classes: classes of an embedded (default 10) or torchvision (default 1000, ImageNet) model;
            an entry point's factory takes no arguments and decides itself.

    Raises:
        ModelError: an unknown name, or an entry point that cannot be imported or does not build a module.
    """
    if ":" in name:
        return _from_entry_point(name)
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name](in_channels, 10 if num_classes is None else num_classes)
    short = name.removeprefix("torchvision.")
    classes = 1000 if num_classes is None else num_classes
    if name.startswith("torchvision.") and short in TORCHVISION_EXTRA_MODELS:
        return TORCHVISION_EXTRA_MODELS[short](classes)
    import torchvision  # only here and in the builders above: the embedded ResNet-20 does not need it

    known = sorted(torchvision.models.list_models(module=torchvision.models))
    if name.startswith("torchvision.") and short in known:
        return torchvision.models.get_model(short, weights=None, num_classes=classes)
    raise ModelError(
        f"unknown model {name!r}; allowed: {sorted(EMBEDDED_MODELS)}, 'torchvision.<name>' with <name> "
        f"one of torchvision's classifiers or {sorted(TORCHVISION_EXTRA_MODELS)} (e.g. torchvision.resnet18), "
        "or an entry point 'package.module:factory'"
    )


def _from_entry_point(spec: str) -> nn.Module:
    """``package.module:factory`` -> ``factory()``, checked to be an ``nn.Module``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ModelError(f"model entry point {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ModelError(
            f"model entry point {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            "install the package or put its folder on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"model entry point {spec!r}: module {module_name!r} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:  # a user factory may raise anything
        raise ModelError(f"model entry point {spec!r}: {attr}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model entry point {spec!r}: {attr}() returned {type(model).__name__}, not an nn.Module")
    return model


def weights_hint(name: str) -> str:
    """Where to get the FP weights of model ``name`` (used when the weights file is missing)."""
    short = name.removeprefix("torchvision.")
    if name.startswith("torchvision.") and short in TORCHVISION_EXTRA_MODELS:
        return f"convert a pycls {short} checkpoint to torchvision RegNet state_dict keys (torchvision ships none)"
    if name.startswith("torchvision."):
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(short)
        except ValueError:
            return "write its state_dict with torch.save"
        entry = getattr(weights, "IMAGENET1K_V1", None) or weights.DEFAULT
        return f"download {entry.url} (torchvision {type(entry).__name__}.{entry.name}; ptqflow never downloads)"
    return "write its state_dict with torch.save"


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict saved with ``torch.save``, never unpickling code (``weights_only=True``).

    Accepts a plain state_dict or a checkpoint dict with a ``state_dict``/``model`` entry.

    Raises:
        ModelError: missing file, a payload that needs unpickling, or not a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}; put a state_dict saved with torch.save there")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ModelError(
            f"weights file {path} cannot be loaded safely (weights_only=True): {safe_load_failure(path, exc)}"
        ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} does not hold a state_dict (a mapping of names to tensors)")
    state = OrderedDict((str(k).removeprefix("module."), v) for k, v in obj.items())
    metadata = getattr(obj, "_metadata", None)
    if isinstance(metadata, dict):
        # Per-module format versions (torch.save keeps them; MNASNet refuses to load without its own).
        state._metadata = OrderedDict((str(k).removeprefix("module."), v) for k, v in metadata.items())  # type: ignore[attr-defined]
    return state


def load_weights(model: nn.Module, path: Path, model_name: str | None = None) -> nn.Module:
    """Load a weights file into ``model`` strictly (every key, every shape).

    Args:
        model: the freshly built model.
        path: the state_dict file.
        model_name: the name ``model`` was built from; a missing file's error then says where to get it.

    Raises:
        ModelError: the file is missing or unusable, or belongs to another architecture.
    """
    if model_name is not None and not Path(path).is_file():
        raise ModelError(
            f"weights file not found: {path}; for {model_name}, {weights_hint(model_name)} and save it as {path}"
        )
    state = load_state_dict_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(
                f"{len(wrong_shape)} of another shape (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(expected[k].shape)})"
            )
        raise ModelError(f"weights file {path} does not match the model architecture: {'; '.join(parts)}")
    if getattr(state, "_metadata", None) is None:
        # Keys and shapes match this architecture exactly, so the file is in its current format.
        state = OrderedDict(state)
        state._metadata = getattr(expected, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"weights file {path} does not load into {type(model).__name__}: {first}") from None
    return model
