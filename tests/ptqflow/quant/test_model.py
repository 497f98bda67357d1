from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import calibrate_on, randomize_bn

from ptqflow.atomic import atomic_save_torch
from ptqflow.errors import ConfigError, ModelError
from ptqflow.models import build_model
from ptqflow.quant.model import (
    QuantConfig,
    QuantModel,
    build_quant_model,
    load_quant_file,
    quant_payload,
)


def _calibrated(fp: torch.nn.Module, config: QuantConfig) -> tuple[QuantModel, torch.Tensor]:
    model = build_quant_model(fp, config)
    x = torch.randn(16, 1, 28, 28)
    return calibrate_on(model, x), x


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_s"])
def test_w8a8_is_close_to_fp(name: str) -> None:
    fp = randomize_bn(build_model(name))
    model, x = _calibrated(fp, QuantConfig(weight_bits=8, act_bits=8))
    with torch.no_grad():
        ref, out = fp(x), model(x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cos > 0.99


def test_first_last_and_stem_bits() -> None:
    model = build_quant_model(build_model("resnet20"), QuantConfig(weight_bits=2, act_bits=3))
    bits = model.bit_config()
    weights = list(bits["weights"].values())
    assert weights[0] == 8 and weights[-1] == 8 and set(weights[1:-1]) == {2}
    assert bits["activations"]["stem.act_relu"] == 8
    assert {b for n, b in bits["activations"].items() if not n.startswith("stem")} == {3}


def test_per_use_quantizers_for_shared_relu() -> None:
    # torchvision's BasicBlock calls one ReLU module twice: each use must get its own quantizer.
    model = build_quant_model(build_model("resnet20"), QuantConfig())
    names = [n for n, _ in model.act_quantizers() if n.startswith("layer1.0.")]
    assert names == ["layer1.0.act_relu", "layer1.0.act_relu_1"]


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, x = _calibrated(randomize_bn(build_model("resnet20")), QuantConfig(weight_bits=3, act_bits=4))
    atomic_save_torch(quant_payload(model, "resnet20", QuantConfig(weight_bits=3, act_bits=4)), tmp_path / "q.pt")
    loaded, name, config = load_quant_file(tmp_path / "q.pt", build_model)
    assert name == "resnet20" and config.weight_bits == 3
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ModelError, match="not a ptqflow quantized model"):
        load_quant_file(tmp_path / "x.pt", build_model)
    (tmp_path / "y.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        load_quant_file(tmp_path / "y.pt", build_model)


def test_size_shrinks_with_bits() -> None:
    fp = build_model("resnet20")
    sizes = [build_quant_model(fp, QuantConfig(weight_bits=b), init_weights=False).size_bytes() for b in (2, 4, 8)]
    assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_last_weight_bits"])
def test_config_rejects_bad_bits(field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be an integer in 2..8"):
        QuantConfig(**{field: 9})  # type: ignore[arg-type]


def test_conventions_place_the_8bit_exceptions() -> None:
    brecq = build_quant_model(build_model("resnet20"), QuantConfig(weight_bits=2, act_bits=3, convention="brecq"))
    qdrop = build_quant_model(build_model("resnet20"), QuantConfig(weight_bits=2, act_bits=3, convention="qdrop"))
    b, q = brecq.bit_config()["activations"], qdrop.bit_config()["activations"]
    assert b["stem.act_relu"] == 8 and b["layer3.2.act_relu_1"] == 3
    assert q["stem.act_relu"] == 3 and q["layer3.2.act_relu_1"] == 8
    assert brecq.unit_kinds()[0] == "stem" and brecq.unit_kinds()[-1] == "head"
