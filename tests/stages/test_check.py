"""``stages.check``: what the first stage finds from the params and the files they name alone.

The catalogue of bad params values runs through ``check`` in ``test_bad_input.py``; here are the checks that
join a model to a dataset (outputs against classes, top-k, input channels) and the model-code rule.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_fake_fashion_mnist, write_fake_image_folder

from ptqflow.errors import ConfigError, ModelError
from ptqflow.models import build_model
from stages import check

SUPPORT = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check")
    paths = {"fashion": write_fake_fashion_mnist(root / "fm", train=16, test=8)}
    paths["folder"] = write_fake_image_folder(root / "folder", classes=3, train_per_class=2, val_per_class=1)
    for name in ("three_outputs", "rgb_ten_outputs", "tiny_net"):
        torch.save(build_model(f"user_models:{name}").state_dict(), root / f"{name}.pt")
    paths["weights"] = root
    return paths


def _params(data: dict[str, Path], model: str, folder: bool, **sections: Any) -> dict[str, Any]:
    prepare = {"data_root": str(data["folder" if folder else "fashion"]), "calib_size": 4}
    if folder:
        prepare.update(dataset="imagefolder", image_size=32, resize_size=36)
    base = {"model": f"user_models:{model}", "weights": str(data["weights"] / f"{model}.pt"), "device": "cpu"}
    base["model_code"] = str(SUPPORT / "user_models.py")
    params: dict[str, Any] = {"base": base, "prepare": prepare, "quantize": {"calib_size": 4}}
    params.update(sections)
    return params


def test_a_head_with_fewer_outputs_than_classes_stops(data: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="has 3 outputs but .* has 10 classes; its head must have one output"):
        check.run(_params(data, "three_outputs", folder=False))


def test_a_head_with_more_outputs_than_classes_warns(data: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """1000-class weights on a 3-class folder score near 0 everywhere: said before any work, not after."""
    with caplog.at_level(logging.WARNING, logger="ptqflow"):
        warnings = check.run(_params(data, "rgb_ten_outputs", folder=True, evaluate={"topk": [1]}))
    assert len(warnings) == 1 and "has 10 outputs" in warnings[0] and "has 3 classes" in warnings[0]
    assert warnings[0] in caplog.text


def test_topk_above_the_classes_stops_before_any_stage(data: dict[str, Path]) -> None:
    """The 3-class folder whose run stopped at its last stage (evaluate) now stops at its first."""
    with pytest.raises(ConfigError, match="evaluate.topk: 5 exceeds the 3 classes"):
        check.run(_params(data, "rgb_ten_outputs", folder=True, evaluate={"topk": [1, 5]}))


def test_a_model_that_cannot_read_the_images_stops(data: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"fails on one \(3, 32, 32\) input of prepare.data_root: RuntimeError"):
        check.run(_params(data, "tiny_net", folder=True))


def test_model_code_must_hold_an_entry_point_of_the_project(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the project, the entry point's module must lie in ``base.model_code`` (its file or a folder
    above it), or editing the model would rerun nothing; an installed package is not asked for."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "__init__.py").write_text("")
    (tmp_path / "nets" / "cnn.py").write_text("from user_models import tiny_net as build\n")
    (tmp_path / "other.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    params = _params(data, "tiny_net", folder=False)
    params["base"]["model"] = "nets.cnn:build"
    for code in ("nets/cnn.py", "nets", "."):
        params["base"]["model_code"] = code
        assert check.run(params) == []
    params["base"]["model_code"] = "other.py"
    with pytest.raises(ConfigError, match=r"base.model_code: other.py does not hold nets.cnn \(nets/cnn.py\)"):
        check.run(params)
    params["base"]["model_code"] = "gone.py"
    with pytest.raises(ConfigError, match="base.model_code: gone.py does not exist"):
        check.run(params)
    params["base"].update(model="user_models:tiny_net", model_code="other.py")  # outside this project
    assert check.run(params) == []


def test_the_output_names_the_sections_not_their_values(data: dict[str, Path], tmp_path: Path) -> None:
    """Downstream stages depend on check.json, so it must not change when a value does."""
    first = _params(data, "tiny_net", folder=False)
    second = _params(data, "tiny_net", folder=False, quantize={"calib_size": 3})
    check.run(first, tmp_path / "a")
    check.run(second, tmp_path / "b")
    assert (tmp_path / "a" / "check.json").read_bytes() == (tmp_path / "b" / "check.json").read_bytes()


def test_an_export_stage_without_the_export_extra_stops_at_the_check(
    data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel installed without ``[export]`` ran every stage and failed at the last one; now the first."""
    real = check.importlib.util.find_spec
    monkeypatch.setattr(
        check.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"the export stage needs onnxruntime, not installed: pip install 'ptqflow\[export\]'"
    ):
        check.run(_params(data, "tiny_net", folder=False, export={}))
    assert check.run(_params(data, "tiny_net", folder=False)) == []  # no export section: not needed


def test_a_holdout_that_leaves_no_batch_to_train_on_stops(data: dict[str, Path]) -> None:
    """The stopping rule's held-out images come out of the calibration draw: said at the check, not after
    features and quantize have run."""
    quantize = {"calib_size": 4, "bits": {"w2a4": {"weight_bits": 2, "act_bits": 4}}}

    def params(holdout: int) -> dict[str, Any]:
        recon = {"targets": ["w2a4"], "batch_size": 2, "holdout": holdout, "stop_patience": 2}
        return _params(data, "tiny_net", folder=False, quantize=quantize, reconstruct=recon)

    with pytest.raises(ConfigError, match="reconstruct.holdout: 3 of prepare.calib_size 4 images held out leaves 1"):
        check.run(params(3))
    check.run(params(2))
