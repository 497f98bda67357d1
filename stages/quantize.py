"""Stage ``quantize``: the round-to-nearest (RTN) baseline at each configured W/A bit pair.

Weights: per-channel asymmetric, Lp (p=2.4) range search; activations: per-tensor, ranges from the
Lp search on the FP unit inputs streamed from the feature store (never recomputing the FP model).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch
from ptqflow.errors import ConfigError, StoreError
from ptqflow.features import FeatureStore
from ptqflow.quant.model import QuantConfig, build_quant_model, calibrate_activations, quant_payload
from stages.common import load_fp_model, resolve_device, track
from stages.params import BaseConfig, section


@dataclass(frozen=True)
class BitPair:
    """Args:
    weight_bits: bits of the weights (first/last layer excepted).
    act_bits: bits of the activations (stem output excepted).
    """

    weight_bits: int
    act_bits: int


def _default_bits() -> dict[str, BitPair]:
    return {"w8a8": BitPair(8, 8), "w4a4": BitPair(4, 4)}


@dataclass(frozen=True)
class QuantizeConfig:
    """Args:
    bits: one RTN model per entry, ``name: {weight_bits, act_bits}``; the name is its file name.
    first_last_weight_bits: bits of the first conv and the last linear (null: as weight_bits).
    convention: ``brecq`` (stem output 8-bit, stem not reconstructed) or ``qdrop`` (stem reconstructed,
        head input 8-bit).
    p: exponent of the Lp range search.
    calib_size: calibration samples that initialise activation ranges.
    batch_size: samples per batch while calibrating.
    softmax: grid of the quantizers on softmax outputs (attention probabilities): ``uniform`` or ``log2``
        (powers of two; cannot be exported to ONNX QDQ).
    bias: ``int32`` (biases on the grid ``s_in * s_w`` an integer runtime stores them on, so the simulated
        model is the deployed one) or ``float`` (:class:`ptqflow.quant.model.QuantConfig`).
    scheme: ``asymmetric`` (onnxruntime, OpenVINO) or ``symmetric`` (signed, zero point 0: TensorRT).
    """

    bits: dict[str, BitPair] = field(default_factory=_default_bits)
    first_last_weight_bits: int | None = 8
    convention: Literal["brecq", "qdrop"] = "brecq"
    p: float = 2.4
    calib_size: int = 256
    batch_size: int = 64
    softmax: Literal["uniform", "log2"] = "uniform"
    bias: Literal["int32", "float"] = "int32"
    scheme: Literal["asymmetric", "symmetric"] = "asymmetric"

    def __post_init__(self) -> None:
        if not self.bits:
            raise ConfigError("bits must name at least one configuration, e.g. {w4a4: {weight_bits: 4, act_bits: 4}}")
        for name in self.bits:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ConfigError(f"bits.{name}: names may hold letters, digits, '_' and '-' only")
        # The keys shared by every pair first, so an error names quantize.<key>, not quantize.bits.<name>.<key>.
        self.quant_config(BitPair(4, 4))
        for name, pair in self.bits.items():
            try:
                self.quant_config(pair)
            except ConfigError as exc:
                raise ConfigError(f"bits.{name}.{exc}") from None
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def quant_config(self, pair: BitPair) -> QuantConfig:
        """The library config of one bit pair."""
        return QuantConfig(
            weight_bits=pair.weight_bits,
            act_bits=pair.act_bits,
            first_last_weight_bits=self.first_last_weight_bits,
            convention=self.convention,
            p=self.p,
            calib_size=self.calib_size,
            softmax=self.softmax,
            bias=self.bias,
            scheme=self.scheme,
        )


def _inputs(store: FeatureStore, batch_size: int, limit: int, position: int) -> Iterator[torch.Tensor]:
    return store.iter_inputs(position, batch_size, limit)


def run(params: dict[str, Any], features: Path, out: Path) -> list[str]:
    """Write one ``<name>.pt`` per bit pair into ``out``; return the names."""
    base = section(params, "base", BaseConfig)
    config = section(params, "quantize", QuantizeConfig)
    device = resolve_device(base.device)
    store = FeatureStore.open(features)
    fp_model = load_fp_model(base)
    with atomic_dir(out) as tmp:
        for name, pair in track(config.bits.items(), len(config.bits), "quantize"):
            qconfig = replace(config.quant_config(pair), float_leaves=base.float_leaves)
            model = build_quant_model(fp_model, qconfig).to(device)
            if model.names != store.units:
                raise StoreError(
                    f"feature store {features} was made for units {store.units[:3]}..., not this model's; "
                    "rerun dvc repro features"
                )
            calibrate_activations(
                model, partial(_inputs, store, config.batch_size, qconfig.calib_size), qconfig.p, device
            )
            atomic_save_torch(quant_payload(model, base.model, qconfig), tmp / f"{name}.pt")
    return list(config.bits)
