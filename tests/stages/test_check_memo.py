"""``stages.check_memo``: the always-run check stage replays its outputs, without torch, only when nothing
it reads changed; any change to what it reads (params, weights, dataset, memo) means the full check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_fake_fashion_mnist

from ptqflow.models import build_model
from stages import check_memo

ROOT = Path(__file__).resolve().parents[2]
#: Runs the CLI in a fresh interpreter and reports whether the command imported torch.
_PROBE = (
    "import sys\n"
    "from stages.cli import cli\n"
    "try:\n"
    "    cli(sys.argv[1:])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported', 'exit', code)\n"
)
REPLAYED = "nothing they name changed since the last check"


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()  # the memo lives in the project's .dvc/tmp
    data = write_fake_fashion_mnist(tmp_path / "fm", train=16, test=8)
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(weights="r20.pt", device="cpu", model_code="")  # no model code to track
    params["prepare"].update(data_root=str(data), calib_size=16)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def _check(project: Path) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "check", "--out", "data/check"],
        cwd=project, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.strip(), result.stderr


def _outputs(project: Path) -> dict[str, bytes]:
    out = project / "data" / "check"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_the_memo_replays_the_same_bytes_without_torch(project: Path) -> None:
    status, log = _check(project)
    assert status == "torch imported exit 0" and REPLAYED not in log, log
    full = _outputs(project)
    assert json.loads(full["check.json"])["sections"]
    status, log = _check(project)
    assert status == "torch not imported exit 0" and REPLAYED in log, log
    assert _outputs(project) == full


def test_the_key_moves_with_everything_the_check_reads(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    text = (project / "params.yaml").read_text()
    params = yaml.safe_load(text)
    out = Path("data/check")

    def key() -> str:
        return check_memo.key(text, params, out, code=False)

    first = key()
    assert key() == first and check_memo.key(text, params, out, code=True) != first
    assert check_memo.key(text + "# a comment\n", params, out, code=False) != first  # any byte of the params
    os.utime(project / "r20.pt", ns=(0, 0))  # the weights touched
    second = key()
    assert second != first
    (project / "fm" / "t10k-labels-idx1-ubyte.gz").unlink()  # a dataset file gone
    assert key() != second


def test_a_damaged_or_foreign_memo_is_no_memo(tmp_path: Path) -> None:
    out, memo = tmp_path / "out", tmp_path / "memo.json"
    out.mkdir()
    (out / "check.json").write_text('{"sections": ["base"]}\n')
    check_memo.record(memo, "k1", out, ["a warning"])
    assert check_memo.replay(memo, "k2", tmp_path / "replayed") is None
    assert check_memo.replay(memo, "k1", tmp_path / "replayed") == ["a warning"]
    assert (tmp_path / "replayed" / "check.json").read_bytes() == (out / "check.json").read_bytes()
    memo.write_text("{not json")
    assert check_memo.replay(memo, "k1", tmp_path / "again") is None and not (tmp_path / "again").exists()
