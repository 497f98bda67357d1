"""Shared test helpers: tiny models, tiny IDX datasets, a tiny repo for pipeline tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from ptqflow.data import FASHION_MNIST_FILES
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.quant.model import QuantModel, calibrate_activations
from ptqflow.units import Unit


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip-compressed IDX file."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def write_fake_fashion_mnist(root: Path, train: int = 96, test: int = 40, seed: int = 0) -> Path:
    """Four IDX files shaped like Fashion-MNIST with random images and labels 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        write_idx(root / images_name, rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(root / labels_name, np.arange(n) % 10)
    return root


class TinyResNet(nn.Module):
    """Stem + two BasicBlocks (one with a projection shortcut) + head; 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def example_inputs(n: int = 4) -> torch.Tensor:
        return torch.randn(n, 3, 8, 8)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Two float32 evaluations of one function in different op orders (BN folded, units split, another
    thread count): elementwise close within ``rel`` of the output's largest magnitude (at least 1e-4), as a
    fixed ``atol`` is not for a deep random-BN net whose logits reach about 100 (ResNet-50: a logit near zero
    differed by 1.9e-4 between 1 and 2 threads)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=max(1e-4, rel * scale), rtol=1e-3)


class TinyMobileNet(nn.Module):
    """Stem (conv+BN+ReLU6) + two InvertedResiduals (one with a residual add) + head; 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual
        from torchvision.ops.misc import Conv2dNormActivation

        self.features = nn.Sequential(
            Conv2dNormActivation(3, 8, activation_layer=nn.ReLU6),
            InvertedResidual(8, 8, 1, expand_ratio=2),
            InvertedResidual(8, 16, 2, expand_ratio=2),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))

    @staticmethod
    def example_inputs(n: int = 4) -> torch.Tensor:
        return torch.randn(n, 3, 8, 8)


def write_fake_image_folder(
    root: Path, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0
) -> Path:
    """An ImageNet-style folder ``root/{train,val}/<class>/<image>`` of small random images.

    Sizes vary (24-48 px, non-square) and formats alternate between JPEG and PNG, with one grayscale
    image, so the resize, crop and RGB conversion paths all run.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(24, 49)), int(rng.integers(24, 49))
                if i == 1:
                    image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
                else:
                    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
                ext = "JPEG" if i % 2 == 0 else "png"
                image.save(folder / f"img_{i:04d}.{ext}")
    return root


def calibrate_on(model: QuantModel, x: torch.Tensor) -> QuantModel:
    """Initialise ``model``'s activation ranges on one batch ``x``: each unit's FP input (quantization
    off while propagating), then the Lp (2.4) search on CPU. Returns ``model``, quantization back on."""
    model.set_quant_state(False, False)
    with torch.no_grad():
        inputs = [x]
        for unit in model.units[:-1]:
            inputs.append(unit(inputs[-1]))
    calibrate_activations(model, lambda i: iter([inputs[i]]), 2.4, torch.device("cpu"))
    return model


def feature_store(
    units: list[Unit], x: torch.Tensor, labels: torch.Tensor, path: Path, chunk_size: int, shard_size: int
) -> FeatureStore:
    """A feature store of the FP ``units`` over the one batch ``x`` (CPU), opened for reading."""
    with torch.no_grad():
        shapes, h = [], x[:1]
        for unit in units:
            h = unit.module(h)
            shapes.append(tuple(h.shape[1:]))
    writer = FeatureStoreWriter(
        path, [u.name for u in units], tuple(x.shape[1:]), shapes, len(x), chunk_size=chunk_size, shard_size=shard_size
    )
    extract_features([u.module for u in units], iter([(x, labels)]), writer, torch.device("cpu"))
    return FeatureStore.open(path)
