"""The quantized model: folded FP model -> units -> quantized units, plus range calibration and I/O.

Round-to-nearest (RTN) is this module's baseline: weight ranges from the per-channel Lp search, activation
ranges from the per-tensor Lp search on calibration activations, nearest rounding throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx
from torch import nn

from ptqflow.atomic import safe_load_failure
from ptqflow.errors import ConfigError, ModelError
from ptqflow.fold import fold_bn
from ptqflow.ops import OpKind, averages, classify_function, classify_method, classify_node
from ptqflow.quant.quantizer import ActQuantizer, Log2ActQuantizer, WeightQuantizer, check_bits
from ptqflow.quant.units import QuantLayer, QuantUnit, build_quant_unit
from ptqflow.units import FLOAT_LEAF_HINT, extract_units, reader_inputs

__all__ = [
    "FORMAT",
    "QuantConfig",
    "QuantModel",
    "build_quant_model",
    "calibrate_activations",
    "input_sources",
    "load_quant_file",
    "load_quant_model",
    "quant_payload",
    "set_weight_bits",
    "wire_input_grids",
]

FORMAT = {"format": "ptqflow-quantized-model", "version": 1}


@dataclass(frozen=True)
class QuantConfig:
    """Bit-widths and range search of a quantized model.

    Args:
        weight_bits: bits of every conv/linear weight not overridden below.
        act_bits: bits of every activation quantizer not overridden below.
        first_last_weight_bits: bits of the first conv and the last linear layer (BRECQ/QDrop keep them
            at 8); ``null`` uses ``weight_bits``.
        convention: where the 8-bit exceptions sit (algorithms.md section 1.3). ``brecq``: the stem's
            output activations are 8-bit and the stem is not reconstructed; ``qdrop``: the stem output is
            at ``act_bits`` and the stem is reconstructed, but the input of the head (the last block's
            output quantizer) is 8-bit.
        p: exponent of the Lp range search (2.4 as in BRECQ/QDrop).
        calib_size: calibration images used to initialise activation ranges.
        float_leaves: module paths kept as opaque float ops (their weights and inner activations are not
            quantized; :attr:`QuantModel.float_leaves` reports them). Empty: everything is quantized.
        softmax: grid of the quantizers on softmax outputs (attention probabilities): ``uniform`` (the
            affine grid of every other activation) or ``log2`` (powers of two,
            :class:`~ptqflow.quant.quantizer.Log2ActQuantizer`; no ONNX export).
        bias: ``int32``: the bias of every layer whose input lies on one activation grid is rounded to the
            grid of step ``s_in * s_w`` in the fake-quant forward (reconstruction, evaluation and export), as
            integer kernels store it (onnxruntime quantizes a QDQ conv's float bias that way, TensorRT and
            OpenVINO likewise), so the simulated model is the deployed one; ``float``: the float bias
            (ptqflow before the integer check; what files without this key were made with).
        scheme: ``asymmetric`` (unsigned activations and per-channel weights with zero points: onnxruntime,
            OpenVINO) or ``symmetric`` (signed integers, zero point 0 everywhere, per-channel weights and
            per-tensor activations: what TensorRT accepts; a ReLU output then uses the non-negative half
            of the signed grid, as in TensorRT).
    """

    weight_bits: int = 4
    act_bits: int = 4
    first_last_weight_bits: int | None = 8
    convention: Literal["brecq", "qdrop"] = "brecq"
    p: float = 2.4
    calib_size: int = 256
    float_leaves: tuple[str, ...] = ()
    softmax: Literal["uniform", "log2"] = "uniform"
    bias: Literal["int32", "float"] = "int32"
    scheme: Literal["asymmetric", "symmetric"] = "asymmetric"

    def __post_init__(self) -> None:
        object.__setattr__(self, "float_leaves", tuple(self.float_leaves))
        if self.scheme not in ("asymmetric", "symmetric"):
            raise ConfigError(f"scheme must be one of 'asymmetric', 'symmetric', got {self.scheme!r}")
        if self.bias not in ("int32", "float"):
            raise ConfigError(f"bias must be one of 'int32', 'float', got {self.bias!r}")
        if self.softmax not in ("uniform", "log2"):
            raise ConfigError(f"softmax must be one of 'uniform', 'log2', got {self.softmax!r}")
        if not all(isinstance(leaf, str) and leaf for leaf in self.float_leaves):
            raise ConfigError(f"float_leaves must be module paths, got {list(self.float_leaves)}")
        if self.convention not in ("brecq", "qdrop"):
            raise ConfigError(f"convention must be one of 'brecq', 'qdrop', got {self.convention!r}")
        for name in ("weight_bits", "act_bits", "first_last_weight_bits"):
            value = getattr(self, name)
            if value is not None:
                try:
                    check_bits(value, name)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        if not (isinstance(self.p, float | int) and 1.0 <= self.p <= 4.0):
            raise ConfigError(f"p must be in [1, 4], got {self.p}")
        if self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")


class QuantModel(nn.Module):
    """A chain of quantized units; ``forward`` runs them in order."""

    def __init__(self, names: list[str], units: list[QuantUnit]) -> None:
        super().__init__()
        self.names = list(names)
        self.units = nn.ModuleList(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x

    def named_units(self) -> Iterator[tuple[str, QuantUnit]]:
        """``(unit name, unit)`` in forward order."""
        for name, unit in zip(self.names, self.units, strict=True):
            assert isinstance(unit, QuantUnit)
            yield name, unit

    def quant_layers(self) -> Iterator[tuple[str, QuantLayer]]:
        """``(unit.layer name, layer)`` for every quantized conv/linear, in forward order."""
        for unit_name, unit in self.named_units():
            for name, layer in unit.quant_layers():
                yield f"{unit_name}.{name}", layer

    def act_quantizers(self) -> Iterator[tuple[str, ActQuantizer]]:
        """``(unit.quantizer name, quantizer)`` for every activation quantizer, in forward order."""
        for unit_name, unit in self.named_units():
            for name, quantizer in unit.act_quantizers():
                yield f"{unit_name}.{name}", quantizer

    def set_quant_state(self, weight: bool, act: bool) -> None:
        """Switch weight / activation quantization for every unit."""
        for _, unit in self.named_units():
            unit.set_quant_state(weight, act)

    @property
    def float_leaves(self) -> list[str]:
        """Module paths kept in float on request (what a report must say is not quantized)."""
        return [leaf for _, unit in self.named_units() for leaf in unit.float_leaves]

    def unquantized_inputs(self) -> list[str]:
        """Readers (conv/linear layers, activation matmuls) with an input that no quantizer produces.

        Walks each reader input back through pass-through ops (:mod:`ptqflow.ops`), across unit
        boundaries, to an activation quantizer; the image is allowed. Empty for every model
        :func:`build_quant_model` returns: it is the placement's own check that no activation stays float.
        """
        units = [unit for _, unit in self.named_units()]
        missing: list[str] = []
        for index, (unit_name, unit) in enumerate(self.named_units()):
            modules = dict(unit.body.named_modules())
            for node in unit.body.graph.nodes:
                kind = _reader_kind(node, modules)
                if kind is None:
                    continue
                for source in reader_inputs(node, kind):
                    if input_sources(units, index, source) is None:
                        missing.append(f"{unit_name}.{node.target if node.op == 'call_module' else node.name}")
        return missing

    def unit_kinds(self) -> list[str]:
        """``stem``, ``block``, ``head`` or ``glue`` per unit, in forward order."""
        return [unit.kind for _, unit in self.named_units()]

    def bit_config(self) -> dict[str, dict[str, int]]:
        """``{"weights": {layer: bits}, "activations": {quantizer: bits}}``."""
        return {
            "weights": {n: layer.weight_quantizer.bits for n, layer in self.quant_layers()},
            "activations": {n: q.bits for n, q in self.act_quantizers()},
        }

    def size_bytes(self) -> float:
        """Storage of the quantized weights: b bits per weight, fp32 biases and per-channel scale/zero."""
        bits = 0
        for _, layer in self.quant_layers():
            weight = layer.layer.weight
            bits += weight.numel() * layer.weight_quantizer.bits + 2 * 32 * weight.shape[0]
            if layer.layer.bias is not None:
                bits += 32 * layer.layer.bias.numel()
        return bits / 8


def _reader_kind(node: torch.fx.Node, modules: dict[str, nn.Module]) -> OpKind | None:
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), QuantLayer):
        return OpKind.WEIGHT
    if node.op == "call_function" and classify_function(node.target) == OpKind.MATMUL:
        return OpKind.MATMUL
    if node.op == "call_method" and classify_method(str(node.target)) == OpKind.MATMUL:
        return OpKind.MATMUL
    return None


def input_sources(
    units: Sequence[QuantUnit], index: int, node: torch.fx.Node
) -> tuple[list[ActQuantizer], bool] | None:
    """Where the value of ``node`` (in unit ``index``) comes from, through pass-through ops across units.

    Returns:
        ``(activation quantizers it reads, whether an averaging op lies on the way)``; no quantizers for the
        image or a constant; ``None`` if some path reaches a producer that is not a quantizer (a float input).
    """
    modules = dict(units[index].body.named_modules())
    if node.op == "placeholder":
        if index == 0:
            return [], False  # the image
        (output,) = [n for n in units[index - 1].body.graph.nodes if n.op == "output"]
        previous = output.args[0]
        return input_sources(units, index - 1, previous) if isinstance(previous, torch.fx.Node) else None
    if node.op == "get_attr":
        return [], False  # a constant, not an activation
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(module, ActQuantizer):
        return [module], False
    if classify_node(node, modules) != OpKind.PASS:
        return None
    first = node.args[0] if node.args else None
    found: list[ActQuantizer] = []
    averaged = averages(node.op, node.target, module)
    for arg in first if isinstance(first, list | tuple) else [first]:
        if isinstance(arg, torch.fx.Node):
            sources = input_sources(units, index, arg)
            if sources is None:
                return None
            found += sources[0]
            averaged = averaged or sources[1]
    return found, averaged


def build_quant_model(fp_model: nn.Module, config: QuantConfig, init_weights: bool = True) -> QuantModel:
    """Fold BN, split into units and wrap every unit with quantizers (weights initialised if asked).

    Args:
        fp_model: the FP model (unfolded; it is not modified).
        config: bit-widths and range search.
        init_weights: run the per-channel Lp search for every weight quantizer.
    """
    units = extract_units(fold_bn(fp_model), config.float_leaves)
    if not units:
        raise ModelError(f"model {type(fp_model).__name__} has no units")
    quant_units = []
    for unit in units:
        act_bits = config.act_bits
        if unit.kind == "stem" and config.convention == "brecq":
            act_bits = 8
        quant_units.append(
            build_quant_unit(unit, config.weight_bits, act_bits, config.softmax, config.scheme == "symmetric")
        )
    model = QuantModel([u.name for u in units], quant_units)
    missing = model.unquantized_inputs()
    if missing:
        raise ModelError(
            f"placement left the input of {missing[0]} in float ({len(missing)} readers); {FLOAT_LEAF_HINT}"
        )
    layers = [layer for _, layer in model.quant_layers()]
    if not layers:
        raise ModelError(f"model {type(fp_model).__name__} has no conv or linear layer to quantize")
    if config.first_last_weight_bits is not None:
        for layer in (layers[0], layers[-1]):
            layer.weight_quantizer = WeightQuantizer(
                config.first_last_weight_bits, layer.layer.weight.shape[0], config.scheme == "symmetric"
            )
    if config.convention == "qdrop" and len(quant_units) > 1 and quant_units[-1].kind == "head":
        before_head = [q for _, q in quant_units[-2].act_quantizers()]
        if before_head:
            before_head[-1].bits = 8  # the head's input (QDrop's "last layer input at 8 bits")
    if init_weights:
        for layer in layers:
            layer.weight_quantizer.init_range(layer.layer.weight, config.p)
    wire_input_grids(model)
    for layer in layers:
        layer.bias_grid = config.bias == "int32"
    return model.eval()


def wire_input_grids(model: QuantModel) -> None:
    """Tell every quantized layer which activation quantizer's grid its input lies on.

    The input is walked back through pass-through ops (reshapes, max pooling, ...; :func:`input_sources`)
    to its producers; a layer reading exactly one quantizer with no averaging on the way reads that
    quantizer's integers (an integer kernel's input), anything else (the image, an average of quantized
    values, a concatenation of several grids, a log2 grid) is a float input.
    """
    units = [unit for _, unit in model.named_units()]
    for index, unit in enumerate(units):
        modules = dict(unit.body.named_modules())
        for node in unit.body.graph.nodes:
            layer = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(layer, QuantLayer):
                continue
            first = node.args[0] if node.args else None
            sources = input_sources(units, index, first) if isinstance(first, torch.fx.Node) else None
            grid = None
            if sources is not None and not sources[1] and len({id(q) for q in sources[0]}) == 1:
                grid = None if isinstance(sources[0][0], Log2ActQuantizer) else sources[0][0]  # log2: no integers
            layer.set_input_grid(grid)


@torch.no_grad()
def calibrate_activations(
    model: QuantModel, unit_inputs: Callable[[int], Iterator[torch.Tensor]], p: float, device: torch.device
) -> None:
    """Initialise every activation range, unit by unit, from that unit's FP input activations.

    Weights are quantized while observing, so each range sees the activations the quantized layers
    produce from FP inputs (BRECQ initialises act quantizers after weight rounding, section 3).

    Args:
        model: the quantized model.
        unit_inputs: ``unit_inputs(i)`` yields batches of unit ``i``'s FP input (from the feature store).
        p: exponent of the Lp search.
        device: where to run the units.
    """
    model.set_quant_state(weight=True, act=False)
    for index, (_, unit) in enumerate(model.named_units()):
        quantizers = [q for _, q in unit.act_quantizers()]
        if not quantizers:
            continue
        for q in quantizers:
            q.observing = True
        for batch in unit_inputs(index):
            unit(batch.to(device))
        for q in quantizers:
            q.init_range(p)
    model.set_quant_state(weight=True, act=True)


def set_weight_bits(model: QuantModel, bits: dict[str, int], p: float) -> None:
    """Give the named layers new weight bit-widths (mixed precision), searching their ranges again.

    Args:
        model: a quantized model whose weights are still the FP weights (RTN, not reconstructed).
        bits: layer name (as :meth:`QuantModel.quant_layers` names it) -> bits; every layer must be listed.
        p: exponent of the Lp range search.

    Raises:
        ModelError: the table does not list exactly the model's layers.
    """
    layers = dict(model.quant_layers())
    if set(bits) != set(layers):
        missing, extra = sorted(set(layers) - set(bits)), sorted(set(bits) - set(layers))
        raise ModelError(f"bit table does not fit the model: missing {missing[:3]}, unknown {extra[:3]}")
    for name, layer in layers.items():
        b = check_bits(int(bits[name]), name)
        if b != layer.weight_quantizer.bits:
            weight = layer.layer.weight
            quantizer = WeightQuantizer(b, weight.shape[0], layer.weight_quantizer.symmetric).to(weight.device)
            quantizer.init_range(weight, p)
            layer.weight_quantizer = quantizer


def quant_payload(model: QuantModel, model_name: str, config: QuantConfig) -> dict[str, Any]:
    """A ``weights_only``-loadable dict: format tag, recipe and state_dict (CPU, contiguous)."""
    return {
        **FORMAT,
        "model": model_name,
        "config": asdict(config),
        "bits": model.bit_config(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }


def load_quant_model(
    payload: dict[str, Any], build_fp: Callable[[str], nn.Module], source: str
) -> tuple[QuantModel, str, QuantConfig]:
    """Rebuild a quantized model from :func:`quant_payload`'s output.

    Args:
        payload: the loaded dict.
        build_fp: ``build_fp(model_name)`` returns a fresh FP model of that architecture.
        source: the file it came from, for messages.

    Raises:
        ModelError: another format or version, or a state that does not fit the architecture.
    """
    if not isinstance(payload, dict) or payload.get("format") != FORMAT["format"]:
        raise ModelError(f"{source} is not a ptqflow quantized model")
    if payload.get("version") != FORMAT["version"]:
        raise ModelError(
            f"{source} has format version {payload.get('version')}; this ptqflow reads {FORMAT['version']}"
        )
    # files written before the int32 bias grid carry no "bias" key: they were made (and report) with float biases
    stored = {"bias": "float", **payload["config"]}
    config = QuantConfig(**{**stored, "float_leaves": tuple(stored.get("float_leaves", ()))})
    model = build_quant_model(build_fp(payload["model"]), config, init_weights=False)
    state = payload["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{source} does not fit model {payload['model']}: {str(exc).splitlines()[0]}") from None
    bits = payload.get("bits")
    if bits is not None:
        _apply_bits(model, bits)
    return model.eval(), str(payload["model"]), config


def _apply_bits(model: QuantModel, bits: dict[str, dict[str, int]]) -> None:
    """Per-layer bit-widths (mixed precision) are not tensors: set them from the payload's table."""
    layers = dict(model.quant_layers())
    quantizers = dict(model.act_quantizers())
    try:
        for name, b in bits["weights"].items():
            layers[name].weight_quantizer.bits = check_bits(int(b), name)
        for name, b in bits["activations"].items():
            quantizers[name].bits = check_bits(int(b), name)
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"bit table does not fit the model: {exc}") from None


def load_quant_file(path: Path, build_fp: Callable[[str], nn.Module]) -> tuple[QuantModel, str, QuantConfig]:
    """:func:`load_quant_model` from a file, read with ``weights_only=True`` (never unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"quantized model not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle payload, truncated file
        raise ModelError(
            f"{path} cannot be loaded safely (weights_only=True): {safe_load_failure(path, exc)}"
        ) from None
    return load_quant_model(payload, build_fp, str(path))
