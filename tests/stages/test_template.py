"""``stages.template``: one table renders every pipeline, and the installed layout's code fingerprints change
exactly for the stages whose modules changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from stages.template import FULL, PIPELINES, STAGES, Pipeline, code_fingerprint, package_roots, render

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", sorted(PIPELINES), ids=str)
def test_every_committed_pipeline_is_the_table_rendered(folder: str) -> None:
    """The root demo and the presets are instances of the one definition: `python -m stages.template`
    rewrites them, and what is committed is what it writes."""
    where = ROOT / folder
    sections = list(yaml.safe_load((where / "params.yaml").read_text()))
    prefix = "../" * len(Path(folder).parts) if folder != "." else ""
    assert (where / "dvc.yaml").read_text() == render(PIPELINES[folder], sections, "checkout", prefix), (
        f"{folder}/dvc.yaml differs from the table: run python -m stages.template"
    )


def test_every_stage_but_the_check_can_be_run_cached() -> None:
    """DVC saves a stage to its run cache only if every uncached output is a plot or a metric, and never an
    ``always_changed`` stage: an uncached plain out (as the search fronts once were) makes a teammate's
    ``dvc repro`` recompute that stage and everything after it instead of checking out its results."""
    for name, spec in STAGES.items():
        plain = [o for o in spec.outs if isinstance(o, dict) and any(v.get("cache") is False for v in o.values())]
        assert not plain, f"{name}: uncached outs must be declared as plots or metrics: {plain}"
    stages = yaml.safe_load(render(PIPELINES["."], ["base"]))["stages"]
    assert [n for n, s in stages.items() if s.get("always_changed")] == ["check"]


def test_the_installed_layout_depends_on_fingerprints_not_files() -> None:
    text = render(Pipeline("imagefolder", FULL), ["base", "prepare"], "installed")
    stages = yaml.safe_load(text)["stages"]
    assert list(stages) == list(STAGES)
    assert stages["check"]["always_changed"] is True and stages["check"]["cmd"].endswith(" --code")
    for name, stage in stages.items():
        deps = stage.get("deps", [])
        assert not any(d.startswith(("src/", "stages", "${base.model_code}")) for d in deps), name
        if name != "check":
            assert f"data/check/code/{name}.json" in deps, name
    assert "--images ${prepare.data_root}" in stages["export"]["cmd"]


@pytest.fixture()
def package_copy(tmp_path: Path) -> dict[str, Path]:
    """A copy of the installed packages, to play an upgrade on."""
    roots = {key: tmp_path / key.replace("/", "_") for key in package_roots()}
    for key, path in package_roots().items():
        shutil.copytree(path, roots[key], ignore=shutil.ignore_patterns("__pycache__"))
    return roots


def _all(roots: dict[str, Path], project: Path, model: str = "resnet20") -> dict[str, dict]:
    return {name: code_fingerprint(name, model, project, roots) for name in STAGES if name != "check"}


def test_an_upgrade_changes_the_fingerprints_of_the_stages_that_list_the_module(
    package_copy: dict[str, Path], tmp_path: Path
) -> None:
    before = _all(package_copy, tmp_path)
    assert _all(package_copy, tmp_path) == before  # deterministic
    with (package_copy["src/ptqflow"] / "plan.py").open("a") as fh:
        fh.write("# a new release\n")
    changed = {n for n, f in _all(package_copy, tmp_path).items() if f != before[n]}
    assert changed == {"plan"}
    with (package_copy["src/ptqflow"] / "quant" / "quantizer.py").open("a") as fh:
        fh.write("# another\n")
    changed = {n for n, f in _all(package_copy, tmp_path).items() if f != before[n]}
    assert changed == {"plan"} | {n for n, s in STAGES.items() if "src/ptqflow/quant" in s.code}
    assert "evaluate" not in changed and "search" not in changed and "prepare" not in changed


def test_the_model_source_of_the_project_is_part_of_the_builders_fingerprints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "tnets").mkdir()
    (tmp_path / "tnets" / "__init__.py").write_text("")
    (tmp_path / "tnets" / "cnn.py").write_text("from ptqflow.models import build_model as _b\n\n\ndef build():\n"
                                              "    return _b('resnet20')\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    before = _all(package_roots(), tmp_path, "tnets.cnn:build")
    assert before["features"]["model"] == {
        "tnets/__init__.py": before["features"]["model"]["tnets/__init__.py"],
        "tnets/cnn.py": before["features"]["model"]["tnets/cnn.py"],
    }
    with (tmp_path / "tnets" / "cnn.py").open("a") as fh:
        fh.write("# edited\n")
    after = _all(package_roots(), tmp_path, "tnets.cnn:build")
    assert {n for n in after if after[n] != before[n]} == {n for n, s in STAGES.items() if s.builds_model}
    assert str(tmp_path) not in str(after)  # no absolute paths in a tracked output
