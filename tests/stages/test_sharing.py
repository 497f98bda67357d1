"""Team sharing: clone A computes, teammates' clones get every result without running a stage.

One tiny pipeline run in clone A serves three teammates:
- B follows the plain recipe on the committed state: ``dvc pull --run-cache`` + ``dvc repro --pull``;
- C asks for a parameter set A computed but never committed: the run-cache restores it (A pushed with
  ``ptqflow share``, which also uploads the objects that plain ``dvc push --run-cache`` leaves behind);
- D shares A's cache directory (``cache.shared group``, ``cache.type symlink``): no push, no pull;
- E is a second cold run in a separate repo (the session's, conftest.py): byte-identical outputs
  (determinism, same dvc.lock hashes).
B, C and D are marked slow (``make test-all``): with A's push, variant and share they cost about a third of
the default run's ten minutes; A's cold run and E stay in the default run.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tiny_repo import ROOT, ColdRun, lock_without_timing, make_tiny_repo, ran_stages, run, tiny_params, write_params

STAGES = sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # a cold run runs every stage


def _variant(data_root: Path) -> dict:
    """A second parameter set: changes reconstruct and evaluate only."""
    params = tiny_params(data_root)
    params["reconstruct"]["iters"] = 3
    params["evaluate"]["topk"] = [1, 3]
    return params


@dataclass
class Team:
    root: Path
    data_root: Path
    remote: Path
    shared_cache: Path
    a: Path
    committed: dict[str, bytes]  # A's outputs for the committed params
    variant: dict[str, bytes]  # A's outputs for _variant(), never committed


OUTPUTS = (
    "metrics/evaluate.json",
    "plots/evaluate/models.tsv",
    "data/predict/logits.pt",
    "data/reconstruct/w2a4.pt",
    "plots/reconstruct/w2a4.tsv",
    "data/quantize/w2a4.pt",
)


def _outputs(repo: Path) -> dict[str, bytes]:
    return {name: (repo / name).read_bytes() for name in OUTPUTS}


#: Clone A after its cold run: (the team's folder, A, the shared cache directory).
Author = tuple[Path, Path, Path]


@pytest.fixture(scope="module")
def author(tmp_path_factory: pytest.TempPathFactory, cold_run: ColdRun) -> Author:
    """Clone A's cold run, committed: ``(root, a, shared cache)``. A keeps its cache in the shared
    directory (teammate D's setup), kept out of git with --local."""
    root = tmp_path_factory.mktemp("team")
    shared_cache = root / "shared-cache"
    a = make_tiny_repo(root / "a", cold_run.data_root)  # the same data path: dvc.lock names it
    run(["dvc", "cache", "dir", "--local", str(shared_cache)], a)
    run(["dvc", "config", "--local", "cache.shared", "group"], a)
    run(["dvc", "config", "--local", "cache.type", "symlink"], a)
    assert ran_stages(run(["dvc", "repro"], a)) == STAGES
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-q", "-m", "results"], a)
    return root, a, shared_cache


@pytest.fixture(scope="module")
def team(author: Author, cold_run: ColdRun) -> Team:
    root, a, shared_cache = author
    data_root, remote = cold_run.data_root, root / "remote"
    run(["dvc", "remote", "add", "-d", "team", str(remote)], a)
    run(["git", "commit", "-q", "-am", "the team's remote"], a)  # clones find it in .dvc/config
    run(["dvc", "push", "--run-cache"], a)
    committed = _outputs(a)

    write_params(a, _variant(data_root))
    assert ran_stages(run(["dvc", "repro"], a)) == ["check", "evaluate", "export", "predict", "reconstruct"]
    variant = _outputs(a)
    out = run(["ptqflow", "share"], a)
    assert "more objects that run entries reference" in out

    write_params(a, tiny_params(data_root))  # back to the committed params: restored, not rerun
    assert ran_stages(run(["dvc", "repro"], a)) == ["check"]
    assert _outputs(a) == committed
    return Team(root, data_root, remote, shared_cache, a, committed, variant)


def _clone(team: Team, name: str) -> Path:
    run(["git", "clone", "-q", str(team.a), name], team.root)
    return team.root / name


@pytest.mark.slow  # with the team fixture: about 3 minutes of the default run's 10
def test_teammate_pull_recomputes_nothing(team: Team) -> None:
    b = _clone(team, "b")
    run(["dvc", "pull", "--run-cache"], b)
    log = run(["dvc", "repro", "--pull"], b)
    print(log)  # the note quotes it (pytest -s)
    assert ran_stages(log) == ["check"]
    unchanged = sorted(s for s in STAGES if f"Stage '{s}' didn't change, skipping" in log)
    assert unchanged == [s for s in STAGES if s != "check"]  # the check always runs (it is cheap)
    assert _outputs(b) == team.committed
    assert run(["git", "status", "--porcelain"], b) == ""  # dvc.lock untouched


@pytest.mark.slow  # with the team fixture: about 3 minutes of the default run's 10
def test_teammate_gets_uncommitted_parameter_set_from_run_cache(team: Team) -> None:
    c = _clone(team, "c")
    run(["dvc", "pull", "--run-cache"], c)
    write_params(c, _variant(team.data_root))
    log = run(["dvc", "repro", "--pull"], c)
    print(log)
    assert ran_stages(log) == ["check"]
    for stage in ("reconstruct", "predict", "evaluate"):
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in log
    assert "do not exist" not in log  # every object the run entries need is on the remote
    assert _outputs(c) == team.variant


@pytest.mark.slow  # with the team fixture: about 3 minutes of the default run's 10
def test_shared_cache_directory_needs_no_push_or_pull(team: Team) -> None:
    d = _clone(team, "d")
    run(["dvc", "cache", "dir", "--local", str(team.shared_cache)], d)
    run(["dvc", "config", "--local", "cache.shared", "group"], d)
    run(["dvc", "config", "--local", "cache.type", "symlink"], d)
    run(["dvc", "remote", "remove", "team"], d)  # prove nothing comes from the remote
    log = run(["dvc", "repro"], d)
    assert ran_stages(log) == ["check"]
    assert _outputs(d) == team.committed
    assert (d / "data/reconstruct/w2a4.pt").is_symlink()
    target = (d / "data/reconstruct/w2a4.pt").resolve()
    assert target.is_relative_to(team.shared_cache)
    assert stat.S_IMODE(os.stat(target).st_mode) & stat.S_IRGRP  # group-readable (cache.shared group)

    write_params(d, _variant(team.data_root))
    log = run(["dvc", "repro"], d)
    assert ran_stages(log) == ["check"]
    assert _outputs(d) == team.variant


def test_shipped_remote_is_one_command_away(tmp_path: Path) -> None:
    """The repo's .dvc/config names a default remote 'shared' that `dvc remote modify` re-points."""
    config = (ROOT / ".dvc" / "config").read_text()
    assert "remote = shared" in config and "['remote \"shared\"']" in config
    repo = make_tiny_repo(tmp_path / "r", tmp_path / "unused")
    (repo / ".dvc" / "config").write_text(config)
    run(["dvc", "remote", "modify", "shared", "url", str(tmp_path / "nfs")], repo)
    listed = run(["dvc", "remote", "list"], repo).split()
    assert listed[:2] == ["shared", str(tmp_path / "nfs")]
    assert run(["dvc", "config", "core.remote"], repo).strip() == "shared"


def test_two_cold_runs_in_separate_repos_are_byte_identical(author: Author, cold_run: ColdRun) -> None:
    """A second repo, its own empty cache, same params: every stage's outputs hash the same as A's.

    zarr stores included (their attrs hold no paths or timestamps); only the wall seconds (tiny_repo.TIMING) differ.
    The second repo is the session's cold run (conftest.py), compared as its first ``dvc repro`` left it.
    """
    e = cold_run.repo
    assert ran_stages(cold_run.log) == STAGES
    committed = lock_without_timing(yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], author[1])))
    mine = lock_without_timing(yaml.safe_load(cold_run.lock))
    differing = [
        (name, entry.get("path"))
        for name, stage in committed["stages"].items()
        for key in ("deps", "outs")
        for entry in stage.get(key, [])
        if entry not in mine["stages"].get(name, {}).get(key, [])
    ]
    assert not differing, f"entries that differ between the two repos: {differing}"
    # The check stage declares every section whole, so its params record base.threads, which differs here
    # on purpose (1 vs 2 threads); no stage that computes declares it, and check.json is the same bytes.
    for lock in (committed, mine):
        lock["stages"]["check"]["params"]["params.yaml"]["base"].pop("threads")
    assert mine == committed
    timing = json.loads((e / "metrics/timing.json").read_text())
    assert timing["reconstruct"]["seconds"] > 0
    for path in (e / "data").rglob("*"):
        if path.is_file():
            assert str(e).encode() not in path.read_bytes(), f"{path} holds the repo path"
    for meta in (e / "data/features/store.zarr").rglob("zarr.json"):
        text = meta.read_text()
        assert str(e.parent) not in text and "time" not in text.lower(), meta
