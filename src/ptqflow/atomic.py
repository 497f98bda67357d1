"""Atomic file outputs: write beside the target, fsync, then rename over it.

A killed process leaves either the previous file or none, never a half-written one, so DVC's cache
never hashes a torn output. Temporaries carry the writer's pid in their name (``.<name>.<pid>.<random>.tmp``);
the next write to the same target removes those whose writer no longer runs, so killed runs leave no
litter behind. Torch files are serialised in memory first: ``torch.save`` to a path names
the zip archive after the file, which would make the bytes depend on the temporary name.
"""

from __future__ import annotations

import glob
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_save_torch",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "safe_load_failure",
    "sweep_stale",
]


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(path: Path) -> None:
    """Remove temporaries beside ``path`` left by writers that were killed (their pid is gone)."""
    path = Path(path)
    head = f".{path.name}."
    for item in path.parent.glob(f".{glob.escape(path.name)}.*"):
        parts = item.name[len(head) :].split(".")
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in ("tmp", "old"):
            continue
        pid = int(parts[0])
        if pid == os.getpid() or _running(pid):
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for DVC hashing)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, with bytes independent of the file name."""
    import torch  # here: the file helpers serve torch-free commands too (the check stage's memo)

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``path`` only if the block finishes.

    On error (or a kill) the temporary folder is removed or left under a dot-name beside the target,
    never at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".old"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def safe_load_failure(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``exc``, in words that never advise unpickling.

    torch's own message suggests retrying with ``weights_only=False``, which runs whatever code the file
    carries; ptqflow never does, so the reason is restated with what to do instead.
    """
    if not zipfile.is_zipfile(path):
        return "not a file written by torch.save (no zip archive)"
    if isinstance(exc, pickle.UnpicklingError):
        return (
            "it holds Python objects other than tensors (a pickled model or optimizer?), which ptqflow never "
            "unpickles; save tensors only, e.g. torch.save(model.state_dict(), path)"
        )
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return "damaged file" if "weights_only" in first else first
