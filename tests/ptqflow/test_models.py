from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from ptqflow.errors import ModelError
from ptqflow.models import EMBEDDED_MODELS, build_model, load_state_dict_file, load_weights


@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_embedded_models_run_on_28x28(name: str) -> None:
    model = build_model(name).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_resnet18_from_local_file(tmp_path: Path) -> None:
    saved = build_model("torchvision.resnet18")
    torch.save(saved.state_dict(), tmp_path / "r18.pth")
    loaded = load_weights(build_model("torchvision.resnet18"), tmp_path / "r18.pth")
    for key, value in saved.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


def test_checkpoint_dict_with_state_dict_entry(tmp_path: Path) -> None:
    model = build_model("resnet20")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "c.pt"
    )
    assert set(load_state_dict_file(tmp_path / "c.pt")) == set(model.state_dict())


def test_unknown_model_lists_allowed() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnet21'.*resnet20"):
        build_model("resnet21")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="weights file not found"):
        load_weights(build_model("resnet20"), tmp_path / "nope.pt")


def test_wrong_architecture_is_named(tmp_path: Path) -> None:
    torch.save(build_model("mobilenetv2_s").state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelError, match="does not match the model architecture.*missing"):
        load_weights(build_model("resnet20"), tmp_path / "m.pt")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = build_model("resnet20", num_classes=7).state_dict()
    torch.save(state, tmp_path / "r.pt")
    with pytest.raises(ModelError, match=r"2 of another shape \(e.g. fc\.(weight|bias): file \(7"):
        load_weights(build_model("resnet20"), tmp_path / "r.pt")


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch PWNED",))


def test_pickle_payload_is_refused_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as fh:
        pickle.dump({"w": _Payload()}, fh)
    with pytest.raises(ModelError, match="cannot be loaded safely"):
        load_state_dict_file(Path("evil.pt"))
    assert not Path("PWNED").exists()


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "l.pt")
    with pytest.raises(ModelError, match="does not hold a state_dict"):
        load_state_dict_file(tmp_path / "l.pt")
