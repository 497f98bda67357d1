"""Stage ``features``: run the FP model once over the calibration set and cache every unit's input,
output and (``features.grads``) output gradient in a sharded zarr v3 store (data/features/store.zarr).

Before any work it checks that the disk can hold the store at its uncompressed size (the bound a user
must plan for) and stops with one line naming the bytes needed and free otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ptqflow.atomic import atomic_dir
from ptqflow.errors import ConfigError, DataError
from ptqflow.features import FeatureStoreWriter, extract_features, store_bytes
from ptqflow.fold import fold_bn
from ptqflow.units import extract_units
from stages.common import free_bytes, load_calibration, load_fp_model, resolve_device, track
from stages.params import BaseConfig, section


@dataclass(frozen=True)
class FeaturesConfig:
    """Args:
    dtype: storage dtype of activations and gradients.
    batch_size: calibration images per forward/backward pass.
    chunk_size: samples per zarr chunk (the read unit of reconstruction).
    shard_size: samples per zarr shard (one file); memory holds one shard of every array while writing.
    grads: also store every unit's FP output gradient; only ``reconstruct.loss: fisher`` and
        ``sensitivity.metric: fisher`` read them (those stages stop with one line when they are missing).
        Off, the store is half the size and no backward pass runs.
    """

    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 64
    chunk_size: int = 32
    shard_size: int = 256
    grads: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shard_size % self.chunk_size:
            raise ConfigError(f"shard_size must be a multiple of chunk_size, got {self.shard_size}, {self.chunk_size}")


def _check_space(out: Path, need: int, config: FeaturesConfig) -> None:
    free = free_bytes(out)
    if need > free:
        options = (("features.dtype: float16", config.dtype == "float32"), ("features.grads: false", config.grads))
        hints = [h for h, on in options if on]
        raise DataError(
            f"features: the store needs up to {need:,} bytes uncompressed and {out.parent} has {free:,} free; "
            f"free space{''.join(', or set ' + h for h in hints)}, or lower prepare.calib_size"
        )


def run(params: dict[str, Any], calibration: Path, out: Path) -> int:
    """Write the feature store for ``calibration.pt`` to ``out``; return the number of units."""
    base = section(params, "base", BaseConfig)
    config = section(params, "features", FeaturesConfig)
    device = resolve_device(base.device)
    data, preprocess = load_calibration(calibration)
    model = load_fp_model(base).to(device)
    extracted = extract_units(fold_bn(model), base.float_leaves)
    units = [u.module for u in extracted]
    names = [u.name for u in extracted]
    with torch.no_grad():
        probe = preprocess(data.images[:1]).to(device)
        shapes = []
        for unit in units:
            probe = unit(probe)
            shapes.append(tuple(probe.shape[1:]))
    input_shape = tuple(preprocess(data.images[:1]).shape[1:])

    def batches() -> Any:
        for start in range(0, len(data), config.batch_size):
            stop = start + config.batch_size
            yield preprocess(data.images[start:stop]), data.labels[start:stop]

    total = -(-len(data) // config.batch_size)
    _check_space(out, store_bytes(input_shape, shapes, len(data), config.dtype, config.grads), config)

    with atomic_dir(out) as tmp:
        writer = FeatureStoreWriter(
            tmp,
            names,
            input_shape,
            shapes,
            len(data),
            config.dtype,
            config.chunk_size,
            config.shard_size,
            grads=config.grads,
        )
        extract_features(units, track(batches(), total, "features"), writer, device)
    return len(units)
