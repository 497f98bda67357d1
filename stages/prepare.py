"""Stage ``prepare``: pin the calibration subset and the test set as small, checksummed files.

The calibration draw is seeded (``prepare.seed``) from the training split, as BRECQ/QDrop draw their
1024 calibration images from ImageNet's train split. Later stages read these files, never the raw
dataset, so the calibration set is a DVC dependency and a teammate needs no dataset to reuse a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_json
from ptqflow.data import LabelledImages, draw_calibration, load_fashion_mnist, sha256_of_array
from ptqflow.errors import ConfigError
from stages.params import section


@dataclass(frozen=True)
class PrepareConfig:
    """Args:
    data_root: folder of the four Fashion-MNIST IDX ``.gz`` files.
    calib_size: images in the calibration subset (drawn from the train split).
    seed: seed of the calibration draw.
    """

    data_root: str = "/usr/share/datasets/fashion-mnist"
    calib_size: int = 1024
    seed: int = 1005

    def __post_init__(self) -> None:
        if self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")


def _describe(data: LabelledImages) -> dict[str, Any]:
    return {
        "count": len(data),
        "image_shape": list(data.images.shape[1:]),
        "images_sha256": sha256_of_array(data.images),
        "labels_sha256": sha256_of_array(data.labels),
    }


def run(params: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Write ``calibration.pt``, ``test.pt`` and ``manifest.json`` into ``out_dir`` (replaced as a whole)."""
    config = section(params, "prepare", PrepareConfig)
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
