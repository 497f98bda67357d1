"""``ptqflow share``: push the run-cache *and every object its entries point to* (not a DVC stage).

Why plain ``dvc push --run-cache`` is not enough (DVC 3.67, ``dvc/repo/push.py``): it uploads the run
entries (``.dvc/cache/runs``) but only the outputs of the revisions being pushed (the workspace by
default). A run entry for any other parameter set then points at objects the remote lacks, and so do the
entries of every stage with ``cache: false`` metrics or plots: DVC commits those files to the local cache
when it saves the run entry, but ``dvc push`` never uploads them because they are tracked by git. A
teammate's ``dvc repro --pull`` then warns "Some of the cache files do not exist neither locally nor on
remote" and reruns the stage. This command pushes exactly what the run entries reference, so every
parameter set computed on this machine (experiments included) restores on the teammate's clone.

It uses DVC's Python API (``Repo.push``, ``StageCache.get_used_objs``, ``DataCloud.push``); dvc is
imported lazily, never in a stage's hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqflow.errors import ConfigError


@dataclass(frozen=True)
class ShareResult:
    """What one ``share`` call sent.

    Args:
        run_entries: run-cache entries found locally.
        workspace_objects: objects ``dvc push --run-cache`` transferred (entries + workspace outputs).
        entry_objects: further objects referenced by run entries, transferred now.
        missing: objects referenced by run entries that are in neither cache (e.g. after ``dvc gc``).
    """

    run_entries: int
    workspace_objects: int
    entry_objects: int
    missing: int


def push(repo_root: Path, remote: str | None = None, jobs: int | None = None) -> ShareResult:
    """``dvc push --run-cache`` plus every cached object any local run entry references.

    Args:
        repo_root: the DVC repository.
        remote: DVC remote name (``None``: ``core.remote``).
        jobs: parallel transfers (``None``: DVC's default).

    Raises:
        ConfigError: no DVC repo at ``repo_root`` or no usable remote.
    """
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(repo_root))
    except NotDvcRepoError:
        raise ConfigError(f"{repo_root} is not a DVC repository (run it in the project root)") from None
    try:
        try:
            pushed = int(repo.push(remote=remote, run_cache=True, jobs=jobs))
        except DvcException as exc:
            raise ConfigError(f"dvc push failed: {exc}; check the remote (dvc remote list)") from None
        runs = Path(repo.cache.legacy.path) / "runs"
        entries = sorted((p.parent.name, p.name) for p in runs.glob("*/*/*") if p.is_file())
        used = repo.stage_cache.get_used_objs(entries)
        objects = {obj for objs in used.values() for obj in objs}
        result = repo.cloud.push(objects, jobs=jobs, remote=remote)
        return ShareResult(
            run_entries=len(entries),
            workspace_objects=pushed,
            entry_objects=len(result.transferred),
            missing=len(result.failed),
        )
    finally:
        repo.close()
