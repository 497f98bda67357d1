"""The command line itself; every bad-input case lives in test_bad_input.py."""

from __future__ import annotations

from click.testing import CliRunner

from stages.cli import cli


def test_help_lists_every_stage() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("prepare", "features", "quantize", "reconstruct", "evaluate", "train", "publish-weights"):
        assert name in result.output
    result = runner.invoke(cli, ["quantize", "--help"])
    assert result.exit_code == 0 and "--features" in result.output and "--out" in result.output
