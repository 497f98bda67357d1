"""Helpers shared by the stage modules: device choice, model loading, logging."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqflow.data import LabelledImages, normalize
from ptqflow.errors import ConfigError, DataError
from ptqflow.features import FeatureStore
from ptqflow.imagefolder import ImageFolderDataset, ImageIndex, normalize_channels
from ptqflow.kernels import keep_freed_memory, set_threads, use_kernels
from ptqflow.models import build_model, load_weights
from stages.logs import configure_logging, progress_bar, track
from stages.params import BaseConfig, section

__all__ = [
    "apply_runtime",
    "configure_logging",
    "free_bytes",
    "load_calibration",
    "load_fp_model",
    "load_split",
    "open_image_test_set",
    "progress_bar",
    "require_grads",
    "resolve_device",
    "seed_everything",
    "track",
    "unit_progress",
]

log = logging.getLogger("ptqflow")


def apply_runtime(params: Mapping[str, Any]) -> BaseConfig:
    """Apply ``base.kernels`` and ``base.threads`` of loaded params to this process; return the base section."""
    base = section(params, "base", BaseConfig)
    use_kernels(base.kernels)
    keep_freed_memory()
    threads = set_threads(base.threads)
    log.debug("kernels %s, %d intra-op threads (base.threads: %s)", base.kernels, threads, base.threads)
    return base


def unit_progress(threads: int | str) -> Callable[[int, str], Callable[[int, float], None]]:
    """:func:`progress_bar` that first rechooses the thread count when ``threads`` is ``auto``: called
    before every reconstruction unit, so a long stage follows the load other processes put on the cores."""

    def start(total: int, label: str) -> Callable[[int, float], None]:
        if threads == "auto":
            chosen = set_threads("auto")
            log.debug("%s: %d intra-op threads", label, chosen)
        return progress_bar(total, label)

    return start


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that will hold ``path`` (its nearest existing ancestor)."""
    where = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(where).free


def require_grads(store: FeatureStore, needed_by: str) -> None:
    """Stop before any work when ``needed_by`` (e.g. ``reconstruct.loss: fisher``) reads gradients the
    store was written without."""
    if not store.has_grads:
        raise ConfigError(
            f"{needed_by} needs the FP output gradients, and the feature store {store.path} has none: "
            "set features.grads: true (and rerun: dvc repro)"
        )


def load_fp_model(base: BaseConfig) -> nn.Module:
    """The FP model ``base.model`` with weights from ``base.weights``, in eval mode."""
    model = build_model(base.model)
    return load_weights(model, Path(base.weights), base.model).eval()


def load_split(path: Path) -> LabelledImages:
    """Read a split file written by ``prepare`` (uint8 images + int64 labels, ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; run the prepare stage first (dvc repro prepare)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = obj["images"], obj["labels"]
    except Exception as exc:  # corrupt zip, pickle payload, missing keys
        raise DataError(
            f"{path} is not a valid prepare output ({type(exc).__name__}); rerun dvc repro prepare"
        ) from None
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and len(images) == len(labels)):
        raise DataError(f"{path} is not a valid prepare output; rerun dvc repro prepare")
    return LabelledImages(images, labels)


def open_image_test_set(
    test: Path, images: Path | None
) -> tuple[ImageFolderDataset, tuple[float, ...], tuple[float, ...]]:
    """An image-folder test set from prepare's ``test.json`` index and the folder ``images``: the dataset
    (uint8 crops) and the per-channel mean and std to normalize them with."""
    if images is None:
        raise DataError(f"{test} is an image-folder index: pass the folder's root with --images")
    if not test.is_file():
        raise DataError(f"{test} not found; run the prepare stage first (dvc repro prepare)")
    try:
        raw = json.loads(test.read_text())
        pre = raw["preprocess"]
        resize, crop = int(pre["resize"]), int(pre["crop"])
        mean, std = tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{test} is not an image index with its preprocessing; rerun dvc repro prepare") from None
    return ImageFolderDataset(Path(images), ImageIndex.from_json(raw, str(test)), resize, crop), mean, std


def load_calibration(path: Path) -> tuple[LabelledImages, Callable[[torch.Tensor], torch.Tensor]]:
    """A calibration split plus its preprocessing: per-channel mean/std when the file carries them
    (image folders), else the Fashion-MNIST :func:`ptqflow.data.normalize`."""
    data = load_split(path)
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    mean, std = obj.get("mean"), obj.get("std")
    if mean is None or std is None:
        return data, normalize
    channel_mean, channel_std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return data, partial(normalize_channels, mean=channel_mean, std=channel_std)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("base.device is 'cuda' but no CUDA device is available; allowed: auto, cpu, cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (stages also pass explicit generators where it matters)."""
    torch.manual_seed(seed)
