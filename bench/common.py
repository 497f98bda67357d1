"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

from pathlib import Path

import torch

from ptqflow.data import LabelledImages, normalize
from ptqflow.evaluate import accuracy, predict_logits
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.models import build_model, load_weights
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations
from ptqflow.units import extract_units
from stages.common import load_split

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pretrained(name: str) -> torch.nn.Module:
    """An embedded model with its released weights (data/pretrained)."""
    return load_weights(build_model(name), ROOT / "data" / "pretrained" / f"{name}.pt").eval()


def build_store(fp: torch.nn.Module, samples: int, path: Path) -> FeatureStore:
    """A feature store of ``fp`` over the first ``samples`` images of data/prepare/calibration.pt."""
    data = load_split(ROOT / "data" / "prepare" / "calibration.pt")
    units = extract_units(fold_bn(fp))
    x = normalize(data.images[:samples])
    with torch.no_grad():
        shapes, h = [], x[:1]
        for u in units:
            h = u.module(h)
            shapes.append(tuple(h.shape[1:]))
    writer = FeatureStoreWriter(path, [u.name for u in units], tuple(x.shape[1:]), shapes, len(x))
    batches = ((x[i : i + 64], data.labels[i : i + 64]) for i in range(0, len(x), 64))
    extract_features([u.module for u in units], batches, writer, DEVICE)
    return FeatureStore.open(path)


def rtn_model(
    fp: torch.nn.Module, store: FeatureStore, config: QuantConfig, device: torch.device = DEVICE
) -> QuantModel:
    """The round-to-nearest model of ``fp``: weight ranges searched, activation ranges from the store's
    first 256 unit inputs (batches of 64), as the ``quantize`` stage does."""
    model = build_quant_model(fp, config)
    calibrate_activations(model, lambda unit: store.iter_inputs(unit, 64, 256), 2.4, device)
    return model


def test_top1(model: torch.nn.Module, test: LabelledImages) -> float:
    """Top-1 (%) of ``model`` on the prepared test split, batches of 500 (what every bench table reports)."""
    return accuracy(predict_logits(model, test, 500, normalize, DEVICE), test.labels)["top1"]
