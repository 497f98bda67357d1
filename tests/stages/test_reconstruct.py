from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptqflow.errors import ModelError
from stages.reconstruct import read_plan, unit_groups

NAMES = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "head"]


def test_granularities() -> None:
    assert unit_groups(NAMES, "block", None) == [[0], [1], [2], [3], [4], [5]]
    assert unit_groups(NAMES, "stage", None) == [[0], [1, 2], [3, 4], [5]]
    assert unit_groups(NAMES, "net", None) == [[0, 1, 2, 3, 4, 5]]


def test_plan_merges_adjacent_units(tmp_path: Path) -> None:
    plan = {"groups": [["stem"], ["layer1.0"], ["layer1.1", "layer2.0"], ["layer2.1"], ["head"]]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert unit_groups(NAMES, "block", read_plan(tmp_path / "plan.json")) == [[0], [1], [2, 3], [4], [5]]


def test_plan_that_does_not_match_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unit plan does not match the model"):
        unit_groups(NAMES, "block", [["stem"], ["layer1.1", "layer1.0"], ["layer2.0", "layer2.1", "head"]])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ModelError, match="not a JSON file with a 'groups' list"):
        read_plan(tmp_path / "bad.json")
