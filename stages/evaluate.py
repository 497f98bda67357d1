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
from ptqflow.sensitivity import layer_infos
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


def run(params: dict[str, Any], test: Path, model_dirs: dict[str, list[Path]], out: Path) -> dict[str, Any]:
    """Evaluate and write ``out``.

    Args:
        params: loaded params.
        test: ``test.pt`` from prepare.
        model_dirs: method name (``rtn``, ...) -> folders of ``<config>.pt`` quantized models.
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
    for method, folders in model_dirs.items():
        files = sorted((p for folder in folders for p in Path(folder).glob("*.pt")), key=lambda p: p.stem)
        if not files:
            shown = ", ".join(str(f) for f in folders)
            raise ModelError(f"no quantized models (*.pt) in {shown}; rerun the stage that writes it")
        metrics[method] = {}
        for path in files:
            model, _, qconfig = load_quant_file(path, build_model)
            logits = predict_logits(model.to(device), data, config.batch_size, normalize, device)
            infos = layer_infos(model, normalize(data.images[:1]).to(device), qconfig.first_last_weight_bits)
            bits = {n: layer.weight_quantizer.bits for n, layer in model.quant_layers()}
            metrics[method][path.stem] = {
                **accuracy(logits, data.labels),
                "size_mb": round(model.size_bytes() / 2**20, 4),
                "weight_bits": qconfig.weight_bits,
                "act_bits": qconfig.act_bits,
                # parameter-weighted over every layer, first/last included (mixed precision: the real mean)
                "avg_weight_bits": round(
                    sum(i.params * bits[i.name] for i in infos) / sum(i.params for i in infos), 4
                ),
                "gbitops": round(
                    sum(i.macs * bits[i.name] * (i.input_bits or qconfig.act_bits) for i in infos) / 1e9, 6
                ),
            }
    atomic_write_json(out, metrics)
    return metrics
