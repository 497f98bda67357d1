from __future__ import annotations

from pathlib import Path

import pytest

from ptqflow.errors import ConfigError
from ptqflow.sensitivity import SensitivityConfig
from stages.features import FeaturesConfig
from stages.params import BaseConfig, load_params, section
from stages.plan import PlanConfig
from stages.prepare import PrepareConfig
from stages.quantize import QuantizeConfig
from stages.reconstruct import ReconstructConfig
from stages.search import SearchStageConfig
from stages.select import Budget, SelectConfig

ROOT = Path(__file__).resolve().parents[2]


def test_root_params_parse() -> None:
    params = load_params(ROOT / "params.yaml")
    assert section(params, "base", BaseConfig).model == "resnet20"
    assert section(params, "prepare", PrepareConfig).calib_size == 1024
    assert set(section(params, "quantize", QuantizeConfig).bits) == {"w8a8", "w4a4", "w3a4", "w2a4"}
    assert section(params, "reconstruct", ReconstructConfig).recon().method == "qdrop"
    assert section(params, "sensitivity", SensitivityConfig).candidate_bits == (2, 4, 8)
    assert section(params, "search", SearchStageConfig).library().costs == ("size", "bitops")
    assert section(params, "select", SelectConfig).budget == Budget("avg_bits", 3.0)
    assert section(params, "plan", PlanConfig).form == "data_dependent"


@pytest.mark.parametrize(
    ("name", "cls", "data", "message"),
    [
        ("prepare", PrepareConfig, {"calib_sise": 3}, r"unknown key prepare.calib_sise; did you mean 'calib_size'\?"),
        ("prepare", PrepareConfig, {"calib_size": "many"}, r"prepare.calib_size must be an integer, got 'many'"),
        ("prepare", PrepareConfig, {"calib_size": 2.5}, r"prepare.calib_size must be an integer"),
        ("prepare", PrepareConfig, {"calib_size": 0}, r"prepare.calib_size must be >= 1, got 0"),
        ("prepare", PrepareConfig, {"calib_size": True}, r"prepare.calib_size must be an integer"),
        ("base", BaseConfig, {"device": "tpu"}, r"base.device must be one of 'auto', 'cpu', 'cuda'"),
        ("features", FeaturesConfig, {"dtype": "int8"}, r"features.dtype must be one of 'float32', 'float16'"),
        ("features", FeaturesConfig, {"shard_size": 100}, r"features.shard_size must be a multiple of chunk_size"),
        (
            "quantize",
            QuantizeConfig,
            {"bits": {"w9": {"weight_bits": 9, "act_bits": 4}}},
            r"quantize.bits.w9.weight_bits must be an integer in 2..8, got 9",
        ),
        ("quantize", QuantizeConfig, {"bits": {"w1": {"weight_bits": 1, "act_bits": 4}}}, r"in 2..8, got 1"),
        (
            "quantize",
            QuantizeConfig,
            {"bits": {"x": {"weight_bits": 4, "act_bits": 3.5}}},
            r"quantize.bits.x.act_bits must be an integer, got 3.5",
        ),
        ("quantize", QuantizeConfig, {"bits": {"x": {"weight_bits": 4}}}, r"quantize.bits.x.act_bits is required"),
        ("quantize", QuantizeConfig, {"bits": {"a/b": {"weight_bits": 4, "act_bits": 4}}}, r"names may hold"),
        ("quantize", QuantizeConfig, {"bits": {}}, r"quantize.bits must name at least one"),
        ("quantize", QuantizeConfig, {"bits": [4, 4]}, r"quantize.bits must be a mapping"),
        ("quantize", QuantizeConfig, {"p": "two"}, r"quantize.p must be a number"),
        (
            "quantize",
            QuantizeConfig,
            {"convention": "mqbench"},
            r"quantize.convention must be one of 'brecq', 'qdrop'",
        ),
        ("prepare", PrepareConfig, [1, 2], r"prepare must be a mapping of keys"),
        ("reconstruct", ReconstructConfig, {"keep_prob": 1.5}, r"reconstruct.keep_prob must be in \[0, 1\], got 1.5"),
        ("reconstruct", ReconstructConfig, {"keep_prob": -0.1}, r"reconstruct.keep_prob must be in \[0, 1\]"),
        ("reconstruct", ReconstructConfig, {"iters": -5}, r"reconstruct.iters must be >= 1, got -5"),
        ("reconstruct", ReconstructConfig, {"method": "adaquant"}, r"reconstruct.method must be one of 'brecq'"),
        ("reconstruct", ReconstructConfig, {"drop_prob": 0.5}, r"unknown key reconstruct.drop_prob"),
        ("reconstruct", ReconstructConfig, {"targets": []}, r"reconstruct.targets must name at least one"),
        ("reconstruct", ReconstructConfig, {"granularity": "unit"}, r"reconstruct.granularity must be one of"),
    ],
)
def test_bad_values_name_the_dotted_key(name: str, cls: type, data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        section({name: data}, name, cls)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "none.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_params(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("base:\n  model: [resnet20\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "sec.yaml").write_text("prepair: {}\n")
    with pytest.raises(ConfigError, match=r"unknown section; did you mean 'prepare'\?"):
        load_params(tmp_path / "sec.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_params(tmp_path / "list.yaml")
