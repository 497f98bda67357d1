"""Datasets: Fashion-MNIST from its four IDX files, seeded calibration draws, tensor batching.

The IDX format (LeCun et al., MNIST) is a big-endian header -- two zero bytes, a type code (0x08 for
unsigned bytes), the number of dimensions -- followed by one int32 per dimension and the raw data.
torchvision's ``FashionMNIST`` reads the same four files, so a user who already has them points
``prepare.data_root`` at that folder.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ptqflow.errors import DataError

__all__ = [
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "LabelledImages",
    "augment_crop_flip",
    "batches",
    "draw_calibration",
    "fashion_mnist_counts",
    "load_fashion_mnist",
    "normalize",
    "read_idx",
    "sha256_of_array",
]

#: split -> (images file, labels file), the names of the upstream release and of Debian's package.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_HOW_TO_GET = (
    "install Debian's package with 'apt-get install dataset-fashion-mnist' "
    "(files land in /usr/share/datasets/fashion-mnist) or point prepare.data_root at a folder "
    "holding the four Fashion-MNIST IDX .gz files"
)


@dataclass(frozen=True)
class LabelledImages:
    """Images as uint8 ``(N, H, W)`` or ``(N, C, H, W)`` and int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> LabelledImages:
        """Return the rows at ``indices`` (in that order)."""
        return LabelledImages(self.images[indices], self.labels[indices])


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read one gzip-compressed IDX file of unsigned bytes.

    Args:
        path: the ``.gz`` file.
        expected_ndim: 3 for images, 1 for labels.

    Returns:
        A uint8 array of the shape the header declares.

    Raises:
        DataError: the file is missing, not gzip, has a wrong header or is truncated.
    """
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}; {_HOW_TO_GET}")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"dataset file {path} is not a readable gzip file ({exc}); {_HOW_TO_GET}") from None
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4].ljust(4, b"\xff"))
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise DataError(
            f"dataset file {path} is not an IDX file of {expected_ndim}-d unsigned bytes "
            f"(header {raw[:4].hex()}); {_HOW_TO_GET}"
        )
    if len(raw) < 4 + 4 * expected_ndim:
        raise DataError(f"dataset file {path} is truncated (no IDX header); {_HOW_TO_GET}")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    count = int(np.prod(shape))
    if len(body) != count:
        raise DataError(
            f"dataset file {path} is truncated or padded: header says {count} bytes, found {len(body)}; {_HOW_TO_GET}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def fashion_mnist_counts(root: Path) -> dict[str, int]:
    """Samples per split from the four IDX headers alone (a check before any stage reads the files).

    Raises:
        DataError: a file is missing, not gzip or not IDX, or a split's images and labels disagree.
    """
    counts = {}
    for split, names in FASHION_MNIST_FILES.items():
        sizes = []
        for name, ndim in zip(names, (3, 1), strict=True):
            path = Path(root) / name
            if not path.is_file():
                raise DataError(f"dataset file not found: {path}; {_HOW_TO_GET}")
            try:
                with gzip.open(path, "rb") as fh:
                    head = fh.read(8)
            except (OSError, EOFError) as exc:
                raise DataError(f"dataset file {path} is not a readable gzip file ({exc}); {_HOW_TO_GET}") from None
            if len(head) < 8 or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
                raise DataError(f"dataset file {path} is not an IDX file of {ndim}-d unsigned bytes; {_HOW_TO_GET}")
            sizes.append(struct.unpack(">I", head[4:8])[0])
        if sizes[0] != sizes[1]:
            raise DataError(f"{Path(root) / names[0]} and {names[1]} disagree on the sample count; {_HOW_TO_GET}")
        counts[split] = sizes[0]
    return counts


def load_fashion_mnist(root: Path, split: str) -> LabelledImages:
    """Load one split of Fashion-MNIST (Xiao et al., 2017) from its IDX files.

    Args:
        root: folder holding the four ``*-ubyte.gz`` files.
        split: ``"train"`` (60k) or ``"test"`` (10k).

    Raises:
        DataError: a file is missing or corrupt, or the two files of a split disagree.
    """
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"unknown split {split!r}; allowed: {sorted(FASHION_MNIST_FILES)}")
    image_name, label_name = FASHION_MNIST_FILES[split]
    images = read_idx(Path(root) / image_name, expected_ndim=3)
    labels = read_idx(Path(root) / label_name, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{Path(root) / image_name} holds {images.shape[0]} images but {Path(root) / label_name} "
            f"holds {labels.shape[0]} labels; {_HOW_TO_GET}"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{Path(root) / label_name} has labels above 9; {_HOW_TO_GET}")
    return LabelledImages(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def sha256_of_array(array: torch.Tensor) -> str:
    """Hex sha256 of a tensor's raw bytes (C order), used to pin calibration and test sets."""
    return hashlib.sha256(array.contiguous().numpy().tobytes()).hexdigest()


def draw_calibration(num_items: int, size: int, seed: int) -> torch.Tensor:
    """Draw ``size`` distinct indices out of ``num_items`` with a seeded generator.

    Returns:
        Sorted int64 indices, so the draw does not depend on anything but ``(num_items, size, seed)``.
    """
    if not 0 < size <= num_items:
        raise DataError(f"calibration size must be in [1, {num_items}], got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_items, generator=generator)[:size].sort().values


def normalize(images: torch.Tensor, mean: float = FASHION_MNIST_MEAN, std: float = FASHION_MNIST_STD) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, C, H, W)`` -> float32 ``(N, C, H, W)``, standardised."""
    x = images.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (N, 1, H, W)
    return x.sub_(mean).div_(std)


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, batched and seeded.

    Args:
        x: float ``(N, C, H, W)``.
        generator: the source of randomness (keeps training reproducible).
        pad: pixels of padding on each side.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w)[None, :]).view(n, 1, 1, w).expand(n, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)  # (N, C, H, W)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def batches(
    data: LabelledImages, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images uint8, labels)`` mini-batches; shuffled when a generator is given."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield data.images[idx], data.labels[idx]
