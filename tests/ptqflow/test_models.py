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


def test_entry_point_builds_a_users_module() -> None:
    from user_models import UserNet

    model = build_model("user_models:tiny_net")
    assert isinstance(model, UserNet)
    assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_package.models:net", r"cannot import 'no_such_package.models' \(ModuleNotFoundError.*PYTHONPATH"),
        ("user_models:missing", "has no callable 'missing'"),
        ("user_models:not_a_module", r"returned list, not an nn.Module"),
        ("user_models:raises", r"raises\(\) raised RuntimeError: no weights for you"),
        ("user_models:", "must look like 'package.module:factory'"),
        (":tiny_net", "must look like 'package.module:factory'"),
    ],
)
def test_entry_point_errors_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message) as info:
        build_model(spec)
    assert "\n" not in str(info.value)


def test_torchvision_models_default_to_imagenet_classes() -> None:
    assert build_model("torchvision.resnet18").fc.out_features == 1000
    assert build_model("torchvision.resnet18", num_classes=10).fc.out_features == 10
    assert build_model("resnet20").fc.out_features == 10


def test_regnet_x_600mf_has_the_published_design() -> None:
    model = build_model("torchvision.regnet_x_600mf")
    stages = list(model.trunk_output.children())
    assert [len(s) for s in stages] == [1, 3, 5, 7]
    assert [s[0].f.c[0].out_channels for s in stages] == [48, 96, 240, 528]
    assert {s[0].f.b[0].in_channels // s[0].f.b[0].groups for s in stages} == {24}  # group width 24
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 6.2


def test_missing_torchvision_weights_say_where_to_get_them(tmp_path: Path) -> None:
    path = tmp_path / "weights" / "resnet18.pth"
    with pytest.raises(ModelError) as info:
        load_weights(build_model("torchvision.resnet18"), path, "torchvision.resnet18")
    message = str(info.value)
    assert "\n" not in message and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"save it as {path}" in message
    with pytest.raises(ModelError, match="convert a pycls regnet_x_600mf checkpoint"):
        load_weights(build_model("torchvision.regnet_x_600mf"), path, "torchvision.regnet_x_600mf")


def test_resnet20_block_is_torchvisions_op_for_op() -> None:
    """ptqflow's BasicBlock stands in for torchvision's (models.py docstring): the same parameters drawn in
    the same order, the same traced graph node for node, the same outputs bit for bit."""
    import torch.fx
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    from ptqflow.models import BasicBlock

    def pair(block: type[torch.nn.Module]) -> torch.nn.Module:
        torch.manual_seed(3)
        down = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16))
        return torch.nn.Sequential(block(8, 16, 2, down), block(16, 16)).eval()

    ours, theirs = pair(BasicBlock), pair(TorchvisionBlock)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key

    def nodes(model: torch.nn.Module) -> list[tuple[str, str, str]]:
        return [(n.op, n.name, str(n.target)) for n in torch.fx.symbolic_trace(model).graph.nodes]

    assert nodes(ours) == nodes(theirs)
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(ours(x), theirs(x))


def test_the_embedded_resnet20_stages_never_import_torchvision() -> None:
    """Every stage module and the ResNet-20 build leave torchvision unimported (3.5 s of each stage process's
    start on a 2-core AMD EPYC); torchvision's own models still build (it is imported then)."""
    import subprocess
    import sys

    code = (
        "import sys, importlib\n"
        "for m in ('check', 'prepare', 'features', 'quantize', 'sensitivity', 'search', 'select', 'plan',\n"
        "          'reconstruct', 'predict', 'evaluate', 'export', 'cli'):\n"
        "    importlib.import_module('stages.' + m)\n"
        "from ptqflow.models import build_model\n"
        "build_model('resnet20')\n"
        "assert 'torchvision' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torchvision'))\n"
        "build_model('mobilenetv2_s')\n"
        "assert 'torchvision' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
