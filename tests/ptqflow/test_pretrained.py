"""The committed FP checkpoints match their manifest and load into their architectures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ptqflow.models import EMBEDDED_MODELS, build_model, load_weights

PRETRAINED = Path(__file__).resolve().parents[2] / "data" / "pretrained"
MANIFEST = json.loads((PRETRAINED / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_checkpoint_matches_manifest(name: str) -> None:
    entry = MANIFEST[name]
    data = (PRETRAINED / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    load_weights(build_model(name), PRETRAINED / entry["file"])
    assert entry["command"].startswith("cd pipelines/train && dvc repro")


def test_embedded_models_are_released() -> None:
    assert set(MANIFEST) == set(EMBEDDED_MODELS) == {"resnet20", "mobilenetv2_s", "mobilenetv3_s", "vit_s"}
    assert MANIFEST["resnet20"]["test_top1"] > 92.0
