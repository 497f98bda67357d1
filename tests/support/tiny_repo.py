"""A throwaway git + DVC copy of the root pipeline on tiny params, for sharing/determinism/sweep tests.

The fake Fashion-MNIST lives outside the repo (``prepare.data_root`` is an absolute path, as the real
``/usr/share/datasets/fashion-mnist`` is), so every clone that should share results must see the same
path: callers pass one ``data_root`` to all of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ptqflow.models import build_model

ROOT = Path(__file__).resolve().parents[2]

#: Identity for commits in temp repos (CI has no git config).
GIT_ENV = {
    "GIT_AUTHOR_NAME": "ptqflow-test",
    "GIT_AUTHOR_EMAIL": "test@ptqflow.invalid",
    "GIT_COMMITTER_NAME": "ptqflow-test",
    "GIT_COMMITTER_EMAIL": "test@ptqflow.invalid",
}


#: What a machine without AVX-512 looks like to ATen, oneDNN and MKL (on one that has it).
AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` with the venv's ``ptqflow``/``dvc`` first on PATH (and ``env`` added); return stdout +
    stderr."""
    env = {
        **os.environ,
        **(env or {}),
        **GIT_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check:
        assert result.returncode == 0, f"{cmd} failed in {cwd}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def run_queue(repo: Path, workers: int, limit_s: float = 1800) -> str:
    """``dvc queue start -j workers`` and wait until nothing is queued or running; return the last status."""
    run(["dvc", "queue", "start", "-j", str(workers)], repo)
    began = time.monotonic()
    while True:
        status = run(["dvc", "queue", "status"], repo)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() - began < limit_s, status
        time.sleep(2)


def ran_stages(log: str) -> list[str]:
    """Stages whose command DVC actually ran, from its ``Running stage 'x':`` lines."""
    return sorted(line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage"))


def tiny_params(data_root: Path) -> dict[str, Any]:
    """The root params.yaml shrunk to seconds: 32 calibration images, 2 bit pairs, 4 iterations, tiny search."""
    params: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(weights="weights/r20.pt", device="cpu", threads=2)
    params["prepare"].update(data_root=str(data_root), calib_size=32)
    params["features"].update(batch_size=16, chunk_size=8, shard_size=16)
    params["quantize"].update(calib_size=16, batch_size=16)
    # the two bit pairs the mixed-precision and MRECG stages start from (select.base, plan.reference)
    params["quantize"]["bits"] = {k: params["quantize"]["bits"][k] for k in ("w3a4", "w2a4")}
    params["sensitivity"].update(samples=16, batch_size=8)
    params["search"].update(pop_size=8, generations=3)
    params["reconstruct"].update(iters=4, act_iters=2, batch_size=8)
    params["predict"].update(batch_size=10)
    params["export"].update(batch_size=10)
    return params


def write_params(repo: Path, params: dict[str, Any]) -> None:
    """Write ``params.yaml`` of ``repo``."""
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_pipeline(repo: Path) -> None:
    """Copy the library, the stages and the root dvc.yaml into ``repo`` (created if needed)."""
    repo.mkdir(parents=True, exist_ok=True)
    for item in ("src", "stages", "dvc.yaml"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / item)


def make_tiny_repo(repo: Path, data_root: Path, weights_seed: int = 0, threads: int = 2) -> Path:
    """Copy the pipeline (code, dvc.yaml) into ``repo``, add random-init ResNet-20 weights (in git) and
    tiny params (``base.threads``: ``threads``), ``git init`` + ``dvc init`` and commit. Returns ``repo``."""
    copy_pipeline(repo)
    (repo / "weights").mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights_seed)
        torch.save(build_model("resnet20").state_dict(), repo / "weights" / "r20.pt")
    params = tiny_params(data_root)
    params["base"]["threads"] = threads
    write_params(repo, params)
    (repo / ".gitignore").write_text("__pycache__/\n")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.autostage", "true"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "tiny pipeline"], repo)
    return repo


#: The nondeterministic outputs (wall seconds); declared ``cache: false`` in dvc.yaml.
TIMING = ("metrics/timing.json", "plots/timing")


def lock_without_timing(lock: dict[str, Any]) -> dict[str, Any]:
    """A parsed dvc.lock minus the :data:`TIMING` outputs, the only ones allowed to differ run to run."""
    for stage in lock["stages"].values():
        stage["outs"] = [o for o in stage.get("outs", []) if o["path"] not in TIMING]
    return lock


@dataclass(frozen=True)
class ColdRun:
    """A tiny repo after its first ``dvc repro`` (its own empty cache)."""

    repo: Path
    data_root: Path  # the fake Fashion-MNIST (64 train, 30 test images), shared by every tiny repo
    log: str  # what that first ``dvc repro`` printed
    lock: str  # dvc.lock right after it (tests may edit params and rerun the repo afterwards)
