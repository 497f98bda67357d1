"""A queued DVC experiment sweep (method x weight bits) on tiny params, two workers (README "Experiments")."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_fake_fashion_mnist
from tiny_repo import GIT_ENV, make_tiny_repo, run


@pytest.mark.slow
def test_queued_sweep_shares_upstream_and_reports_top1_size_seconds(tmp_path: Path) -> None:
    data_root = write_fake_fashion_mnist(tmp_path / "fm", train=64, test=30)
    repo = make_tiny_repo(tmp_path / "r", data_root)
    run(["dvc", "repro", "features"], repo)  # the shared upstream, once
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "features"], repo)
    run(
        [
            "dvc",
            "exp",
            "run",
            "--queue",
            "-S",
            "reconstruct.method=brecq,qdrop",
            "-S",
            "quantize.bits.w2a4.weight_bits=2,4",
        ],
        repo,
    )
    env = {**os.environ, **GIT_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with open(tmp_path / "queue.log", "w") as log:  # the workers inherit these handles: no pipe to wait on
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=log, stderr=log, check=True)
    deadline = time.monotonic() + 1500
    while True:
        status = run(["dvc", "queue", "status"], repo)
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 4, status

    names = [line.split()[1] for line in status.splitlines() if "Success" in line]  # Task, Name, Created, Status
    for name in names:
        logs = run(["dvc", "queue", "logs", name], repo)
        ran = {line.split("'")[1] for line in logs.splitlines() if line.startswith("Running stage")}
        # never prepare/features; what else runs depends on which inputs' bytes a grid point changes and on
        # what another worker already put in the run-cache (the two brecq/qdrop points share quantize)
        assert {"reconstruct", "predict", "evaluate"} <= ran and not ran & {"prepare", "features"}, (name, ran)

    table = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo))))
    experiments = [row for row in table if row["Experiment"] in names]
    assert len(experiments) == 4
    grid = {(row["reconstruct.method"], row["quantize.bits.w2a4.weight_bits"]) for row in experiments}
    assert grid == {("brecq", "2"), ("brecq", "4"), ("qdrop", "2"), ("qdrop", "4")}
    for row in experiments:
        assert 0 <= float(row["recon.w2a4.top1"]) <= 100
        assert float(row["recon.w2a4.size_mb"]) > 0
        assert float(row["reconstruct.seconds"]) > 0
        assert row["recon.w2a4.weight_bits"] == row["quantize.bits.w2a4.weight_bits"]
    print(run(["dvc", "exp", "show", "--md", "--only-changed"], repo))
