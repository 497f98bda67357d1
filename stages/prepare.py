"""Stage ``prepare``: pin the calibration subset and the test set as small, checksummed files.

The calibration draw is seeded (``prepare.seed``) from the training split, as BRECQ/QDrop draw their
1024 calibration images from ImageNet's train split. Later stages read these files, never the raw
dataset, so the calibration set is a DVC dependency and a teammate needs no dataset to reuse a cache.

``prepare.dataset`` picks the source:

* ``fashion_mnist``: the four IDX files; ``calibration.pt`` and ``test.pt`` hold whole uint8 tensors.
* ``imagefolder``: ``<data_root>/train/<class>/...`` and ``<data_root>/val/<class>/...``.
  ``calibration.pt`` holds the calibration crops as uint8 ``(N, 3, S, S)`` after RandomResizedCrop +
  flip (1024 x 3 x 224 x 224 is 154 MB; the crops are what a PIL pipeline produces before ``ToTensor``,
  so uint8 loses nothing and is 4x smaller than float32) plus the normalisation mean/std.
  ``test.json`` is only an index of the validation files (relative paths, labels, the sha256 of the
  list, the preprocessing); ``evaluate`` streams the images from ``data_root`` in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_json
from ptqflow.data import LabelledImages, draw_calibration, load_fashion_mnist, sha256_of_array
from ptqflow.errors import ConfigError, DataError
from ptqflow.imagefolder import IMAGENET_MEAN, IMAGENET_STD, calibration_crops, scan_image_folder
from stages.params import section


@dataclass(frozen=True)
class PrepareConfig:
    """Args:
    data_root: folder of the four Fashion-MNIST IDX ``.gz`` files, or the image folder's root
        (holding ``train/`` and ``val/``).
    calib_size: images in the calibration subset (drawn from the train split).
    seed: seed of the calibration draw (and, for image folders, of the crops and flips).
    dataset: ``fashion_mnist`` or ``imagefolder``.
    image_size: image folders: side of the calibration crop and of the validation center crop (224).
    resize_size: image folders: the validation images' shorter side before the center crop (256).
    """

    data_root: str = "/usr/share/datasets/fashion-mnist"
    calib_size: int = 1024
    seed: int = 1005
    dataset: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    image_size: int = 224
    resize_size: int = 256

    def __post_init__(self) -> None:
        if self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")
        if self.image_size < 1:
            raise ConfigError(f"image_size must be >= 1, got {self.image_size}")
        if self.resize_size < self.image_size:
            raise ConfigError(f"resize_size must be >= image_size ({self.image_size}), got {self.resize_size}")


def _describe(data: LabelledImages) -> dict[str, Any]:
    return {
        "count": len(data),
        "image_shape": list(data.images.shape[1:]),
        "images_sha256": sha256_of_array(data.images),
        "labels_sha256": sha256_of_array(data.labels),
    }


def run(params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``calibration.pt``, ``test.pt`` (or ``test.json``) and ``manifest.json`` into ``out_dir`` (replaced
    as a whole)."""
    config = section(params, "prepare", PrepareConfig)
    if config.dataset == "imagefolder":
        return _run_imagefolder(config, out_dir)
    root = Path(config.data_root)
    train = load_fashion_mnist(root, "train")
    test = load_fashion_mnist(root, "test")
    if config.calib_size > len(train):
        raise ConfigError(
            f"prepare.calib_size must be in [1, {len(train)}] (the train split's size), got {config.calib_size}"
        )
    indices = draw_calibration(len(train), config.calib_size, config.seed)
    calib = train.subset(indices)
    manifest = {
        "dataset": "fashion-mnist",
        "calibration": {"split": "train", "seed": config.seed, "indices": indices.tolist(), **_describe(calib)},
        "test": {"split": "test", **_describe(test)},
    }
    with atomic_dir(out_dir) as tmp:  # the folder appears whole or not at all
        atomic_save_torch({"images": calib.images, "labels": calib.labels, "indices": indices}, tmp / "calibration.pt")
        atomic_save_torch({"images": test.images, "labels": test.labels}, tmp / "test.pt")
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def _run_imagefolder(config: PrepareConfig, out_dir: Path) -> dict[str, Any]:
    root = Path(config.data_root)
    train = scan_image_folder(root, "train")
    val = scan_image_folder(root, "val")
    if train.classes != val.classes:
        extra = sorted(set(train.classes) ^ set(val.classes))
        raise DataError(
            f"{root}/train and {root}/val hold different class folders (e.g. {extra[0] if extra else 'order'}); "
            "they must match"
        )
    if config.calib_size > len(train):
        raise ConfigError(
            f"prepare.calib_size must be in [1, {len(train)}] (the train split's size), got {config.calib_size}"
        )
    indices = draw_calibration(len(train), config.calib_size, config.seed)
    chosen = [train.files[i] for i in indices.tolist()]
    images = calibration_crops(root, chosen, config.image_size, config.seed)  # (N, 3, S, S) uint8
    labels = torch.tensor([train.labels[i] for i in indices.tolist()], dtype=torch.int64)
    preprocess = {"resize": config.resize_size, "crop": config.image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    calibration = {"split": "train", "seed": config.seed, "train_files_sha256": train.sha256(), "files": chosen}
    manifest = {
        "dataset": "imagefolder",
        "classes": len(train.classes),
        "calibration": {
            **calibration,
            "indices": indices.tolist(),
            **_describe(LabelledImages(images, labels)),
            "augment": "RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip",
        },
        "test": {"split": "val", "count": len(val), "files_sha256": val.sha256(), "preprocess": preprocess},
    }
    atomic_save_torch(
        {
            "images": images,
            "labels": labels,
            "indices": indices,
            "mean": torch.tensor(IMAGENET_MEAN),
            "std": torch.tensor(IMAGENET_STD),
        },
        out_dir / "calibration.pt",
    )
    atomic_write_json(out_dir / "test.json", val.to_json(split="val", preprocess=preprocess))
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest
