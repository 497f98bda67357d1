"""Stage ``evaluate``: top-1/top-5 and size of the FP model and of every quantized model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_write_json
from ptqflow.data import normalize
from ptqflow.errors import ConfigError, DataError, ModelError
from ptqflow.evaluate import accuracy, predict_logits, predict_logits_many
from ptqflow.fold import fold_bn
from ptqflow.imagefolder import ImageFolderDataset, ImageIndex, normalize_channels
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, QuantModel, load_quant_file
from stages.common import load_fp_model, load_split, resolve_device
from stages.params import BaseConfig, section


@dataclass(frozen=True)
class EvaluateConfig:
    """Args:
    batch_size: test images per forward pass.
    workers: image folders: processes decoding validation images (0: in the main process).
    """

    batch_size: int = 500
    workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


def _fp_size_mb(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in fold_bn(model).parameters()) * 4 / 2**20, 4)


def run(
    params: dict[str, Any], test: Path, model_dirs: dict[str, Path], out: Path, images: Path | None = None
) -> dict[str, Any]:
    """Evaluate and write ``out``.

    Args:
        params: loaded params.
        test: ``test.pt`` from prepare, or ``test.json`` (an image-folder index).
        model_dirs: method name (``rtn``, ...) -> folder of ``<config>.pt`` quantized models.
        out: the metrics JSON.
        images: the image folder's root the index's paths are relative to (``test.json`` only).
    """
    base = section(params, "base", BaseConfig)
    config = section(params, "evaluate", EvaluateConfig)
    device = resolve_device(base.device)
    if Path(test).suffix == ".json":
        if images is None:
            raise DataError(f"{test} is an image-folder index: pass the folder's root with --images")
        return _run_streamed(base, config, device, Path(test), Path(images), model_dirs, out)
    data = load_split(test)
    fp_model = load_fp_model(base).to(device)
    logits = predict_logits(fp_model, data, config.batch_size, normalize, device)
    metrics: dict[str, Any] = {
        "samples": len(data),
        "fp": {**accuracy(logits, data.labels), "size_mb": _fp_size_mb(fp_model)},
    }
    for method, folder in model_dirs.items():
        files = sorted(Path(folder).glob("*.pt"))
        if not files:
            raise ModelError(f"no quantized models (*.pt) in {folder}; rerun the stage that writes it")
        metrics[method] = {}
        for path in files:
            model, _, qconfig = load_quant_file(path, build_model)
            logits = predict_logits(model.to(device), data, config.batch_size, normalize, device)
            metrics[method][path.stem] = {
                **accuracy(logits, data.labels),
                "size_mb": round(model.size_bytes() / 2**20, 4),
                "weight_bits": qconfig.weight_bits,
                "act_bits": qconfig.act_bits,
            }
    atomic_write_json(out, metrics)
    return metrics


def _quant_models(model_dirs: dict[str, Path]) -> dict[str, dict[str, tuple[QuantModel, QuantConfig]]]:
    found: dict[str, dict[str, tuple[QuantModel, QuantConfig]]] = {}
    for method, folder in model_dirs.items():
        files = sorted(Path(folder).glob("*.pt"))
        if not files:
            raise ModelError(f"no quantized models (*.pt) in {folder}; rerun the stage that writes it")
        found[method] = {}
        for path in files:
            model, _, qconfig = load_quant_file(path, build_model)
            found[method][path.stem] = (model, qconfig)
    return found


def _run_streamed(
    base: BaseConfig,
    config: EvaluateConfig,
    device: torch.device,
    test: Path,
    root: Path,
    model_dirs: dict[str, Path],
    out: Path,
) -> dict[str, Any]:
    """Image-folder test sets: decode each validation batch once and run every model on it."""
    if not test.is_file():
        raise DataError(f"{test} not found; run the prepare stage first (dvc repro prepare)")
    try:
        raw = json.loads(test.read_text())
    except (OSError, ValueError):
        raise DataError(f"{test} is not a JSON image index; rerun dvc repro prepare") from None
    index = ImageIndex.from_json(raw, str(test))
    try:
        pre = raw["preprocess"]
        resize, crop = int(pre["resize"]), int(pre["crop"])
        mean, std = tuple(float(v) for v in pre["mean"]), tuple(float(v) for v in pre["std"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{test} lacks its preprocessing (resize, crop, mean, std); rerun dvc repro prepare") from None
    dataset = ImageFolderDataset(root, index, resize, crop)
    fp_model = load_fp_model(base)
    quantized = _quant_models(model_dirs)
    models: dict[str, torch.nn.Module] = {"fp": fp_model}
    for method, entries in quantized.items():
        for name, (model, _) in entries.items():
            models[f"{method}/{name}"] = model
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.workers
    )
    batches = ((normalize_channels(images, mean, std), labels) for images, labels in loader)
    logits, labels = predict_logits_many(models, batches, device)
    metrics: dict[str, Any] = {
        "samples": len(index),
        "fp": {**accuracy(logits["fp"], labels), "size_mb": _fp_size_mb(fp_model)},
    }
    for method, entries in quantized.items():
        metrics[method] = {}
        for name, (model, qconfig) in entries.items():
            metrics[method][name] = {
                **accuracy(logits[f"{method}/{name}"], labels),
                "size_mb": round(model.size_bytes() / 2**20, 4),
                "weight_bits": qconfig.weight_bits,
                "act_bits": qconfig.act_bits,
            }
    atomic_write_json(out, metrics)
    return metrics
