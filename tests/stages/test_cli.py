"""The command line itself; every bad-input case lives in test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from helpers import write_fake_fashion_mnist

from stages.cli import cli


def test_help_lists_every_stage() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    stages = ("prepare", "features", "quantize", "sensitivity", "search", "select", "plan", "reconstruct")
    for name in (*stages, "predict", "evaluate", "export", "train", "publish-weights", "share"):
        assert name in result.output
    result = runner.invoke(cli, ["quantize", "--help"])
    assert result.exit_code == 0 and "--features" in result.output and "--out" in result.output


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_entry_point_model_runs_features_and_quantize(tmp_path: Path) -> None:
    """A user's own module (tests/support/user_models.py) through the stages, by its entry point."""
    from user_models import tiny_net

    root = write_fake_fashion_mnist(tmp_path / "fm", train=20, test=5)
    torch.save(tiny_net().state_dict(), tmp_path / "w.pt")
    (tmp_path / "p.yaml").write_text(
        f"base: {{model: 'user_models:tiny_net', weights: {tmp_path / 'w.pt'}, device: cpu}}\n"
        f"prepare: {{data_root: {root}, calib_size: 8}}\n"
        "features: {batch_size: 8, chunk_size: 8, shard_size: 8}\n"
        "quantize: {bits: {w4a4: {weight_bits: 4, act_bits: 4}}, calib_size: 8, batch_size: 8}\n"
    )
    p = ["--params", str(tmp_path / "p.yaml")]
    assert _invoke([*p, "prepare", "--out", str(tmp_path / "prep")])[0] == 0
    code, out = _invoke(
        [*p, "features", "--calibration", str(tmp_path / "prep/calibration.pt"), "--out", str(tmp_path / "f.zarr")]
    )
    assert code == 0, out
    code, out = _invoke([*p, "quantize", "--features", str(tmp_path / "f.zarr"), "--out", str(tmp_path / "q")])
    assert code == 0, out
    payload = torch.load(tmp_path / "q" / "w4a4.pt", weights_only=True)
    assert payload["model"] == "user_models:tiny_net"
    assert any(k.startswith("units.1.") for k in payload["state_dict"])  # blocks.0: a BasicBlock unit


def test_image_index_needs_the_images_option(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("base: {device: cpu}\n")
    (tmp_path / "test.json").write_text("{}")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "w4a4.pt").write_bytes(b"")
    args = ["--params", str(tmp_path / "p.yaml"), "predict", "--test", str(tmp_path / "test.json")]
    code, out = _invoke([*args, "--models", f"rtn={tmp_path / 'q'}", "--out", str(tmp_path / "out")])
    assert code == 2 and "pass the folder's root with --images" in out and not (tmp_path / "out").exists()
