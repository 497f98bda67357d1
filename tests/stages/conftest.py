"""Fixtures shared by the pipeline tests: one cold run of the tiny pipeline serves several of them."""

from __future__ import annotations

import pytest
from helpers import write_fake_fashion_mnist
from tiny_repo import AVX2_MACHINE, ColdRun, make_tiny_repo, run


@pytest.fixture(scope="session")
def cold_run(tmp_path_factory: pytest.TempPathFactory) -> ColdRun:
    """One cold run per session: a cold run is the most expensive step of the default test run, and the
    rerun test (test_pipeline.py) and the two-repos determinism test (test_sharing.py) both need one.

    It runs as another machine would: one thread (the sharing tests' repo uses two) and the libraries capped
    at AVX2, so the determinism test compares thread counts and instruction sets too."""
    base = tmp_path_factory.mktemp("cold")
    data_root = write_fake_fashion_mnist(base / "fashion-mnist", train=64, test=30)
    repo = make_tiny_repo(base / "repo", data_root, threads=1)
    log = run(["dvc", "repro"], repo, env=AVX2_MACHINE)
    return ColdRun(repo, data_root, log, (repo / "dvc.lock").read_text())
