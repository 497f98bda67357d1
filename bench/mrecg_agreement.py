"""Our MRECG plans (data-free ModCap) against the merge patterns decoded from the public MRECG code.

The public code hard-codes one merge scheme per model instead of computing ModCap (algorithms.md section 6);
decoded onto torchvision's unit lists it is the table below. The data-free ModCap needs only parameter
counts, strides and bits, so it is computed here from torchvision's architectures (random weights, no
data, nothing downloaded), as is the stage-boundary form. Prints, per model and form (data-free with
each stride penalty alpha, stage boundary), our merged groups, the decoded ones, and the agreement
(selected pairs in common / decoded pairs).

    python bench/mrecg_agreement.py [--alphas 1.0 0.5 0.25] [--bits 4]
"""

from __future__ import annotations

import argparse

import torch

from ptqflow.models import build_model
from ptqflow.plan import mrecg_groups
from ptqflow.quant.model import QuantConfig, build_quant_model
from ptqflow.sensitivity import capacity_differentials, layer_infos, modcap_data_free, stage_boundaries

#: Merged groups decoded from the public code (algorithms.md section 6), in torchvision unit names.
#: MobileNetV2: the decoding's b<i> is torchvision's features.<i+1>.
DECODED = {
    "resnet18": [["layer1.1", "layer2.0"], ["layer2.1", "layer3.0"]],
    "mobilenet_v2": [
        ["features.3", "features.4"],
        ["features.6", "features.7"],
        ["features.9", "features.10", "features.11"],
        ["features.12", "features.13", "features.14"],
        ["features.16", "features.17"],
    ],
}


def _pairs(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {(g[i], g[i + 1]) for g in groups for i in range(len(g) - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| model | form | k | ours (merged groups) | decoded | pairs in common |")
    print("|---|---|---|---|---|---|")
    for name, decoded in DECODED.items():
        model = build_quant_model(
            build_model(f"torchvision.{name}"), QuantConfig(weight_bits=args.bits, act_bits=args.bits)
        )
        infos = layer_infos(model, torch.zeros(1, 3, 224, 224), first_last_weight_bits=8)
        bits = {i.name: i.pinned_bits or args.bits for i in infos}
        kinds = model.unit_kinds()
        k = len(_pairs(decoded))
        for alpha in args.alphas:
            capacity = modcap_data_free(infos, len(kinds), bits, alpha)
            groups, _ = mrecg_groups(kinds, capacity_differentials(capacity, "data_free"), k)
            ours = [[model.names[i] for i in g] for g in groups if len(g) > 1]
            _row(name, f"data-free, alpha {alpha}", k, ours, decoded)
        with torch.no_grad():
            x, shapes = torch.zeros(1, 3, 224, 224), []
            for _, unit in model.named_units():
                x = unit(x)
                shapes.append(tuple(x.shape[1:]))
        groups, _ = mrecg_groups(kinds, stage_boundaries(shapes), k)
        _row(name, "stage boundary", k, [[model.names[i] for i in g] for g in groups if len(g) > 1], decoded)


def _row(name: str, form: str, k: int, ours: list[list[str]], decoded: list[list[str]]) -> None:
    common = len(_pairs(ours) & _pairs(decoded))
    shown = "; ".join("+".join(g) for g in ours) or "none"
    print(
        f"| {name} | {form} | {k} | {shown} | {'; '.join('+'.join(g) for g in decoded)} | {common}/{k} |", flush=True
    )


if __name__ == "__main__":
    main()
