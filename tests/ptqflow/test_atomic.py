from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptqflow.atomic import atomic_dir, atomic_write_text, sweep_stale


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporaries_of_dead_writers_are_swept(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".out.json.{dead}.abc123.tmp").write_text("torn")
    (tmp_path / f".store.{dead}.k9_x.tmp").mkdir()
    (tmp_path / f".store.{dead}.k9_x.tmp" / "chunk").write_text("partial")
    (tmp_path / f".store.{dead}.zz.old").mkdir()
    alive = tmp_path / f".out.json.{os.getppid()}.abc.tmp"  # a running writer: kept
    alive.write_text("in progress")
    other = tmp_path / ".out.json.notapid.tmp"  # not ours: kept
    other.write_text("x")

    atomic_write_text(tmp_path / "out.json", "{}")
    with atomic_dir(tmp_path / "store") as tmp:
        (tmp / "a").write_text("1")

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.json", "store", alive.name, other.name])
    assert (tmp_path / "store" / "a").read_text() == "1"


def test_sweep_ignores_other_targets(tmp_path: Path) -> None:
    dead = _dead_pid()
    keep = tmp_path / f".other.{dead}.abc.tmp"
    keep.write_text("x")
    sweep_stale(tmp_path / "out")
    assert keep.exists()


def test_failed_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
