"""pytest configuration: the stages' CPU instruction-set pins for this process, a seed for every test, and
how ``pytest -n auto`` (pytest-xdist, ``make test``) shares the machine's cores between its workers."""

from __future__ import annotations

import os

import pytest
import torch

from ptqflow.kernels import PORTABLE_ENV, usable_cores

# Set before this process's first CPU op (importing torch computes nothing), as every ``ptqflow`` stage
# process does: stages the tests call in-process through click then write the bytes a stage subprocess
# writes (tests/stages/test_kill.py compares the two). Subprocesses inherit it; the tests that compare
# instruction sets start theirs with a clean environment (tests/ptqflow/test_kernels.py).
os.environ.update(PORTABLE_ENV)

#: The most workers ``-n auto`` starts: the tests that share the session's cold pipeline run (about half
#: the default run's time on two cores) stay on one worker, so more workers than this add memory, not speed.
MAX_WORKERS = 4

#: The test files whose tests use the session fixture ``cold_run`` (tests/stages/conftest.py): one work unit,
#: so the cold pipeline run is computed once. ``pytest_collection_modifyitems`` keeps this list honest.
COLD_RUN_FILES = ("tests/stages/test_pipeline.py", "tests/stages/test_sharing.py", "tests/stages/test_team.py")
COLD_RUN = "cold_run"


@pytest.hookimpl(optionalhook=True)  # xdist's hooks: pytest without xdist (or -p no:xdist) runs too
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core this process may use (its CPU affinity and cgroup quota, not the
    machine's count: :func:`ptqflow.kernels.usable_cores`)."""
    return max(1, min(usable_cores(), MAX_WORKERS))


# Under -n N each worker's own ops get its share of the cores, not all of them: N workers with all the
# cores' threads each would wait at every small op's barrier (the contention collapse of issue 17).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, usable_cores() // _workers))


def _unit(nodeid: str) -> str:
    """The work unit of a test under ``--dist loadfile``: its file, the cold-run files together."""
    path = nodeid.split("::", 1)[0]
    return COLD_RUN if path in COLD_RUN_FILES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadfile`` with the cold-run files as one unit (xdist's ``xdist_group`` marks do not reach
    its scheduler under pytest 9.2, whose node ids no longer come from the attribute xdist rewrites)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ColdRunTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ColdRunTogether(config, log)  # type: ignore[arg-type]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The cold-run unit first (with ``--no-loadscope-reorder`` units go out in collection order): it is the
    longest, so the other workers take the rest meanwhile. A test outside :data:`COLD_RUN_FILES` that uses
    the cold run would recompute it on its own worker: refused here."""
    for item in items:
        if COLD_RUN in getattr(item, "fixturenames", ()) and _unit(item.nodeid) != COLD_RUN:
            raise pytest.UsageError(f"{item.nodeid} uses {COLD_RUN}: add its file to tests/conftest.py COLD_RUN_FILES")
    items.sort(key=lambda item: _unit(item.nodeid) != COLD_RUN)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
