from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_fake_fashion_mnist, write_idx

from ptqflow.data import augment_crop_flip, draw_calibration, load_fashion_mnist, normalize, read_idx
from ptqflow.errors import DataError


def test_round_trip(tmp_path: Path) -> None:
    root = write_fake_fashion_mnist(tmp_path, train=30, test=12)
    data = load_fashion_mnist(root, "test")
    assert data.images.shape == (12, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [i % 10 for i in range(12)]


def test_missing_file_names_path_and_remedy(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "test")


def test_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataError, match="not a readable gzip"):
        read_idx(path, 3)


def test_wrong_header(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((5,), dtype=np.uint8))
    with pytest.raises(DataError, match="not an IDX file of 3-d"):
        read_idx(path, 3)


def test_truncated(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, 3)


def test_count_mismatch(tmp_path: Path) -> None:
    root = write_fake_fashion_mnist(tmp_path, train=30, test=12)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros((11,), dtype=np.uint8))
    with pytest.raises(DataError, match="12 images but .* 11 labels"):
        load_fashion_mnist(root, "test")


def test_calibration_draw_is_seeded_and_distinct() -> None:
    a = draw_calibration(1000, 64, seed=1005)
    assert torch.equal(a, draw_calibration(1000, 64, seed=1005))
    assert not torch.equal(a, draw_calibration(1000, 64, seed=1))
    assert len(set(a.tolist())) == 64 and bool((a[1:] > a[:-1]).all())
    with pytest.raises(DataError, match=r"\[1, 1000\]"):
        draw_calibration(1000, 1001, seed=0)


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = normalize(torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8))
    a = augment_crop_flip(x, torch.Generator().manual_seed(3))
    b = augment_crop_flip(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)


def test_augment_zero_pad_is_identity_or_flip() -> None:
    x = torch.randn(8, 1, 5, 5)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(8):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
