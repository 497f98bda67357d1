"""Per-model training keys (pipelines/train/params.yaml: ``train.models.<name>``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ptqflow.errors import ConfigError
from stages.params import load_params
from stages.train import train_config

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_apply_to_their_model_only() -> None:
    params = {"train": {"lr": 0.1, "epochs": 3, "models": {"vit_s": {"optimizer": "adamw", "lr": 0.001}}}}
    vit, cnn = train_config(params, "vit_s"), train_config(params, "resnet20")
    assert (vit.optimizer, vit.lr, vit.epochs) == ("adamw", 0.001, 3)
    assert (cnn.optimizer, cnn.lr, cnn.epochs) == ("sgd", 0.1, 3)


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"vit_b": {"lr": 0.1}}, r"train\.models\.vit_b: not an embedded model; allowed: \["),
        ({"vit_s": {"lrate": 0.1}}, r"unknown key train\.models\.vit_s\.lrate"),
        ({"vit_s": {"optimizer": "lion"}}, r"train\.models\.vit_s\.optimizer must be one of 'sgd', 'adamw'"),
        ([1, 2], r"train\.models must map model names to train keys"),
    ],
)
def test_bad_overrides_are_one_line_errors(models: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        train_config({"train": {"models": models}}, "vit_s")
    assert "\n" not in str(info.value)


def test_the_committed_training_params_parse() -> None:
    params = load_params(ROOT / "pipelines" / "train" / "params.yaml")
    assert train_config(params, "vit_s").optimizer == "adamw"
    assert train_config(params, "resnet20").optimizer == "sgd"
