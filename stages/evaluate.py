"""Stage ``evaluate``: top-1/top-5 and size of the FP model and of every quantized model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_write_json
from ptqflow.data import normalize
from ptqflow.errors import ConfigError, ModelError
from ptqflow.evaluate import accuracy, predict_logits
from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.quant.model import load_quant_file
from stages.common import load_fp_model, load_split, resolve_device
from stages.params import BaseConfig, section


@dataclass(frozen=True)
class EvaluateConfig:
    """Args:
    batch_size: test images per forward pass.
    """

    batch_size: int = 500

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def _fp_size_mb(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in fold_bn(model).parameters()) * 4 / 2**20, 4)


def run(params: dict[str, Any], test: Path, model_dirs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Evaluate and write ``out``.

    Args:
        params: loaded params.
        test: ``test.pt`` from prepare.
        model_dirs: method name (``rtn``, ...) -> folder of ``<config>.pt`` quantized models.
        out: the metrics JSON.
    """
    base = section(params, "base", BaseConfig)
    config = section(params, "evaluate", EvaluateConfig)
    device = resolve_device(base.device)
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
