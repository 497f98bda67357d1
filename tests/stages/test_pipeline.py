"""The root pipeline end to end through ``dvc repro``, on a tiny params variant in a temp git repo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_fake_fashion_mnist

from ptqflow.models import build_model

ROOT = Path(__file__).resolve().parents[2]
# Without the [export] extra the export stage is left out of the copied pipeline (its own tests skip).
HAS_EXPORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _stages(*names: str) -> list[str]:
    return sorted(n for n in names if n != "export" or HAS_EXPORT)


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _ran(log: str) -> list[str]:
    return sorted(line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for item in ("src", "stages", "dvc.yaml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / item)
    if not HAS_EXPORT:
        pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
        del pipeline["stages"]["export"]
        (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    data_root = write_fake_fashion_mnist(repo / "fm", train=64, test=30)
    (repo / "weights").mkdir()
    torch.save(build_model("resnet20").state_dict(), repo / "weights" / "r20.pt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(weights="weights/r20.pt", device="cpu")
    params["prepare"].update(data_root=str(data_root), calib_size=32)
    params["features"].update(batch_size=16, chunk_size=8, shard_size=16)
    params["quantize"].update(calib_size=16, batch_size=16)
    params["reconstruct"].update(iters=4, act_iters=2, batch_size=8)
    params["evaluate"].update(batch_size=10)
    params["export"].update(batch_size=10)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    return repo


def test_repro_reruns_only_what_changed(repo: Path) -> None:
    log = _run(["dvc", "repro"], repo)
    assert _ran(log) == _stages("evaluate", "export", "features", "prepare", "quantize", "reconstruct")
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert metrics["samples"] == 30 and set(metrics["rtn"]) == {"w2a4", "w4a4", "w8a8"}
    assert set(metrics["recon"]) == {"w2a4"}
    assert (repo / "plots/reconstruct/w2a4.tsv").read_text().startswith("step\tphase\tunit")
    assert not (repo / "data/reconstruct.resume").exists()
    assert 0 <= metrics["fp"]["top1"] <= 100 and metrics["rtn"]["w4a4"]["size_mb"] < metrics["fp"]["size_mb"]
    if HAS_EXPORT:
        exported = json.loads((repo / "metrics/export.json").read_text())
        assert exported["w2a4"]["agreement"] >= 99.5 and (repo / "data/export/w2a4.onnx").is_file()
    lock = (repo / "dvc.lock").read_text()
    assert str(repo) not in lock.replace(str(repo / "fm"), "")  # only the data root is an absolute path

    assert _ran(_run(["dvc", "repro"], repo)) == []  # no-op

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == ["evaluate"]

    params["reconstruct"]["iters"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == _stages("evaluate", "export", "reconstruct")  # not features

    params["quantize"]["bits"]["w4a4"]["act_bits"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo)) == _stages("evaluate", "export", "quantize", "reconstruct")


def test_cold_reruns_are_byte_identical(repo: Path) -> None:
    first = (repo / "dvc.lock").read_text()
    _run(["dvc", "repro", "--force"], repo)
    assert (repo / "dvc.lock").read_text() == first
