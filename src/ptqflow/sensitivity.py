"""Unit sensitivity to weight bit-widths (BRECQ) and module capacity (MRECG).

**BRECQ mixed precision** (Li et al., ICLR 2021, section 3.4): the loss of a bit configuration ``c`` is
approximated by a sum over reconstruction units of each unit's Fisher-weighted output error,
``L(c) = sum_u E[dz_u^T diag(g_u^2) dz_u]`` (eq. 10 with the diagonal Fisher of eq. 11), where
``dz_u`` is the change of unit ``u``'s output when its weights are quantized with the bits ``c`` assigns
to *its* layers, and ``g_u = dL/dz_u`` is the cached FP gradient. Measuring each unit for every joint
assignment of bits to its layers keeps the in-unit cross-layer interaction; units are assumed additive.

Metric ``kl`` replaces the unit-output proxy with the quantity it stands in for: the divergence
``KL(p_fp || p_q)`` of the network's *output* when only this unit's weights are quantized and the rest
of the network runs in FP (label-free, as the KL that BRECQ's code back-propagates to get its Fisher
weights). It costs one forward pass of the rest of the network per assignment, but it sees what a
unit's error does downstream; the label-based empirical Fisher of a well-trained model is near zero on
most calibration images, so its ranking across depth can be noisy.

Enumeration cost is ``C^L`` per unit (C candidate bit-widths, L searchable layers). Above
``max_assignments`` it is pruned, in two tiers:

* ``lowest_subsets`` -- the paper's pruning: losses at the higher candidates are negligible next to the
  lowest one, so only *which layers take the lowest bits* is enumerated (``2^L``), every other layer at
  the second-lowest candidate. An assignment is scored by its lowest-bit pattern, so the higher
  candidates share the second-lowest loss.
* ``additive`` -- when even ``2^L`` is too many: one measurement with every layer at the highest
  candidate plus one per (layer, lower candidate); the loss of an assignment is the base plus the sum of
  the single-layer increases.

**MRECG module capacity** (Ma et al., "Solving Oscillation Problem in Post-Training Quantization Through
a Theoretical Perspective", CVPR 2023, section 4): data-free ``ModCap_u = sum_j params_j * b_j *
alpha^(stride_j - 1)`` over the unit's conv/linear layers, and data-dependent ``ModCap_u = ||f_u(W, X) -
f^_u(W^, X^)||^2`` -- the FP unit on FP input against the quantized unit on the quantized-prefix input
(here: the round-to-nearest model; a larger error means a lower capacity). Their differentials between
adjacent units (capacity drop ``ModCap_u - ModCap_{u+1}``, or loss rise ``L_{u+1} - L_u``) decide which
units MRECG reconstructs jointly (:mod:`ptqflow.plan`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore
from ptqflow.kernels import fixed_sum
from ptqflow.quant.model import QuantModel
from ptqflow.quant.quantizer import WeightQuantizer, check_bits
from ptqflow.quant.units import QuantLayer

__all__ = [
    "LayerInfo",
    "SensitivityConfig",
    "UnitSensitivity",
    "capacity_differentials",
    "layer_infos",
    "modcap_data_dependent",
    "modcap_data_free",
    "stage_boundaries",
    "unit_sensitivities",
]

Mode = Literal["exhaustive", "lowest_subsets", "additive"]


@dataclass(frozen=True)
class SensitivityConfig:
    """Settings of :func:`unit_sensitivities` and the ModCap measures.

    Args:
        candidate_bits: weight bit-widths a searchable layer may take (BRECQ: 2, 4, 8).
        metric: ``fisher`` (``sum dz^2 g^2``, BRECQ eq. 10), ``mse`` (``sum dz^2``) or ``kl`` (the
            network-output KL with only the unit quantized, see the module docstring), per sample.
        samples: calibration samples each unit is measured on (the first ones of the store).
        batch_size: samples per forward pass.
        max_assignments: most bit assignments measured per unit before pruning (see the module docstring).
        modcap_alpha: the stride penalty alpha of the data-free ModCap (the paper's value could not be
            retrieved; 0.5 halves the capacity of a stride-2 layer).
    """

    candidate_bits: tuple[int, ...] = (2, 4, 8)
    metric: Literal["fisher", "mse", "kl"] = "fisher"
    samples: int = 256
    batch_size: int = 64
    max_assignments: int = 81
    modcap_alpha: float = 0.5

    def __post_init__(self) -> None:
        if len(self.candidate_bits) < 2:
            raise ConfigError(f"candidate_bits needs at least two bit-widths, got {list(self.candidate_bits)}")
        for b in self.candidate_bits:
            try:
                check_bits(b, "candidate_bits entries")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if list(self.candidate_bits) != sorted(set(self.candidate_bits)):
            raise ConfigError(f"candidate_bits must be strictly increasing, got {list(self.candidate_bits)}")
        for name in ("samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_assignments < 2:
            raise ConfigError(f"max_assignments must be >= 2, got {self.max_assignments}")
        if not 0 < self.modcap_alpha <= 1:
            raise ConfigError(f"modcap_alpha must be in (0, 1], got {self.modcap_alpha}")


@dataclass(frozen=True)
class LayerInfo:
    """Static facts about one quantized conv/linear layer (what size and BitOPs are computed from).

    Attributes:
        name: ``unit.layer`` name in the quantized model.
        unit: index of its unit.
        params: weight elements.
        out_channels: output channels (one scale and zero point each).
        bias: bias elements (0 without bias).
        macs: multiply-accumulates per sample.
        stride: spatial stride (1 for linear layers).
        input_bits: bits of the layer's input when fixed by the model (8 for the image), else ``None``
            (the activation bits of the configuration).
        pinned_bits: fixed weight bits (first/last layer), or ``None`` if the layer is searched.
    """

    name: str
    unit: int
    params: int
    out_channels: int
    bias: int
    macs: int
    stride: int
    input_bits: int | None
    pinned_bits: int | None


@dataclass
class UnitSensitivity:
    """The measured loss table of one unit over bit assignments of its searchable layers.

    Attributes:
        unit: the unit's name.
        layers: names of its searchable layers, in the order an assignment lists their bits.
        mode: ``exhaustive``, ``lowest_subsets`` or ``additive`` (module docstring).
        candidate_bits: the bit-widths assignments draw from.
        measured: ``(bits per layer, loss)`` for every assignment actually measured.
    """

    unit: str
    layers: list[str]
    mode: Mode
    candidate_bits: tuple[int, ...]
    measured: list[tuple[tuple[int, ...], float]] = field(default_factory=list)

    def losses(self, choices: np.ndarray) -> np.ndarray:
        """Loss of each row of ``choices`` ``(P, layers)``: indices into ``candidate_bits``."""
        table = {bits: loss for bits, loss in self.measured}
        cands = self.candidate_bits
        choices = np.asarray(choices, dtype=np.int64).reshape(-1, len(self.layers))
        if self.mode == "additive":
            top = tuple(cands[-1] for _ in self.layers)
            base = table[top]
            delta = np.zeros((len(self.layers), len(cands)))
            for j in range(len(self.layers)):
                for c, b in enumerate(cands[:-1]):
                    bits = tuple(b if i == j else cands[-1] for i in range(len(self.layers)))
                    delta[j, c] = table[bits] - base
            return base + delta[np.arange(len(self.layers))[None, :], choices].sum(axis=1)
        if self.mode == "lowest_subsets":
            choices = np.where(choices == 0, 0, 1)
            cands = cands[:2]
        # Mixed-radix index of every measured assignment, then a dense lookup.
        radix = len(cands) ** np.arange(len(self.layers))
        dense = np.full(len(cands) ** len(self.layers), np.nan)
        for bits, loss in self.measured:
            dense[int(sum(cands.index(b) * r for b, r in zip(bits, radix, strict=True)))] = loss
        return dense[(choices * radix[None, :]).sum(axis=1)]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (losses rounded to 12 significant digits for stable bytes)."""
        return {
            "unit": self.unit,
            "layers": self.layers,
            "mode": self.mode,
            "candidate_bits": list(self.candidate_bits),
            "measured": [{"bits": list(bits), "loss": float(f"{loss:.9g}")} for bits, loss in self.measured],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UnitSensitivity:
        """Inverse of :meth:`to_json`."""
        return cls(
            unit=str(data["unit"]),
            layers=[str(n) for n in data["layers"]],
            mode=data["mode"],
            candidate_bits=tuple(int(b) for b in data["candidate_bits"]),
            measured=[(tuple(int(b) for b in m["bits"]), float(m["loss"])) for m in data["measured"]],
        )


@torch.no_grad()
def layer_infos(model: QuantModel, example: torch.Tensor, first_last_weight_bits: int | None) -> list[LayerInfo]:
    """Parameter counts, MACs and strides of every quantized layer, from one forward pass of ``example``.

    Args:
        model: the quantized model.
        example: an input batch; its first sample is used.
        first_last_weight_bits: bits pinning the first conv and the last linear layer (not searched),
            or ``None`` to search them too.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    named = list(model.quant_layers())
    for name, layer in named:
        handles.append(layer.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape))))
    model.set_quant_state(weight=False, act=False)
    try:
        model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.set_quant_state(weight=True, act=True)
    unit_of = {
        f"{unit_name}.{n}": i
        for i, (unit_name, unit) in enumerate(model.named_units())
        for n, _ in unit.quant_layers()
    }
    ends = {named[0][0], named[-1][0]}
    infos = []
    for index, (name, layer) in enumerate(named):
        weight = layer.layer.weight
        out = shapes[name]
        # output positions per sample: H*W of a conv's (1, C, H, W); the tokens of a linear's (1, ..., out)
        spatial = int(np.prod(out[1:-1] if isinstance(layer.layer, nn.Linear) else out[2:]))
        per_output = int(np.prod(weight.shape[1:]))
        stride = int(layer.layer.stride[0]) if isinstance(layer.layer, nn.Conv2d) else 1
        infos.append(
            LayerInfo(
                name=name,
                unit=unit_of[name],
                params=weight.numel(),
                out_channels=weight.shape[0],
                bias=0 if layer.layer.bias is None else layer.layer.bias.numel(),
                macs=spatial * weight.shape[0] * per_output,
                stride=stride,
                input_bits=8 if index == 0 else None,
                pinned_bits=first_last_weight_bits if name in ends else None,
            )
        )
    return infos


def _assignments(n_layers: int, cands: tuple[int, ...], max_assignments: int) -> tuple[Mode, list[tuple[int, ...]]]:
    if len(cands) ** n_layers <= max_assignments:
        return "exhaustive", [tuple(reversed(a)) for a in itertools.product(cands, repeat=n_layers)]
    if 2**n_layers <= max_assignments:
        low = cands[:2]
        return "lowest_subsets", [tuple(reversed(a)) for a in itertools.product(low, repeat=n_layers)]
    top = cands[-1]
    singles = [tuple(b if i == j else top for i in range(n_layers)) for j in range(n_layers) for b in cands[:-1]]
    return "additive", [tuple(top for _ in range(n_layers)), *singles]


def _unit_loss(pred: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Per-batch *sum* over samples of ``sum_elements dz^2 (g^2)``."""
    err = (pred - target).pow(2)
    if grad is not None:
        err = err * grad.pow(2)
    return fixed_sum(err)


def _output_kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-batch *sum* over samples of ``KL(softmax(reference) || softmax(logits))``, in float64 (the
    divergence of a high-bit assignment is a difference of nearly equal log-probabilities)."""
    pointwise = torch.nn.functional.kl_div(
        torch.log_softmax(logits.flatten(1).double(), 1),
        torch.log_softmax(reference.flatten(1).double(), 1),
        reduction="none",
        log_target=True,
    )
    return fixed_sum(pointwise)


@torch.no_grad()
def unit_sensitivities(
    model: QuantModel,
    store: FeatureStore,
    infos: Sequence[LayerInfo],
    config: SensitivityConfig,
    p: float,
    device: torch.device,
    progress: Any = None,
) -> list[UnitSensitivity]:
    """Measure every unit's loss table (weights quantized round-to-nearest, activations in FP).

    Each unit gets its FP input from the store and is compared with its FP output (weighted by the
    cached gradient for ``fisher``); for ``kl`` its output runs on through the FP rest of the network and
    the logits are compared with the stored FP logits. The Lp range of every (layer, bits) pair is
    searched once.

    Args:
        model: a quantized model of the store's network (its weights are the folded FP weights).
        store: the FP feature store.
        infos: :func:`layer_infos` of ``model`` (pinned layers are not searched).
        config: candidate bits, metric, samples, pruning.
        p: exponent of the weight range search (the model's, 2.4).
        device: where to run.
        progress: optional ``progress(total, label)`` returning ``update(i, loss)``.

    Returns:
        One :class:`UnitSensitivity` per unit with at least one searchable layer, in unit order.
    """
    n = min(config.samples, store.num_samples)
    layers = dict(model.quant_layers())
    units = list(model.named_units())
    downstream = config.metric == "kl"
    model.to(device).set_quant_state(weight=not downstream, act=False)
    logits = store.unit(units[-1][0]).outputs(slice(0, n)).to(device) if downstream else None
    results = []
    try:
        for index, (unit_name, unit) in enumerate(units):
            searchable = [i.name for i in infos if i.unit == index and i.pinned_bits is None]
            if not searchable:
                continue
            unit.set_quant_state(weight=True, act=False)
            quantizers = {
                (name, b): _init_quantizer(layers[name], b, p, device)
                for name in searchable
                for b in config.candidate_bits
            }
            originals = {name: layers[name].weight_quantizer for name in searchable}
            features = store.unit(unit_name)
            x = features.inputs(slice(0, n)).to(device)
            y = logits if logits is not None else features.outputs(slice(0, n)).to(device)
            g = features.grads(slice(0, n)).to(device) if config.metric == "fisher" else None
            mode, assignments = _assignments(len(searchable), config.candidate_bits, config.max_assignments)
            update = progress(len(assignments), f"sensitivity {unit_name}") if progress else None
            measured = []
            try:
                for step, bits in enumerate(assignments):
                    for name, b in zip(searchable, bits, strict=True):
                        layers[name].weight_quantizer = quantizers[(name, b)]
                    total = torch.zeros((), dtype=torch.float64, device=device)
                    for lo in range(0, n, config.batch_size):
                        sl = slice(lo, lo + config.batch_size)
                        out = unit(x[sl])
                        if downstream:
                            for _, later in units[index + 1 :]:
                                out = later(out)
                            total += _output_kl(out, y[sl]).double()
                        else:
                            total += _unit_loss(out, y[sl], g[sl] if g is not None else None).double()
                    loss = float(total) / n
                    measured.append((bits, loss))
                    if update is not None:
                        update(step + 1, loss)
            finally:
                for name, quantizer in originals.items():
                    layers[name].weight_quantizer = quantizer
                unit.set_quant_state(weight=not downstream, act=False)
            results.append(UnitSensitivity(unit_name, searchable, mode, config.candidate_bits, measured))
    finally:
        model.set_quant_state(weight=True, act=True)
    return results


def _init_quantizer(layer: QuantLayer, bits: int, p: float, device: torch.device) -> WeightQuantizer:
    quantizer = WeightQuantizer(bits, layer.layer.weight.shape[0], layer.weight_quantizer.symmetric).to(device)
    quantizer.init_range(layer.layer.weight, p)
    return quantizer


def modcap_data_free(infos: Sequence[LayerInfo], num_units: int, bits: dict[str, int], alpha: float) -> list[float]:
    """Data-free ModCap per unit: ``sum_j params_j * b_j * alpha^(stride_j - 1)`` (MRECG section 4).

    Args:
        infos: every quantized layer.
        num_units: units of the model (units without layers get 0).
        bits: weight bits per layer name.
        alpha: stride penalty in (0, 1].
    """
    capacity = [0.0] * num_units
    for info in infos:
        capacity[info.unit] += info.params * bits[info.name] * alpha ** (info.stride - 1)
    return capacity


@torch.no_grad()
def modcap_data_dependent(
    model: QuantModel, store: FeatureStore, samples: int, batch_size: int, device: torch.device
) -> list[float]:
    """Data-dependent ModCap per unit: ``mean_n ||f_u(x_fp) - f^_u(x^)||^2`` along the quantized model.

    ``x^`` is the quantized-prefix input (the calibration samples pushed through the already quantized
    units), so the error accumulates as it does during reconstruction; a larger value means a lower
    capacity (MRECG's data-dependent measure, computed on the round-to-nearest model).
    """
    n = min(samples, store.num_samples)
    model.to(device).set_quant_state(weight=True, act=True)
    x_q = store.unit(store.units[0]).inputs(slice(0, n)).to(device)
    losses = []
    for index, (_, unit) in enumerate(model.named_units()):
        y_fp = store.unit(store.units[index]).outputs(slice(0, n)).to(device)
        outs = [unit(x_q[lo : lo + batch_size]) for lo in range(0, n, batch_size)]
        x_q = torch.cat(outs)
        losses.append(float(fixed_sum((x_q - y_fp).double().pow(2))) / n)
    return losses


def capacity_differentials(values: Sequence[float], form: Literal["data_free", "data_dependent"]) -> list[float]:
    """Differential of each adjacent pair ``(u, u+1)``: capacity drop (data-free) or loss rise (data-dependent).

    Both are positive when unit ``u+1`` has the smaller capacity, the case MRECG merges.
    """
    pairs: Iterator[tuple[float, float]] = zip(values[:-1], values[1:], strict=True)
    if form == "data_free":
        return [a - b for a, b in pairs]
    return [b - a for a, b in pairs]


def stage_boundaries(output_shapes: Sequence[Sequence[int]]) -> list[float]:
    """1.0 for each adjacent pair ``(u, u+1)`` where the output shape changes (a new stage starts), else 0.0.

    The merge pattern decoded from the public MRECG code joins the last block(s) of a stage with the
    first block(s) of the next (algorithms.md section 6); this marks those pairs, a structural fallback
    that needs neither data nor a capacity formula.
    """
    return [float(tuple(a) != tuple(b)) for a, b in zip(output_shapes[:-1], output_shapes[1:], strict=True)]
