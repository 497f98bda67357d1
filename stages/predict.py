"""Stage ``predict``: the test-set logits of the FP model and of every quantized model (the expensive half
of evaluation), plus each model's size and bit-widths, in ``data/predict/``. Every quantized model runs
twice: its fake-quant forward, and integer-exact as a deployed integer runtime computes it
(:class:`ptqflow.integer.IntegerModel`: int32 accumulation and bias, float-multiplier requantization).

Split from ``evaluate`` so that the DAG matches what changes predictions: this stage depends on the
models, the test set and ``predict.batch_size`` only, and ``evaluate`` (which turns logits into metrics
and plots) reruns alone, in seconds, when a reporting key such as ``evaluate.topk`` changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_json
from ptqflow.data import normalize
from ptqflow.errors import ConfigError, ModelError
from ptqflow.evaluate import Batches, freeze_weights, predict_logits, predict_logits_many
from ptqflow.fold import fold_bn
from ptqflow.imagefolder import normalize_channels
from ptqflow.integer import IntegerModel
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, QuantModel, load_quant_file
from ptqflow.sensitivity import layer_infos
from stages.common import load_fp_model, load_split, open_image_test_set, resolve_device, track
from stages.params import BaseConfig, section

#: Files of the output folder.
LOGITS, MODELS = "logits.pt", "models.json"
#: Suffix of a model's integer-exact logits among the computed ones (split into ``logits_int`` on writing).
INT = "#int"


@dataclass(frozen=True)
class PredictConfig:
    """Args:
    batch_size: test images per forward pass.
    workers: image folders: processes decoding test images (0: in the main process).
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


def _quant_info(model: QuantModel, qconfig: QuantConfig, example: torch.Tensor) -> dict[str, Any]:
    """Size, nominal and average weight bits, and BitOPs of one quantized model."""
    infos = layer_infos(model, example, qconfig.first_last_weight_bits)
    bits = {n: layer.weight_quantizer.bits for n, layer in model.quant_layers()}
    leaves = {"float_leaves": model.float_leaves} if model.float_leaves else {}  # not quantized as named
    return {
        **leaves,
        "size_mb": round(model.size_bytes() / 2**20, 4),
        "weight_bits": qconfig.weight_bits,
        "act_bits": qconfig.act_bits,
        # parameter-weighted over every layer, first/last included (for mixed precision, the real mean)
        "avg_weight_bits": round(sum(i.params * bits[i.name] for i in infos) / sum(i.params for i in infos), 4),
        "gbitops": round(sum(i.macs * bits[i.name] * (i.input_bits or qconfig.act_bits) for i in infos) / 1e9, 6),
    }


def _model_files(model_dirs: dict[str, list[Path]]) -> list[tuple[str, Path]]:
    """``(model key, file)`` for every quantized model, ``<method>/<config>``."""
    found = []
    for method, folders in model_dirs.items():
        if method == "fp" or "/" in method:
            raise ConfigError(f"--models method names may not be 'fp' or hold '/', got {method!r}")
        files = sorted((p for folder in folders for p in Path(folder).glob("*.pt")), key=lambda p: p.stem)
        if not files:
            shown = ", ".join(str(f) for f in folders)
            raise ModelError(f"no quantized models (*.pt) in {shown}; rerun the stage that writes it")
        found += [(f"{method}/{path.stem}", path) for path in files]
    return found


def run(
    params: dict[str, Any], test: Path, model_dirs: dict[str, list[Path]], out: Path, images: Path | None = None
) -> list[str]:
    """Write ``out/logits.pt`` (``{"labels", "logits": {model key: (N, classes)}, "logits_int": {quantized
    model key: (N, classes)}}``) and ``out/models.json``.

    Args:
        params: loaded params.
        test: ``test.pt`` from prepare, or ``test.json`` (an image-folder index, streamed from ``images``).
        model_dirs: method name (``rtn``, ``recon``, ...) -> folders of ``<config>.pt`` quantized models.
        out: the output folder.
        images: the image folder's root the index's paths are relative to (``test.json`` only).

    Returns:
        The model keys: ``fp`` and ``<method>/<config>`` for every quantized model.
    """
    base = section(params, "base", BaseConfig)
    config = section(params, "predict", PredictConfig)
    device = resolve_device(base.device)
    files = _model_files(model_dirs)
    if Path(test).suffix == ".json":
        labels, logits, models = _streamed(base, config, device, Path(test), images, files)
    else:
        labels, logits, models = _in_memory(base, config, device, Path(test), files)
    integer = {key[: -len(INT)]: logits.pop(key) for key in [k for k in logits if k.endswith(INT)]}
    with atomic_dir(out) as tmp:
        atomic_save_torch({"labels": labels, "logits": logits, "logits_int": integer}, tmp / LOGITS)
        atomic_write_json(tmp / MODELS, models)
    return list(logits)


Result = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]


def _in_memory(
    base: BaseConfig, config: PredictConfig, device: torch.device, test: Path, files: list[tuple[str, Path]]
) -> Result:
    """A test split held in memory (``test.pt``): one model at a time over all of it."""
    data = load_split(test)
    batches = -(-len(data) // config.batch_size)
    fp_model = load_fp_model(base).to(device)
    loaded = [(key, *load_quant_file(path, build_model)) for key, path in files]  # every file checked before any work
    logits = {"fp": predict_logits(fp_model, data, config.batch_size, normalize, device, _tracker(batches, "fp"))}
    models: dict[str, Any] = {"fp": _fp_info(fp_model)}
    for key, model, _, qconfig in loaded:
        models[key] = _quant_info(model, qconfig, normalize(data.images[:1]))
        logits[key + INT] = predict_logits(
            IntegerModel(model.to(device)), data, config.batch_size, normalize, device, _tracker(batches, key + " int")
        )
        freeze_weights(model)
        logits[key] = predict_logits(
            model.to(device), data, config.batch_size, normalize, device, _tracker(batches, key)
        )
    return data.labels.clone(), logits, models


def _streamed(
    base: BaseConfig,
    config: PredictConfig,
    device: torch.device,
    test: Path,
    images: Path | None,
    files: list[tuple[str, Path]],
) -> Result:
    """An image-folder test set (``test.json``): decode each batch once and run every model on it."""
    dataset, mean, std = open_image_test_set(test, images)
    example = normalize_channels(dataset[0][0][None], mean, std)
    fp_model = load_fp_model(base)
    models: dict[str, torch.nn.Module] = {"fp": fp_model}
    info: dict[str, Any] = {"fp": _fp_info(fp_model)}
    for key, path in files:
        model, _, qconfig = load_quant_file(path, build_model)
        info[key] = _quant_info(model, qconfig, example)
        models[key + INT] = IntegerModel(copy.deepcopy(model))
        models[key] = freeze_weights(model)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.workers
    )
    stream = ((normalize_channels(x, mean, std), y) for x, y in loader)
    logits, labels = predict_logits_many(models, track(stream, len(loader), "predict"), device)
    return labels, logits, info


def _tracker(total: int, key: str) -> Callable[[Batches], Batches]:
    def progress(stream: Batches) -> Batches:
        return track(stream, total, f"predict {key}")

    return progress


def _fp_info(model: torch.nn.Module) -> dict[str, Any]:
    return {"size_mb": _fp_size_mb(model), "weight_bits": 32, "act_bits": 32, "avg_weight_bits": 32}
