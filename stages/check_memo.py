"""The ``check`` stage's memo: what lets it run on every ``dvc repro`` at almost no cost.

The check stage is ``always_changed`` (it must see a dataset or weights file that went missing before DVC
reaches the first stage depending on it), but its real work imports torch, loads the weights and traces the
model: about four seconds on every ``dvc repro``, ``dvc exp run`` and queue task. This module decides,
without importing torch, whether anything the check reads could have changed since it last passed in this
clone: the params file's bytes, the installed code and library versions, and the size and modification
time of every file and folder the check opens (weights, model code, the dataset's folders and headers).
When nothing did, the stage writes the outputs it wrote then (byte for byte) and repeats its warnings.

The memo lives in the clone's ``.dvc/tmp`` (never shared, never tracked); no memo, or any difference, means
the full check. A memo that is stale in a way the key misses can only let a bad value through to the stage
that reads it, which stops with the same error one step later.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from ptqflow.atomic import atomic_dir, atomic_write_text
from ptqflow.errors import PtqflowError
from stages.params import load_params
from stages.template import distribution_versions, package_roots

#: Distributions whose version changes what the check accepts (the model zoo, the export runtime).
_DISTRIBUTIONS = ("torch", "torchvision", "onnx", "onnxruntime")


def _stat(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        return ["missing"]
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _tree(path: Path, pattern: str = "*.py") -> dict[str, list[Any]]:
    """Stats of ``path`` and, for a folder, of every file under it matching ``pattern``."""
    found = {str(path): _stat(path)}
    if path.is_dir():
        for f in sorted(path.rglob(pattern)):
            if "__pycache__" not in f.parts:
                found[str(f)] = _stat(f)
    return found


def _dataset(root: Path) -> dict[str, list[Any]]:
    """The data root, its entries and the entries of its sub-folders (headers, ``train``/``val``, classes);
    not the images themselves, which the check does not read either (beyond one probe)."""
    found = {str(root): _stat(root)}
    if root.is_dir():
        for child in sorted(root.iterdir()):
            found[str(child)] = _stat(child)
            if child.is_dir():
                for grandchild in sorted(child.iterdir()):
                    found[str(grandchild)] = _stat(grandchild)
    return found


def _model_package(model: str) -> dict[str, list[Any]]:
    """Stats of the Python files of an entry point's top-level package (found without importing it)."""
    if ":" not in model:
        return {}
    top = model.partition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return {top: ["missing"]}
    if spec is None or not spec.origin:
        return {top: ["missing"]}
    origin = Path(spec.origin)
    return _tree(origin.parent) if origin.name == "__init__.py" else _tree(origin)


def key(params_text: str, params: dict[str, Any], out: Path, code: bool) -> str:
    """A digest of everything ``ptqflow check --out OUT [--code]`` reads (see the module docstring)."""
    base, prepare = (params.get(name) for name in ("base", "prepare"))
    base = base if isinstance(base, dict) else {}  # a malformed section: the full check words it
    prepare = prepare if isinstance(prepare, dict) else {}
    files: dict[str, list[Any]] = {}
    for root in package_roots().values():
        files.update(_tree(root))
    for name in ("weights", "model_code"):
        if isinstance(base.get(name), str) and base[name]:
            files.update(_tree(Path(base[name])))
    if isinstance(prepare.get("data_root"), str):
        files.update(_dataset(Path(prepare["data_root"])))
    files.update(_model_package(str(base.get("model", ""))))
    document = {
        "params": hashlib.sha256(params_text.encode()).hexdigest(),
        "out": str(out),
        "code": code,
        "cwd": str(Path.cwd().resolve()),
        "python": sys.executable,
        "versions": distribution_versions(*_DISTRIBUTIONS),
        "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "files": files,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def memo_path(out: Path) -> Path | None:
    """Where this clone keeps the memo for the output folder ``out``: ``.dvc/tmp`` of the nearest enclosing
    DVC project; ``None`` outside one or for an ``out`` outside it."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            target = (here / out).resolve()
            if not target.is_relative_to(folder):
                return None  # not this project's stage output (a check run by hand or by a test)
            name = hashlib.sha256(str(target).encode()).hexdigest()[:16]
            return folder / ".dvc" / "tmp" / "ptqflow-check" / f"{name}.json"
    return None


def open_memo(params_path: Path, out: Path, code: bool) -> tuple[Path, str] | None:
    """``(memo path, digest)`` for ``ptqflow check --params PARAMS --out OUT [--code]``, or ``None`` when there
    is no memo to keep (outside a DVC project) or the params cannot be read (the full check words that)."""
    memo = memo_path(out)
    if memo is None:
        return None
    try:
        return memo, key(params_path.read_text(), load_params(params_path), out, code)
    except (OSError, PtqflowError):
        return None


def replay(memo: Path, digest: str, out: Path) -> list[str] | None:
    """Rewrite ``out`` from the memo when its key is ``digest``; return the warnings it recorded, or ``None``
    (no memo, another key, or an unreadable memo: run the full check)."""
    try:
        document = json.loads(memo.read_text())
        if document["key"] != digest:
            return None
        outputs: dict[str, str] = document["outputs"]
        warnings: list[str] = document["warnings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    with atomic_dir(out) as tmp:
        for rel, text in outputs.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tmp / rel, text)
    return warnings


def record(memo: Path, digest: str, out: Path, warnings: list[str]) -> None:
    """Remember the outputs the full check just wrote into ``out`` under ``digest``."""
    outputs = {f.relative_to(out).as_posix(): f.read_text() for f in sorted(out.rglob("*")) if f.is_file()}
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, json.dumps({"key": digest, "outputs": outputs, "warnings": warnings}))
