"""The strict params loader on the real params.yaml; every bad-value case lives in test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

from ptqflow.sensitivity import SensitivityConfig
from stages.evaluate import EvaluateConfig
from stages.features import FeaturesConfig
from stages.params import BaseConfig, load_params, section
from stages.plan import PlanConfig
from stages.predict import PredictConfig
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
    assert section(params, "features", FeaturesConfig).shard_size == 256
    assert set(section(params, "quantize", QuantizeConfig).bits) == {"w8a8", "w4a4", "w3a4", "w2a4"}
    assert section(params, "reconstruct", ReconstructConfig).recon().method == "qdrop"
    assert section(params, "sensitivity", SensitivityConfig).candidate_bits == (2, 3, 4, 8)
    assert section(params, "search", SearchStageConfig).library().costs == ("size", "bitops")
    assert section(params, "select", SelectConfig).budget == Budget("avg_bits", 3.0)
    assert section(params, "plan", PlanConfig).form == "data_dependent"
    assert section(params, "predict", PredictConfig).batch_size == 500
    assert section(params, "evaluate", EvaluateConfig).topk == (1, 5)
