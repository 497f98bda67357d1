"""Several machines, one team (README "Several machines, one team"): two clones run different halves of a
sweep through their own queues, publish with ``dvc exp push``, and a third clone sees every experiment and
applies one without recomputing anything.

The "machines" are three clones of one bare git repository sharing one directory DVC remote, as a team's
git server and object store would be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_repo import ColdRun, make_tiny_repo, ran_stages, run, run_queue


def _queue(repo: Path, names: dict[str, int]) -> None:
    """Queue one experiment per ``name -> reconstruct.iters`` and run this machine's queue to the end."""
    for name, iters in names.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"reconstruct.iters={iters}"], repo)
    status = run_queue(repo, 1, limit_s=900)
    assert status.count("Success") == len(names), status
    run(["dvc", "queue", "stop"], repo, check=False)


@pytest.mark.slow
def test_two_machines_split_a_sweep_and_a_third_applies_a_result(tmp_path: Path, cold_run: ColdRun) -> None:
    origin = make_tiny_repo(tmp_path / "author", cold_run.data_root)
    bare, store = tmp_path / "team.git", tmp_path / "dvc-store"
    run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], tmp_path)
    run(["dvc", "remote", "add", "-d", "team", str(store)], origin)
    run(["dvc", "repro"], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "baseline"], origin)
    run(["git", "remote", "add", "origin", str(bare)], origin)
    run(["git", "push", "-q", "origin", "main"], origin)
    run(["dvc", "push", "--run-cache"], origin)

    machines = {}
    for name in ("x", "y", "z"):
        run(["git", "clone", "-q", str(bare), name], tmp_path)
        machines[name] = tmp_path / name
        run(["dvc", "pull", "--run-cache"], machines[name])
    halves = {"x": {"iters-2": 2}, "y": {"iters-3": 3}}
    for name, half in halves.items():
        _queue(machines[name], half)
        run(["dvc", "exp", "push", "origin", "--all-commits"], machines[name])  # git refs + cached outputs

    z = machines["z"]
    run(["dvc", "exp", "pull", "origin", "--all-commits"], z)
    names = set(run(["dvc", "exp", "list", "--all-commits", "--name-only"], z).split())
    assert names == {"iters-2", "iters-3"}, names
    table = run(["dvc", "exp", "show", "--md", "--keep", "reconstruct.iters"], z)
    assert "iters-2" in table and "iters-3" in table

    run(["dvc", "exp", "apply", "iters-3"], z)
    assert yaml.safe_load((z / "params.yaml").read_text())["reconstruct"]["iters"] == 3
    status = json.loads(run(["dvc", "status", "--json"], z))  # outputs in place, nothing stale
    assert status == {"check": ["always changed"]}  # the check runs on every repro (its memo makes it cheap)
    assert ran_stages(run(["dvc", "repro"], z)) == ["check"]  # applied, not recomputed (the check always runs)
    y_metrics = run(["git", "show", "refs/exps/" + _ref_of(machines["y"], "iters-3") + ":metrics/evaluate.json"],
                    machines["y"])  # fmt: skip
    assert json.loads((z / "metrics/evaluate.json").read_text()) == json.loads(y_metrics)


def _ref_of(repo: Path, name: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).split()
    found = [r.removeprefix("refs/exps/") for r in refs if r.endswith("/" + name)]
    assert len(found) == 1, refs
    return found[0]
