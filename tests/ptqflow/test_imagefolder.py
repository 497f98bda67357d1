from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_fake_image_folder
from PIL import Image
from torchvision import transforms

from ptqflow.errors import DataError
from ptqflow.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageIndex,
    calibration_crops,
    eval_crop,
    normalize_channels,
    random_resized_crop_box,
    read_rgb,
    scan_image_folder,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, train_per_class=4, val_per_class=2)


def test_scan_orders_by_class_then_path(root: Path) -> None:
    (root / "train" / "n00000000" / "notes.txt").write_text("not an image")
    index = scan_image_folder(root, "train")
    assert index.classes == ("n00000000", "n00000001", "n00000002")
    assert len(index) == 12 and index.labels == tuple(c for c in range(3) for _ in range(4))
    assert index.files[:2] == ("train/n00000000/img_0000.JPEG", "train/n00000000/img_0001.png")
    assert all(not f.endswith(".txt") for f in index.files)


def test_scan_errors(tmp_path: Path, root: Path) -> None:
    with pytest.raises(DataError, match="split not found.*<class>/<image>"):
        scan_image_folder(root, "test")
    (tmp_path / "val" / "empty_class").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        scan_image_folder(tmp_path, "val")


def test_index_round_trip_and_checksum(root: Path) -> None:
    index = scan_image_folder(root, "val")
    data = json.loads(json.dumps(index.to_json(split="val")))
    assert ImageIndex.from_json(data, "t.json") == index and data["count"] == 6
    data["files"][0][1] = 2  # a relabelled file no longer matches the checksum
    with pytest.raises(DataError, match="does not match its checksum"):
        ImageIndex.from_json(data, "t.json")
    with pytest.raises(DataError, match="not a ptqflow image index"):
        ImageIndex.from_json({"files": []}, "t.json")


@pytest.mark.parametrize(("width", "height"), [(48, 32), (500, 375), (300, 10), (10, 300)])
def test_crop_box_inside_the_image(width: int, height: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(width, height, generator)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        if width == 300 and height == 10:  # too wide for any 3/4..4/3 box: the centered fallback
            assert (top, left, h, w) == (0, (300 - 13) // 2, 10, 13)


def test_calibration_crops_are_fixed_by_the_seed(root: Path) -> None:
    files = scan_image_folder(root, "train").files[:5]
    a = calibration_crops(root, files, 16, seed=1005)
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, calibration_crops(root, files, 16, seed=1005))
    assert not torch.equal(a, calibration_crops(root, files, 16, seed=1006))


def test_eval_crop_matches_torchvision_resize_center_crop(root: Path) -> None:
    image = read_rgb(root / "val/n00000001/img_0000.JPEG")
    reference = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.PILToTensor()])(image)
    assert torch.equal(eval_crop(image, 36, 32), reference)  # shorter side to 36, not a square resize


def test_grayscale_files_become_rgb(root: Path) -> None:
    with Image.open(root / "val/n00000000/img_0001.png") as image:
        assert image.mode == "L"
    assert read_rgb(root / "val/n00000000/img_0001.png").mode == "RGB"


def test_normalize_matches_torchvision() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    reference = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(images.float() / 255)
    torch.testing.assert_close(normalize_channels(images), reference)


def test_dataset_streams_center_crops(root: Path) -> None:
    index = scan_image_folder(root, "val")
    dataset = ImageFolderDataset(root, index, 36, 32)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == list(index.labels[:4])


def test_unreadable_image(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot read image"):
        read_rgb(tmp_path / "bad.jpg")
