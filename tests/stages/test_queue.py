"""Two ``dvc exp`` queue workers (``dvc queue start -j 2``) running different params never write into
each other's outputs: each experiment's metrics, lock hashes and cached models match its own params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_fake_fashion_mnist
from tiny_repo import copy_pipeline, run_queue

from ptqflow.models import build_model

ROOT = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.name=ptqflow-test", "-c", "user.email=test@ptqflow.invalid"]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _outs(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock["stages"][stage].get("outs", [])}


@pytest.mark.slow
def test_two_queue_workers_keep_their_outputs_apart(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    copy_pipeline(repo)
    write_fake_fashion_mnist(repo / "fm", train=64, test=30)
    (repo / "weights").mkdir()
    torch.manual_seed(0)
    torch.save(build_model("resnet20").state_dict(), repo / "weights" / "r20.pt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(weights="weights/r20.pt", device="cpu")
    params["prepare"].update(data_root="fm", calib_size=32)
    params["features"].update(batch_size=16, chunk_size=8, shard_size=16)
    params["quantize"].update(bits={"w2a4": {"weight_bits": 2, "act_bits": 4}}, calib_size=16, batch_size=16)
    params["reconstruct"].update(targets=["w2a4"], iters=4, act_iters=2, batch_size=8)
    params["predict"].update(batch_size=10)
    params["select"]["base"] = "w2a4"  # the one bit pair (the check stage refuses a base that is not an entry)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([*GIT, "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run([*GIT, "add", "-A"], repo)
    _run([*GIT, "commit", "-qm", "tiny pipeline"], repo)

    variants = {"w2": 2, "w3": 3}  # experiment name -> quantize.bits.w2a4.weight_bits
    for name, bits in variants.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"quantize.bits.w2a4.weight_bits={bits}"], repo)
    began = time.monotonic()
    status = run_queue(repo, 2)
    print(f"queue of 2 experiments with -j 2: {time.monotonic() - began:.0f} s\n{status}")
    assert status.count("Success") == 2, status

    refs = _run([*GIT, "for-each-ref", "--format=%(refname)", "refs/exps"], repo).split()
    results = {}
    for ref in refs:
        exp_params = yaml.safe_load(_run([*GIT, "show", f"{ref}:params.yaml"], repo))
        metrics = json.loads(_run([*GIT, "show", f"{ref}:metrics/evaluate.json"], repo))
        lock = yaml.safe_load(_run([*GIT, "show", f"{ref}:dvc.lock"], repo))
        bits = exp_params["quantize"]["bits"]["w2a4"]["weight_bits"]
        assert metrics["rtn"]["w2a4"]["weight_bits"] == bits and metrics["recon"]["w2a4"]["weight_bits"] == bits
        results[bits] = (ref.rsplit("/", 1)[-1], lock)
    assert sorted(results) == [2, 3], refs

    (_, lock2), (_, lock3) = results[2], results[3]
    for stage in ("prepare", "features"):  # same params upstream: the same bytes
        assert _outs(lock2, stage) == _outs(lock3, stage)
    for stage in ("quantize", "reconstruct"):  # different params: different bytes
        assert _outs(lock2, stage) != _outs(lock3, stage)

    # Each experiment's cached models are its own: apply it, the workspace matches its lock, and the model
    # files carry its bit-width.
    for bits, (name, _) in results.items():
        _run(["dvc", "exp", "apply", name], repo)
        assert json.loads(_run(["dvc", "status", "--json"], repo)) == {"check": ["always changed"]}
        for folder in ("data/quantize", "data/reconstruct"):
            payload = torch.load(repo / folder / "w2a4.pt", weights_only=True)
            assert payload["config"]["weight_bits"] == bits, (name, folder)
