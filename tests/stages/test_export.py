from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import calibrate_on, randomize_bn

from ptqflow.atomic import atomic_save_torch
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model, quant_payload
from stages.cli import cli

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two quantized ResNet-20s (random weights) and a 40-image test split."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    fp = randomize_bn(build_model("resnet20"))
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    torch.save({"images": images, "labels": torch.arange(40) % 10}, root / "test.pt")
    calib = torch.randn(2, 1, 28, 28)  # a tiny calibration batch keeps the range search quick
    for name, bits in (("w4a4", 4), ("w2a4", 2)):
        model = calibrate_on(build_quant_model(fp, QuantConfig(weight_bits=bits, act_bits=4)), calib)
        atomic_save_torch(quant_payload(model, "resnet20", QuantConfig(weight_bits=bits, act_bits=4)),
                          root / "models" / f"{name}.pt")  # fmt: skip
    return root


def _invoke(root: Path, params: str, out: str = "out") -> tuple[int, str]:
    (root / "params.yaml").write_text(params)
    args = ["--params", str(root / "params.yaml"), "export", "--models", str(root / "models"), "--test"]
    args += [str(root / "test.pt"), "--out", str(root / out), "--metrics", str(root / f"{out}.json")]
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


PARAMS = "export: {opset: 21, batch_size: 16}\n"


def test_export_writes_checked_artifacts_deterministically(workspace: Path) -> None:
    code, out = _invoke(workspace, PARAMS)
    assert code == 0, out
    assert "w2a4" in out and "top-1 onnx" in out
    files = sorted(p.name for p in (workspace / "out").iterdir())
    assert files == [f"{n}{ext}" for n in ("w2a4", "w4a4") for ext in (".json", ".onnx", ".state_dict.pt")]
    metrics = json.loads((workspace / "out.json").read_text())
    assert metrics["samples"] == 40 and metrics["opset"] == 21
    for name in ("w2a4", "w4a4"):
        m = metrics[name]
        assert m["agreement"] >= 99.5 and abs(m["top1_onnx"] - m["top1_torch"]) <= 0.1
        assert m["weight_bits"] == int(name[1]) and m["act_bits"] == 4
        assert set(m["fused"]) == {"top1_onnx", "agreement", "max_abs_logit_diff"}
        # the second check: onnxruntime's fused integer kernels against the integer-exact simulation
        assert m["fused"]["agreement"] >= 99.5 and abs(m["fused"]["top1_onnx"] - m["top1_int"]) <= 0.1
        assert m["bias"] == "int32" and m["scheme"] == "asymmetric" and m["int_agreement"] >= 99.5
        assert m["tensorrt"]["ready"] is False and m["tensorrt"]["first"][0].startswith("rule 1:")
        if importlib.util.find_spec("openvino") is None:
            assert "pip install" in m["openvino"]["skipped"]
        else:
            assert m["openvino"]["agreement"] >= 99.0
    assert metrics["w4a4"]["containers"] == ["INT4", "INT8", "UINT8"]  # INT8: first/last layer weights
    assert metrics["w2a4"]["containers"] == ["INT8", "UINT8"]
    table = json.loads((workspace / "out" / "w2a4.json").read_text())
    assert table["model"] == "resnet20" and table["weights"]["layer1.0.conv1"]["clip"] is None
    state = torch.load(workspace / "out" / "w2a4.state_dict.pt", weights_only=True)
    assert set(state) == {f"{n}.{p}" for n in table["weights"] for p in ("weight", "bias")}

    code, _ = _invoke(workspace, PARAMS, out="again")
    assert code == 0
    for path in (workspace / "out").iterdir():
        assert (workspace / "again" / path.name).read_bytes() == path.read_bytes(), path.name


# Bad export params and model files: tests/stages/test_bad_input.py (the catalogue's export-* cases).


def test_export_checks_on_an_image_folder(tmp_path: Path) -> None:
    """A user's image folder (prepare's test.json index, streamed with --images): the same checked
    artifacts, the input's preprocessing (mean, std, resize, crop) recorded for the runtime."""
    from helpers import write_fake_image_folder

    from stages import prepare

    root = write_fake_image_folder(tmp_path / "images", classes=3, train_per_class=2, val_per_class=2)
    params = {"prepare": {"dataset": "imagefolder", "data_root": str(root), "calib_size": 4, "image_size": 16,
                          "resize_size": 18}}  # fmt: skip
    prepare.run(params, tmp_path / "prep")
    torch.manual_seed(0)
    fp = randomize_bn(build_model("torchvision.mobilenet_v3_small"))
    config = QuantConfig(weight_bits=4, act_bits=4)
    model = calibrate_on(build_quant_model(fp, config), torch.randn(2, 3, 16, 16))
    atomic_save_torch(quant_payload(model, "torchvision.mobilenet_v3_small", config), tmp_path / "m" / "w4a4.pt")
    (tmp_path / "params.yaml").write_text(PARAMS)
    args = ["--params", str(tmp_path / "params.yaml"), "export", "--models", str(tmp_path / "m"), "--test",
            str(tmp_path / "prep" / "test.json"), "--images", str(root), "--out", str(tmp_path / "out"),
            "--metrics", str(tmp_path / "out.json")]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out.json").read_text())
    assert metrics["samples"] == 6 and metrics["w4a4"]["agreement"] >= 99.5
    table = json.loads((tmp_path / "out" / "w4a4.json").read_text())
    assert table["input"]["shape"] == ["batch", 3, 16, 16]
    assert table["input"]["preprocess"]["crop"] == 16 and len(table["input"]["preprocess"]["mean"]) == 3
