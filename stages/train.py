"""Stage ``train`` (pipelines/train): train an embedded FP model on Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptqflow.atomic import atomic_save_torch, atomic_write_json
from ptqflow.data import load_fashion_mnist
from ptqflow.errors import ConfigError
from ptqflow.models import EMBEDDED_MODELS, build_model
from ptqflow.train import TrainConfig, train_classifier
from stages.common import resolve_device, seed_everything
from stages.params import BaseConfig, parse_dataclass, section
from stages.prepare import PrepareConfig


def train_config(params: dict[str, Any], model_name: str) -> TrainConfig:
    """``train.*`` with ``train.models.<model_name>.*`` on top (per-model keys, e.g. AdamW for the ViT).

    Raises:
        ConfigError: ``train.models`` is not a mapping of embedded model names to mappings of train keys.
    """
    data = dict(params.get("train") or {})
    overrides = data.pop("models", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"train.models must map model names to train keys, got {type(overrides).__name__}")
    for name, keys in overrides.items():
        if name not in EMBEDDED_MODELS:
            raise ConfigError(f"train.models.{name}: not an embedded model; allowed: {sorted(EMBEDDED_MODELS)}")
        if "models" in (keys or {}):
            raise ConfigError(f"train.models.{name}.models: overrides do not nest")
        parse_dataclass(TrainConfig, keys, f"train.models.{name}")  # an unknown or bad key named where it is
    return section({"train": {**data, **(overrides.get(model_name) or {})}}, "train", TrainConfig)


def run(params: dict[str, Any], model_name: str, out: Path, metrics: Path) -> dict[str, float]:
    """Train ``model_name`` with ``train.*`` params; write the state_dict and per-epoch metrics."""
    base = section(params, "base", BaseConfig)
    config = train_config(params, model_name)
    prepare = section(params, "prepare", PrepareConfig)
    device = resolve_device(base.device)
    train_set = load_fashion_mnist(Path(prepare.data_root), "train")
    test_set = load_fashion_mnist(Path(prepare.data_root), "test")
    seed_everything(config.seed)
    model = build_model(model_name)
    history = train_classifier(model, train_set, test_set, config, device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save_torch(state, out)
    final = {"model": model_name, **history[-1], "history": history}
    final.pop("seconds")
    for row in history:
        row.pop("seconds")  # wall time is not reproducible; it is logged, not tracked
    atomic_write_json(metrics, final)
    return history[-1]


def publish(
    model_name: str, checkpoint: Path, metrics: Path, dest: Path, train_params: dict[str, Any]
) -> dict[str, Any]:
    """Copy a trained checkpoint to ``dest/<model>.pt`` and record it in ``dest/manifest.json``.

    The manifest pins the file's sha256, its measured test accuracy, the training params and the
    command that made it; tests check the committed files against it.
    """
    import hashlib
    import json

    from ptqflow.atomic import atomic_write_bytes
    from ptqflow.models import build_model, load_weights

    load_weights(build_model(model_name), checkpoint)  # refuse a file of another architecture
    result = json.loads(Path(metrics).read_text())
    data = Path(checkpoint).read_bytes()
    atomic_write_bytes(dest / f"{model_name}.pt", data)
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[model_name] = {
        "file": f"{model_name}.pt",
        "sha256": hashlib.sha256(data).hexdigest(),
        "dataset": "fashion-mnist",
        "test_top1": result["test_top1"],
        "test_top5": result["test_top5"],
        "train": train_params,
        "command": f"cd pipelines/train && dvc repro train@{model_name} && cd ../.. && "
        f"ptqflow publish-weights --model {model_name}",
    }
    atomic_write_json(manifest_path, manifest)
    return manifest[model_name]
