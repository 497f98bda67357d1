"""Graph-based placement vs the per-class quantized forwards it replaced (issue "Any model", item 3).

Run once with the old code on ``PYTHONPATH`` to save its results, then with this checkout to compare:

    PYTHONPATH=<old checkout>/src python bench/placement_equivalence.py --save old.pt
    python bench/placement_equivalence.py --against old.pt

Each model is built with seeded random weights and randomised BN statistics, quantized round-to-nearest
(weights by the Lp search, activations calibrated unit by unit on 16 seeded images), and run on 8 other
images. Compared: the RTN logits (max |diff|), the number of weight and activation quantizers, and per unit
the ordered list of activation scales (a scale is fixed by the tensor it quantizes, so equal lists mean the
same positions).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model, calibrate_activations
from ptqflow.units import UnitModel, extract_units

MODELS = {
    "resnet20": (1, 28),
    "mobilenetv2_s": (1, 28),
    "torchvision.resnet18": (3, 32),
    "torchvision.resnet50": (3, 32),
    "torchvision.mobilenet_v2": (3, 32),
    "torchvision.regnet_x_600mf": (3, 32),
    "torchvision.mnasnet1_0": (3, 32),
}
BITS = [(4, 4), (2, 4)]
CONVENTIONS = ["brecq", "qdrop"]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def _result(name: str, w: int, a: int, convention: str) -> dict[str, object]:
    channels, size = MODELS[name]
    model = _model(name)
    gen = torch.Generator().manual_seed(2)
    calib = torch.randn(16, channels, size, size, generator=gen)
    test = torch.randn(8, channels, size, size, generator=gen)
    fp_units = UnitModel(extract_units(fold_bn(model)))
    with torch.no_grad():
        inputs = [calib, *fp_units.forward_collect(calib)[:-1]]
    quant = build_quant_model(model, QuantConfig(weight_bits=w, act_bits=a, convention=convention))
    calibrate_activations(quant, lambda i: iter([inputs[i]]), 2.4, torch.device("cpu"))
    with torch.no_grad():
        logits = quant(test)
    scales = [[float(q.scale.detach()) for _, q in unit.act_quantizers()] for _, unit in quant.named_units()]
    return {
        "logits": logits,
        "layers": len(list(quant.quant_layers())),
        "acts": len(list(quant.act_quantizers())),
        "act_bits": [[q.bits for _, q in unit.act_quantizers()] for _, unit in quant.named_units()],
        "scales": scales,
        "units": list(quant.names),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write this checkout's results to FILE")
    group.add_argument("--against", help="compare this checkout's results with FILE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {f"{n} w{w}a{a} {c}": _result(n, w, a, c) for n in MODELS for w, a in BITS for c in CONVENTIONS}
    if args.save:
        torch.save(results, args.save)
        return 0
    old = torch.load(args.against, weights_only=True)
    failed = 0
    print("| model | setting | units | weight q | act q | max abs logit diff | act scales per unit |")
    print("|---|---|---|---|---|---|---|")
    for key, new in results.items():
        ref = old[key]
        diff = float((new["logits"] - ref["logits"]).abs().max())
        same_scales = new["scales"] == ref["scales"] and new["act_bits"] == ref["act_bits"]
        ok = (
            diff <= 1e-6
            and same_scales
            and new["layers"] == ref["layers"]
            and new["acts"] == ref["acts"]
            and len(new["units"]) == len(ref["units"])
        )
        failed += not ok
        name, setting = key.split(" ", 1)
        print(
            f"| {name} | {setting} | {len(new['units'])}/{len(ref['units'])} | {new['layers']}/{ref['layers']} | "
            f"{new['acts']}/{ref['acts']} | {diff:.1e} | {'equal' if same_scales else 'DIFFER'} |"
        )
    print(f"{len(results) - failed} equal, {failed} differ (new/old)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
