"""Stage ``predict``: the test-set logits of the FP model and of every quantized model (the expensive half
of evaluation), plus each model's size and bit-widths, in ``data/predict/``.

Split from ``evaluate`` so that the DAG matches what changes predictions: this stage depends on the
models, the test set and ``predict.batch_size`` only, and ``evaluate`` (which turns logits into metrics
and plots) reruns alone, in seconds, when a reporting key such as ``evaluate.topk`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_json
from ptqflow.data import normalize
from ptqflow.errors import ConfigError, ModelError
from ptqflow.evaluate import Batches, freeze_weights, predict_logits
from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.quant.model import load_quant_file
from ptqflow.sensitivity import layer_infos
from stages.common import load_fp_model, load_split, resolve_device, track
from stages.params import BaseConfig, section

#: Files of the output folder.
LOGITS, MODELS = "logits.pt", "models.json"


@dataclass(frozen=True)
class PredictConfig:
    """Args:
    batch_size: test images per forward pass.
    """

    batch_size: int = 500

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def _fp_size_mb(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in fold_bn(model).parameters()) * 4 / 2**20, 4)


def run(params: dict[str, Any], test: Path, model_dirs: dict[str, list[Path]], out: Path) -> list[str]:
    """Write ``out/logits.pt`` (``{"labels", "logits": {model key: (N, classes)}}``) and ``out/models.json``.

    Args:
        params: loaded params.
        test: ``test.pt`` from prepare.
        model_dirs: method name (``rtn``, ``recon``, ...) -> folders of ``<config>.pt`` quantized models.
        out: the output folder.

    Returns:
        The model keys: ``fp`` and ``<method>/<config>`` for every quantized model.
    """
    base = section(params, "base", BaseConfig)
    config = section(params, "predict", PredictConfig)
    device = resolve_device(base.device)
    data = load_split(test)
    jobs: list[tuple[str, str, Path | None]] = [("fp", "", None)]
    for method, folders in model_dirs.items():
        if method == "fp" or "/" in method:
            raise ConfigError(f"--models method names may not be 'fp' or hold '/', got {method!r}")
        files = sorted((p for folder in folders for p in Path(folder).glob("*.pt")), key=lambda p: p.stem)
        if not files:
            shown = ", ".join(str(f) for f in folders)
            raise ModelError(f"no quantized models (*.pt) in {shown}; rerun the stage that writes it")
        jobs += [(method, path.stem, path) for path in files]
    logits: dict[str, torch.Tensor] = {}
    models: dict[str, Any] = {}
    batches = -(-len(data) // config.batch_size)
    for method, name, path in jobs:
        key = f"{method}/{name}" if name else method

        def progress(stream: Batches, label: str = f"predict {key}") -> Batches:
            return track(stream, batches, label)

        if path is None:
            fp_model = load_fp_model(base).to(device)
            logits[key] = predict_logits(fp_model, data, config.batch_size, normalize, device, progress)
            models[key] = {"size_mb": _fp_size_mb(fp_model), "weight_bits": 32, "act_bits": 32, "avg_weight_bits": 32}
            continue
        model, _, qconfig = load_quant_file(path, build_model)
        size_mb = round(model.size_bytes() / 2**20, 4)
        infos = layer_infos(model, normalize(data.images[:1]), qconfig.first_last_weight_bits)
        bits = {n: layer.weight_quantizer.bits for n, layer in model.quant_layers()}
        freeze_weights(model)
        logits[key] = predict_logits(model.to(device), data, config.batch_size, normalize, device, progress)
        models[key] = {
            "size_mb": size_mb,
            "weight_bits": qconfig.weight_bits,
            "act_bits": qconfig.act_bits,
            # parameter-weighted over every layer, first/last included (for mixed precision, the real mean)
            "avg_weight_bits": round(sum(i.params * bits[i.name] for i in infos) / sum(i.params for i in infos), 4),
            "gbitops": round(sum(i.macs * bits[i.name] * (i.input_bits or qconfig.act_bits) for i in infos) / 1e9, 6),
        }
    with atomic_dir(out) as tmp:
        atomic_save_torch({"labels": data.labels.clone(), "logits": logits}, tmp / LOGITS)
        atomic_write_json(tmp / MODELS, models)
    return list(logits)
