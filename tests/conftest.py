"""pytest configuration: the stages' CPU instruction-set pins for this process, and a seed for every test."""

from __future__ import annotations

import os

import pytest
import torch

from ptqflow.kernels import PORTABLE_ENV

# Set before this process's first CPU op (importing torch computes nothing), as every ``ptqflow`` stage
# process does: stages the tests call in-process through click then write the bytes a stage subprocess
# writes (tests/stages/test_kill.py compares the two). Subprocesses inherit it; the tests that compare
# instruction sets start theirs with a clean environment (tests/ptqflow/test_kernels.py).
os.environ.update(PORTABLE_ENV)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
