"""The Python API (``ptqflow.quantize`` and friends), and the README's example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn

import ptqflow
from ptqflow.errors import ConfigError, ModelError
from ptqflow.quant.model import QuantModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_and_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(ptqflow.build_model("resnet20")).eval()
    images = torch.randn(48, 1, 28, 28)
    with torch.no_grad():
        labels = model(images).argmax(1)  # the FP model's own predictions: its top-1 is 100 %
    return model, images, labels


def test_quantize_returns_a_quantized_module_and_leaves_the_model_alone(model_and_data) -> None:  # type: ignore[no-untyped-def]
    model, images, labels = model_and_data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rtn = ptqflow.quantize(model, images, weight_bits=4, act_bits=4, method="rtn", device="cpu")
    assert isinstance(rtn, QuantModel) and rtn.bit_config()["weights"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    qdrop = ptqflow.quantize(model, loader, weight_bits=4, act_bits=4, method="qdrop", iters=20, device="cpu")
    fp, q = (
        ptqflow.evaluate_model(model, loader, topk=(1,)),
        ptqflow.evaluate_model(qdrop, (images, labels), topk=(1,)),
    )
    assert fp == {"top1": 100.0} and 0 <= q["top1"] <= 100


def test_the_api_gives_the_bytes_of_the_same_recipe_twice(model_and_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, images, _ = model_and_data
    for name in ("a", "b"):
        q = ptqflow.quantize(model, images, weight_bits=2, act_bits=4, method="brecq", iters=4, device="cpu")
        ptqflow.save_model(q, tmp_path / f"{name}.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    again = ptqflow.load_model(tmp_path / "a.pt", model)
    with torch.no_grad():
        assert torch.equal(again(images), q.eval()(images))
    assert ptqflow.load_model(tmp_path / "a.pt", "resnet20").bit_config() == q.bit_config()


def test_export_checks_onnxruntime_against_torch(model_and_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    model, images, labels = model_and_data
    q = ptqflow.quantize(model, images, weight_bits=4, act_bits=4, method="rtn", device="cpu")
    result = ptqflow.export_model(q, tmp_path / "m.onnx", images[:1], check=(images, labels))
    assert result["agreement"] >= 99.5 and "fused_agreement" in result and (tmp_path / "m.onnx").stat().st_size > 0


def test_bad_calls_are_one_line_ptqflow_errors(model_and_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, images, labels = model_and_data
    with pytest.raises(ConfigError, match="method must be one of 'rtn', 'qdrop', 'brecq', got 'adaquant'"):
        ptqflow.quantize(model, images, method="adaquant")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weight_bits must be an integer in 2..8, got 9"):
        ptqflow.quantize(model, images, weight_bits=9, method="rtn")
    with pytest.raises(ConfigError, match="evaluate needs labelled data"):
        ptqflow.evaluate_model(model, images)
    with pytest.raises(ConfigError, match="topk: 20 exceeds the 10 classes"):
        ptqflow.evaluate_model(model, (images, labels), topk=(1, 20))
    with pytest.raises(ModelError, match="save_model\\(\\) takes a model returned by ptqflow.quantize"):
        ptqflow.save_model(model, tmp_path / "x.pt")  # type: ignore[arg-type]
    assert not (tmp_path / "x.pt").exists()


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """The README's Python block, as written, in a fresh interpreter."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S)
    assert block, "README.md has no <!-- api-example --> python block"
    result = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "top1" in result.stdout


def test_importing_ptqflow_is_cheap_and_lists_its_api() -> None:
    code = "import sys, ptqflow; print('torch' in sys.modules, ptqflow.__version__, sorted(ptqflow.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False 0.1.0") and "'quantize'" in out and "'PtqflowError'" in out
