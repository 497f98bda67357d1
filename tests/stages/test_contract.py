"""The DVC wiring: every stage reads only what it declares, and depends on its own code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
#: Stages whose code imports torch but whose outputs use no torch float kernels (prepare: a seeded
#: permutation and uint8 copies; search: Python arithmetic on the sensitivity tables), so their bytes cannot
#: depend on the CPU kernels and they do not declare base.kernels.
NO_TORCH_MATH = {"prepare", "search"}
PIPELINES = [ROOT / "dvc.yaml", *sorted((ROOT / "pipelines").glob("*/dvc.yaml"))]


def _stages(path: Path) -> dict[str, dict]:
    stages = yaml.safe_load(path.read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _sections_read(module: Path) -> set[str]:
    """Sections a stage module passes to ``section(params, "<name>", ...)``."""
    tree = ast.parse(module.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "section":
            arg = node.args[1]
            assert isinstance(arg, ast.Constant)
            found.add(arg.value)
    return found


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_check_stage_comes_first_and_declares_every_section(pipeline: Path) -> None:
    """``check`` validates every section before any other stage's outputs are removed: it declares whole
    sections (so a new, mistyped key reruns it), all the code, and ``prepare`` (so every stage) follows it."""
    stages = _stages(pipeline)
    if "prepare" not in stages:
        pytest.skip("the training pipeline has no check stage")
    check = stages["check"]
    params = yaml.safe_load((pipeline.parent / "params.yaml").read_text())
    assert check["params"] == list(params), "check must declare every section of the params file, whole"
    deps = {str((pipeline.parent / d).resolve().relative_to(ROOT)) for d in check["deps"]}
    assert deps == {"stages", "src/ptqflow"}
    assert check["cmd"] == "ptqflow check --out data/check" and check["outs"] == ["data/check"]
    assert "data/check/check.json" in stages["prepare"]["deps"]
    for name, stage in stages.items():
        if name not in ("check", "prepare"):
            assert any(d.startswith("data/") for d in stage["deps"]), f"{name} must follow prepare"
        builds = any(d.endswith("src/ptqflow/models.py") for d in stage["deps"])
        assert builds == ("${base.model_code}" in stage["deps"]), f"{name}: a stage building the model tracks its code"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_stages_declare_their_code_and_params(pipeline: Path) -> None:
    for name, stage in _stages(pipeline).items():
        if name == "check":
            continue  # its own test above
        module = f"stages/{name}.py"
        deps = [str((pipeline.parent / d).resolve().relative_to(ROOT)) for d in stage["deps"] if "${" not in d]
        assert module in deps, f"{pipeline.name}:{name} must depend on {module}"
        assert stage["cmd"].startswith(f"ptqflow {name} "), f"{name}: cmd must run 'ptqflow {name}'"
        declared = {p.split(".")[0] for p in stage["params"] if p != "base.kernels"}
        read = _sections_read(ROOT / module)
        # the CLI applies base.kernels and base.threads for every stage before it runs (stages.common.apply_runtime)
        code = [ROOT / d for d in deps if d.startswith(("src/", "stages/"))]
        files = [f for c in code for f in ([c] if c.is_file() else sorted(c.rglob("*.py")))]
        computes = any("import torch" in f.read_text() for f in files) and name not in NO_TORCH_MATH
        assert ("base.kernels" in stage["params"]) == computes, (
            f"{name}: base.kernels must be declared exactly by the stages that compute with torch"
        )
        assert "base.threads" not in stage["params"], f"{name}: base.threads must not change any output"
        assert "base.memory" not in stage["params"], f"{name}: base.memory must not change any output"
        for sec in read:
            assert sec in declared, f"{name} reads params section {sec!r} but does not declare it"
        for key in stage["params"]:
            if key == "base.kernels":
                continue
            assert key.split(".")[0] in read, f"{name} declares {key} but never reads that section"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_placement_stages_declare_the_op_tables(pipeline: Path) -> None:
    """units.py and quant/ place quantizers by the tables in ops.py, on a graph where attention.py has
    decomposed attention: a stage running them depends on both too."""
    for name, stage in _stages(pipeline).items():
        deps = {str((pipeline.parent / d).resolve().relative_to(ROOT)) for d in stage["deps"] if "${" not in d}
        if deps & {"src/ptqflow/units.py", "src/ptqflow/quant"}:
            for module in ("src/ptqflow/ops.py", "src/ptqflow/attention.py"):
                assert module in deps, f"{pipeline.name}:{name} must depend on {module}"


def test_root_stage_keys_exist_in_params() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _stages(ROOT / "dvc.yaml").items():
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert part in node, f"{name} declares {key}, missing from params.yaml"
                node = node[part]


def test_library_never_reads_params_or_imports_click() -> None:
    for path in (ROOT / "src" / "ptqflow").rglob("*.py"):
        text = path.read_text()
        assert "import click" not in text and "params.yaml" not in text and "from stages" not in text, path
