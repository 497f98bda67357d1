"""Zoo coverage (README "Any model"): every torchvision classifier, random weights, W4A4.

The default run checks a light sample; ``-m slow`` runs the rest of ``torchvision.models.list_models()``
and a sample of timm CNN families (``pip install -e '.[timm]'``). ``bench/zoo_coverage.py`` prints the
README table from the same :func:`ptqflow.coverage.check_model`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from ptqflow.coverage import bn_statistics, check_model
from ptqflow.errors import ModelError

#: A few seconds each on 2 CPU cores: the default run.
LIGHT = {"mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1", "regnet_y_400mf", "efficientnet_b0"}
#: Fixed-size or adaptive-pooling architectures (see bench/zoo_coverage.py).
VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
SIZES = {"inception_v3": 96, "alexnet": 224, "maxvit_t": 224, **dict.fromkeys(VITS, 224)}
SIZES.update({f"vgg{d}{bn}": 224 for d in (11, 13, 16, 19) for bn in ("", "_bn")})
#: Models refused with a one-line reason: none since attention is decomposed (ptqflow.attention).
REFUSED: dict[str, str] = {}
#: Heavier than the rest: the checks pass, but the ONNX file would exceed protobuf's 2 GiB.
NO_EXPORT = {"regnet_y_128gf", "vit_h_14"}

MODELS = sorted(torchvision.models.list_models(module=torchvision.models))


def _run(model: torch.nn.Module, name: str, tmp_path: Path) -> None:
    size = SIZES.get(name, 64)
    if name in REFUSED:
        with pytest.raises(ModelError, match=REFUSED[name]) as info:
            check_model(model, torch.randn(2, 3, size, size), tmp_path)
        assert "\n" not in str(info.value) and "base.float_leaves" in str(info.value)
        return
    report = check_model(model, torch.randn(2, 3, size, size), tmp_path, export=name not in NO_EXPORT)
    assert report.unquantized == [] and report.probe_violations == [], report
    assert report.passed, report.to_json()


@pytest.mark.parametrize("name", [pytest.param(m, marks=[] if m in LIGHT else [pytest.mark.slow]) for m in MODELS])
def test_torchvision_model(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    extra = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    _run(bn_statistics(model, torch.randn(4, 3, SIZES.get(name, 64), SIZES.get(name, 64))), name, tmp_path)


TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "rexnet_100", "ghostnet_100",
        "convnext_atto", "mixnet_s", "dla34", "cspresnet50", "dpn68", "lcnet_050", "repvgg_a0",
        "resnest14d"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm_model(name: str, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = bn_statistics(timm.create_model(name, pretrained=False, num_classes=10), torch.randn(4, 3, 64, 64))
    try:
        _run(model, name, tmp_path)
    except ModelError as exc:  # the README lists which timm families trace; a refusal must still be one line
        assert "\n" not in str(exc) and "base.float_leaves" in str(exc)
        pytest.skip(f"refused: {exc}")
