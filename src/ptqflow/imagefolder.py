"""ImageNet-style image folders: file indexes, the papers' preprocessing, seeded calibration crops.

Layout: ``<root>/<split>/<class>/<image>`` (the layout of torchvision's ``ImageFolder`` and of the
ImageNet train/val folders); classes are the sorted sub-folder names, labels their positions.

Preprocessing follows BRECQ/QDrop (algorithms.md section 3, "Calibration set"):

* validation: resize the *shorter* side to ``resize`` (256), center crop ``crop`` (224) -- a square
  ``Resize((256, 256))`` costs about 0.9 points of FP top-1 (BRECQ#7);
* calibration: a seeded draw of ``calib_size`` training images, each with a random resized crop
  (area 8-100 %, aspect 3/4-4/3; Szegedy et al., CVPR 2015, "Going deeper with convolutions") and a
  random horizontal flip, both drawn from a generator seeded by the same seed, so the calibration tensor
  depends only on the files, the size and the seed;
* normalisation with the ImageNet channel mean/std, applied to uint8 images at model-input time.

Images are decoded with PIL and resized bilinearly with antialiasing (torchvision's defaults), so the
uint8 crops are exactly what a PIL-based torchvision pipeline would feed before ``ToTensor``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ptqflow.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "ImageIndex",
    "calibration_crops",
    "eval_crop",
    "image_folder_classes",
    "normalize_channels",
    "random_resized_crop_box",
    "read_rgb",
    "scan_image_folder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File endings taken as images (case-insensitive), as torchvision's ImageFolder takes them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INDEX_FORMAT = {"format": "ptqflow-image-index", "version": 1}


@dataclass(frozen=True)
class ImageIndex:
    """The files of one split: paths relative to the data root (POSIX), labels, class names.

    Attributes:
        classes: class folder names, sorted; a label is a position in this tuple.
        files: ``<split>/<class>/<file>`` per image, in a fixed order (class, then path).
        labels: the class index of each file.
    """

    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def sha256(self) -> str:
        """Checksum of the file list (classes, paths, labels): pins which images a split means."""
        payload = json.dumps([list(self.classes), list(self.files), list(self.labels)], separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """A JSON-ready dict (format tag, checksum, ``extra`` fields, classes, ``[path, label]`` rows)."""
        return {
            **INDEX_FORMAT,
            **extra,
            "count": len(self),
            "files_sha256": self.sha256(),
            "classes": list(self.classes),
            "files": [[f, label] for f, label in zip(self.files, self.labels, strict=True)],
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> ImageIndex:
        """Rebuild an index written by :meth:`to_json`, checking the format tag and the checksum.

        Raises:
            DataError: not an index, another version, or a list that does not match its checksum.
        """
        rerun = "rerun the prepare stage (dvc repro prepare)"
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT["format"]:
            raise DataError(f"{source} is not a ptqflow image index; {rerun}")
        if data.get("version") != INDEX_FORMAT["version"]:
            raise DataError(f"{source} has index version {data.get('version')}, this ptqflow reads 1; {rerun}")
        try:
            index = cls(
                tuple(str(c) for c in data["classes"]),
                tuple(str(f) for f, _ in data["files"]),
                tuple(int(label) for _, label in data["files"]),
            )
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{source} is a damaged image index; {rerun}") from None
        if index.sha256() != data.get("files_sha256"):
            raise DataError(f"{source}: the file list does not match its checksum; {rerun}")
        return index


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_folder_classes(root: Path, split: str) -> tuple[str, ...]:
    """The sorted class folder names of ``root/split`` (no image is listed: cheap on ImageNet).

    Raises:
        DataError: the split folder is missing or has no class folders.
    """
    folder = Path(root) / split
    layout = f"expected {Path(root)}/{split}/<class>/<image> (an ImageNet-style folder)"
    if not folder.is_dir():
        raise DataError(f"image folder split not found: {folder}; {layout}")
    classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")))
    if not classes:
        raise DataError(f"no class folders in {folder}; {layout}")
    return classes


def scan_image_folder(root: Path, split: str) -> ImageIndex:
    """Index ``root/split/<class>/...`` (files in sub-folders of a class folder count too).

    Raises:
        DataError: the split folder is missing, has no class folders, or a class has no images.
    """
    classes = image_folder_classes(root, split)
    folder = Path(root) / split
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).as_posix()
            found += [f"{rel}/{f}" for f in sorted(filenames) if _is_image(f)]
        if not found:
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += found
        labels += [label] * len(found)
    return ImageIndex(classes, tuple(files), tuple(labels))


def read_rgb(path: Path) -> Image.Image:
    """Decode one image as 8-bit RGB (grayscale and CMYK files are converted).

    Raises:
        DataError: the file is missing or not a readable image.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 ``(3, H, W)``."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def random_resized_crop_box(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random crop box ``(top, left, height, width)`` covering ``scale`` of the area at an aspect ratio
    in ``ratio`` (log-uniform); after 10 failed tries, the largest centered box with a ratio in range.

    This is the Inception crop (Szegedy et al. 2015) as torchvision's ``RandomResizedCrop`` samples it,
    but from an explicit generator, so a seeded draw does not depend on the global RNG.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def calibration_crops(root: Path, files: Sequence[str], size: int, seed: int) -> torch.Tensor:
    """Random-resized-crop + horizontal-flip each file once, in order, from one generator seeded by ``seed``.

    Args:
        root: the data root the paths are relative to.
        files: relative paths, in draw order.
        size: side of the square output crop.
        seed: seeds the crop boxes and flips.

    Returns:
        uint8 ``(N, 3, size, size)``.
    """
    import torchvision.transforms.functional as TF  # here, not at the top: ptqflow.models, module docstring
    from torchvision.transforms import InterpolationMode

    generator = torch.Generator().manual_seed(seed)
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, rel in enumerate(files):
        image = read_rgb(Path(root) / rel)
        top, left, h, w = random_resized_crop_box(image.width, image.height, generator)
        crop = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
        if bool(torch.rand((), generator=generator) < 0.5):
            crop = TF.hflip(crop)
        out[i] = _to_uint8(crop)
    return out


def eval_crop(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """Validation preprocessing: shorter side to ``resize``, center ``crop`` x ``crop``; uint8 ``(3, crop, crop)``."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    resized = TF.resize(image, resize, InterpolationMode.BILINEAR, antialias=True)
    return _to_uint8(TF.center_crop(resized, [crop, crop]))


def normalize_channels(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32, scaled to [0, 1] and standardised per channel."""
    x = images.float().div_(255.0)  # (N, C, H, W)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class ImageFolderDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The validation images of an index, decoded and center-cropped on access (uint8, label).

    Args:
        root: the data root.
        index: the split's files.
        resize: shorter side before cropping.
        crop: side of the center crop.
    """

    def __init__(self, root: Path, index: ImageIndex, resize: int, crop: int) -> None:
        self.root = Path(root)
        self.index = index
        self.resize = resize
        self.crop = crop

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = read_rgb(self.root / self.index.files[i])
        return eval_crop(image, self.resize, self.crop), self.index.labels[i]
