"""The ImageNet presets (pipelines/imagenet-*/) run end to end through ``dvc repro``.

Each preset is copied into a temporary git+DVC repo with the library, its FP weights file is written at
the path its params.yaml names (random init, the real architecture), and its params are shrunk: a tiny
generated image folder, 32x32 crops, 8 calibration images, one bit pair (W2A4) and 2 iterations. What stays is the
wiring: the stage commands, paths relative to the preset folder, declared deps/params and the stream
from image folder to metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_fake_image_folder

from ptqflow.models import build_model

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.name for p in (ROOT / "pipelines").glob("imagenet-*"))
#: Every preset's DAG run is marked slow: the presets' dvc.yaml files are renderings of the one pipeline
#: table (tests/stages/test_template.py), and the image-folder path (prepare, features, predict, export) of
#: that table runs by default in tests/stages/test_init.py and tests/stages/test_export.py.


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _shrink(params: dict, data_root: Path) -> dict:
    params["base"]["device"] = "cpu"
    size = 224 if "vit" in params["base"]["model"] else 32  # a ViT's position embedding fixes its input size
    params["prepare"].update(data_root=str(data_root), calib_size=8, image_size=size, resize_size=size + size // 8)
    params["features"].update(batch_size=8, chunk_size=8, shard_size=8)
    params["quantize"]["bits"] = {"w2a4": params["quantize"]["bits"]["w2a4"]}  # one pair: the wiring is the same
    params["quantize"].update(calib_size=8, batch_size=8)
    params["reconstruct"].update(targets=["w2a4"], iters=2, act_iters=1, batch_size=4)
    params["predict"].update(batch_size=4, workers=0)
    params["evaluate"]["topk"] = [1]  # the generated folder has 3 classes: top-5 is refused by the check stage
    return params


def test_every_paper_model_has_a_preset() -> None:
    models = {yaml.safe_load((ROOT / "pipelines" / p / "params.yaml").read_text())["base"]["model"] for p in PRESETS}
    assert models == {
        f"torchvision.{m}"
        for m in ("resnet18", "resnet50", "mobilenet_v2", "regnet_x_600mf", "regnet_x_3_2gf", "mnasnet1_0", "vit_b_16")
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_params_parse_strictly(preset: str) -> None:
    from stages.evaluate import EvaluateConfig
    from stages.features import FeaturesConfig
    from stages.params import BaseConfig, load_params, section
    from stages.predict import PredictConfig
    from stages.prepare import PrepareConfig
    from stages.quantize import QuantizeConfig
    from stages.reconstruct import ReconstructConfig

    params = load_params(ROOT / "pipelines" / preset / "params.yaml")
    base = section(params, "base", BaseConfig)
    assert base.model.startswith("torchvision.") and not Path(base.weights).is_absolute()
    assert section(params, "prepare", PrepareConfig).dataset == "imagefolder"
    section(params, "features", FeaturesConfig)
    section(params, "quantize", QuantizeConfig)
    recon = section(params, "reconstruct", ReconstructConfig)
    expected_lambda = {"mobilenet_v2": 0.1, "mnasnet1_0": 0.2}.get(base.model.split(".", 1)[1], 0.01)
    assert recon.reg_weight == expected_lambda and recon.iters == 20000 and recon.batch_size == 32
    section(params, "predict", PredictConfig)
    section(params, "evaluate", EvaluateConfig)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_dag_runs(preset: str, tmp_path: Path) -> None:
    began = time.perf_counter()
    repo = tmp_path / "repo"
    for item in ("src", "stages"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
    folder = repo / "pipelines" / preset
    shutil.copytree(ROOT / "pipelines" / preset, folder, ignore=shutil.ignore_patterns("data", "weights", "metrics"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    reg_weight = params["reconstruct"]["reg_weight"]
    assert params["reconstruct"]["iters"] == 20000 and params["prepare"]["calib_size"] == 1024
    assert params["prepare"]["seed"] == 1005 and params["reconstruct"]["keep_prob"] == 0.5
    assert {"w4a4", "w2a4"} <= set(params["reconstruct"]["targets"]) <= set(params["quantize"]["bits"])
    weights = folder / params["base"]["weights"]
    weights.parent.mkdir(parents=True)
    torch.save(build_model(params["base"]["model"]).state_dict(), weights)
    data_root = write_fake_image_folder(tmp_path / "imagenet", classes=3, train_per_class=4, val_per_class=2)
    (folder / "params.yaml").write_text(yaml.safe_dump(_shrink(params, data_root), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)

    log = _run(["dvc", "repro"], folder)

    ran = sorted(line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage"))
    assert ran == ["check", "evaluate", "features", "predict", "prepare", "quantize", "reconstruct"]
    metrics = json.loads((folder / "metrics/evaluate.json").read_text())
    assert metrics["samples"] == 6
    assert set(metrics["rtn"]) == {"w2a4"} and set(metrics["recon"]) == {"w2a4"}
    assert metrics["recon"]["w2a4"]["weight_bits"] == 2 and metrics["recon"]["w2a4"]["act_bits"] == 4
    assert (folder / "data/prepare/test.json").is_file()
    assert (folder / "plots/reconstruct/w2a4.tsv").read_text().startswith("step\tphase\tunit")
    lock = yaml.safe_load((folder / "dvc.lock").read_text())
    assert lock["stages"]["reconstruct"]["params"]["params.yaml"]["reconstruct"]["reg_weight"] == reg_weight
    print(f"{preset}: dvc repro of the shrunk preset in {time.perf_counter() - began:.1f} s")
