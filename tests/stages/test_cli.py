from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import write_fake_fashion_mnist

from ptqflow.models import build_model
from stages.cli import cli


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def test_help_lists_every_stage() -> None:
    code, out = _invoke(["--help"])
    assert code == 0
    for name in (
        "prepare",
        "features",
        "quantize",
        "reconstruct",
        "predict",
        "evaluate",
        "train",
        "publish-weights",
        "share",
    ):
        assert name in out
    code, out = _invoke(["quantize", "--help"])
    assert code == 0 and "--features" in out and "--out" in out


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("prepare: {calib_sise: 10}\n", "did you mean 'calib_size'"),
        ("prepare: {calib_size: -1}\n", "prepare.calib_size must be >= 1"),
        ("", "is empty"),
        ("prepare: [\n", "YAML syntax error"),
        ("prepare: {data_root: /nonexistent/fm}\n", "/nonexistent/fm/train-images-idx3-ubyte.gz"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, params: str, message: str) -> None:
    (tmp_path / "p.yaml").write_text(params)
    code, out = _invoke(["--params", str(tmp_path / "p.yaml"), "prepare", "--out", str(tmp_path / "out")])
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()


def test_calibration_larger_than_dataset(tmp_path: Path) -> None:
    root = write_fake_fashion_mnist(tmp_path / "fm", train=20, test=5)
    (tmp_path / "p.yaml").write_text(f"prepare: {{data_root: {root}, calib_size: 21}}\n")
    code, out = _invoke(["--params", str(tmp_path / "p.yaml"), "prepare", "--out", str(tmp_path / "out")])
    assert code == 2 and "prepare.calib_size must be in [1, 20]" in out
    assert not (tmp_path / "out").exists()


def test_wrong_architecture_weights(tmp_path: Path) -> None:
    root = write_fake_fashion_mnist(tmp_path / "fm", train=20, test=5)
    torch.save(build_model("mobilenetv2_s").state_dict(), tmp_path / "w.pt")
    (tmp_path / "p.yaml").write_text(
        f"base: {{model: resnet20, weights: {tmp_path / 'w.pt'}}}\nprepare: {{data_root: {root}, calib_size: 8}}\n"
    )
    args = ["--params", str(tmp_path / "p.yaml")]
    assert _invoke([*args, "prepare", "--out", str(tmp_path / "prep")])[0] == 0
    code, out = _invoke(
        [*args, "features", "--calibration", str(tmp_path / "prep/calibration.pt"), "--out", str(tmp_path / "f.zarr")]
    )
    assert code == 2 and "does not match the model architecture" in out
    assert not (tmp_path / "f.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".f.zarr")]


def test_unknown_model_name(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("base: {model: resnet99}\n")
    code, out = _invoke(
        [
            "--params",
            str(tmp_path / "p.yaml"),
            "features",
            "--calibration",
            str(tmp_path / "c.pt"),
            "--out",
            str(tmp_path / "f.zarr"),
        ]
    )
    assert code == 2 and "Error:" in out


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
