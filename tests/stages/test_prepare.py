"""``prepare`` on an ImageNet-style folder (``prepare.dataset: imagefolder``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import write_fake_image_folder

from ptqflow.errors import ConfigError, DataError
from ptqflow.imagefolder import ImageIndex
from stages import prepare


def _params(root: Path, **extra: object) -> dict:
    return {
        "prepare": {
            "dataset": "imagefolder",
            "data_root": str(root),
            "calib_size": 5,
            "image_size": 16,
            "resize_size": 20,
            **extra,
        }
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, train_per_class=4, val_per_class=2)


def test_imagefolder_outputs_are_small_checksummed_and_deterministic(root: Path, tmp_path: Path) -> None:
    manifest = prepare.run(_params(root), tmp_path / "a")
    prepare.run(_params(root), tmp_path / "b")
    for name in ("calibration.pt", "test.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not (tmp_path / "a" / "test.pt").exists()  # the test set stays on disk, only indexed

    calib = torch.load(tmp_path / "a" / "calibration.pt", weights_only=True)
    assert calib["images"].shape == (5, 3, 16, 16) and calib["images"].dtype == torch.uint8
    assert calib["mean"].tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert manifest["calibration"]["count"] == 5 and len(manifest["calibration"]["files"]) == 5
    assert all(f.startswith("train/") for f in manifest["calibration"]["files"])

    raw = json.loads((tmp_path / "a" / "test.json").read_text())
    index = ImageIndex.from_json(raw, "test.json")
    assert len(index) == 6 and raw["preprocess"]["resize"] == 20 and raw["preprocess"]["crop"] == 16
    assert str(root) not in (tmp_path / "a" / "test.json").read_text()  # relative paths only
    assert str(root) not in (tmp_path / "a" / "manifest.json").read_text()


def test_seed_changes_the_draw_and_the_crops(root: Path, tmp_path: Path) -> None:
    prepare.run(_params(root), tmp_path / "a")
    prepare.run(_params(root, seed=7), tmp_path / "b")
    a = torch.load(tmp_path / "a" / "calibration.pt", weights_only=True)["images"]
    b = torch.load(tmp_path / "b" / "calibration.pt", weights_only=True)["images"]
    assert not torch.equal(a, b)
    assert (tmp_path / "a" / "test.json").read_bytes() == (tmp_path / "b" / "test.json").read_bytes()


def test_calibration_larger_than_train(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"prepare.calib_size must be in \[1, 12\]"):
        prepare.run(_params(root, calib_size=13), tmp_path / "out")


def test_train_and_val_classes_must_match(root: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(root, tmp_path / "copy")
    shutil.rmtree(copy / "val" / "n00000002")
    with pytest.raises(DataError, match="different class folders"):
        prepare.run(_params(copy), tmp_path / "out")


def test_resize_smaller_than_crop_is_rejected(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resize_size must be >= image_size"):
        prepare.run(_params(root, resize_size=8), tmp_path / "out")
