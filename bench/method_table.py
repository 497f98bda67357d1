"""Test top-1 of FP, RTN, BRECQ and QDrop at several W/A bit pairs on the embedded models.

Everything in one process, same calibration set (data/prepare/calibration.pt, 1024 images drawn with
seed 1005; run ``dvc repro prepare`` first), same seeds. Prints a markdown table.

    python bench/method_table.py [--iters 300] [--models resnet20 mobilenetv2_s] [--bits 4/4 2/4 3/3 2/2]
        [--seed 0] [--methods brecq qdrop genie] [--act-lr 4e-5] [--keep-prob 0.5] [--softmax uniform|log2]
        [--weight-scale-lr 1e-4] [--pd-weight 5] [--dc-iters 500]

``genie`` is QDrop with the weight steps learned jointly (Genie-M; ``reconstruct.weight_scale_lr``).
``pdquant`` is QDrop with PD-Quant's prediction difference (``reconstruct.pd_weight``, temperature per model
as its released scripts) and distribution correction (``reconstruct.dc_iters``, anchor per model);
``pdquant-genie`` both changes together. Every other hyperparameter is QDrop's, so each column differs from
QDrop's by its method alone (PD-Quant's released code also triples the rounding learning rate; not here).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import DEVICE, ROOT, build_store, pretrained, rtn_model, test_top1

from ptqflow.fold import bn_statistics
from ptqflow.quant.model import QuantConfig
from ptqflow.recon.cache import Cached
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from stages.common import load_split

#: lambda of the rounding regulariser per model (algorithms.md section 2: 0.01 ResNet, 0.1 MobileNetV2; 0.1 for
#: MobileNetV3, the same depthwise family; 0.01 for the ViT, whose linears are dense like ResNet's convs).
REG_WEIGHT = {"resnet20": 0.01, "mobilenetv2_s": 0.1, "mobilenetv3_s": 0.1, "vit_s": 0.01}
#: PD-Quant's temperature and distribution-correction anchor (1 / lambda_c) per model, from its released
#: scripts: ResNets 4 and 50, MobileNetV2 1 and 200 (MobileNetV3 takes MobileNetV2's; the ViT has no BN).
PD_TEMPERATURE = {"resnet20": 4.0, "mobilenetv2_s": 1.0, "mobilenetv3_s": 1.0, "vit_s": 4.0}
DC_ANCHOR = {"resnet20": 50.0, "mobilenetv2_s": 200.0, "mobilenetv3_s": 200.0, "vit_s": 50.0}
NAMES = {
    "brecq": "BRECQ",
    "qdrop": "QDrop",
    "genie": "Genie-M",
    "pdquant": "PD-Quant",
    "pdquant-genie": "PD-Quant+Genie-M",
}


def method_config(
    model: str,
    method: str,
    iters: int,
    seed: int,
    *,
    act_lr: float = 4e-5,
    keep_prob: float = 0.5,
    weight_scale_lr: float = 1e-4,
    pd_weight: float = 5.0,
    dc_iters: int = 500,
) -> ReconConfig:
    """The reconstruction config of ``method`` (a key of :data:`NAMES`) for an embedded ``model``."""
    pd = method.startswith("pdquant")
    return ReconConfig(
        method="brecq" if method == "brecq" else "qdrop",
        weight_scale_lr=weight_scale_lr if method.endswith("genie") else 0.0,
        pd_weight=pd_weight if pd else 0.0,
        pd_temperature=PD_TEMPERATURE.get(model, 4.0),
        dc_iters=dc_iters if pd else 0,
        dc_anchor=DC_ANCHOR.get(model, 50.0),
        iters=iters,
        act_iters=max(1, iters // 3),
        reg_weight=REG_WEIGHT.get(model, 0.01),
        act_lr=act_lr,
        keep_prob=keep_prob,
        seed=seed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--bits", nargs="+", default=["4/4", "2/4", "3/3", "2/2"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one row per seed (one shared correction)")
    parser.add_argument("--convention", choices=["brecq", "qdrop"], default="brecq")
    parser.add_argument("--act-lr", type=float, default=4e-5, help="QDrop's activation-step learning rate")
    parser.add_argument("--keep-prob", type=float, default=0.5, help="QDrop's keep_prob (1.0 = no drop)")
    parser.add_argument("--methods", nargs="+", default=["brecq", "qdrop"], choices=sorted(NAMES))
    parser.add_argument("--weight-scale-lr", type=float, default=1e-4, help="genie's weight-step learning rate")
    parser.add_argument("--pd-weight", type=float, default=5.0, help="pdquant's KL weight (1 / lambda_r)")
    parser.add_argument("--dc-iters", type=int, default=500, help="pdquant's correction steps per batch (0: off)")
    parser.add_argument("--softmax", choices=["uniform", "log2"], default="uniform", help="softmax-output grid")
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")

    def top1(model: torch.nn.Module) -> float:
        return test_top1(model, test)

    head = " | ".join(NAMES[m] for m in args.methods)
    lines = [f"| model | W/A | seed | FP | RTN | {head} |", "|---|---|---|---|---" + "|---" * len(args.methods) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 1024, Path(tmp) / f"{name}.zarr")
            fp_top1 = top1(fp)
            stats = bn_statistics(fp)
            # PD-Quant's corrected inputs: the same for every bit pair and method
            corrections: dict[tuple[int, ...], tuple[Cached, Cached]] = {}
            for bits in args.bits:
                w, a = (int(b) for b in bits.split("/"))
                rtn = rtn_model(
                    fp, store, QuantConfig(weight_bits=w, act_bits=a, convention=args.convention, softmax=args.softmax)
                )
                rtn_top1 = f"{top1(rtn):.2f}"
                for seed in args.seed:
                    row = [name, bits, str(seed), f"{fp_top1:.2f}", rtn_top1]
                    for method in args.methods:
                        model = copy.deepcopy(rtn)
                        pd = method.startswith("pdquant")
                        config = method_config(
                            name,
                            method,
                            args.iters,
                            seed,
                            act_lr=args.act_lr,
                            keep_prob=args.keep_prob,
                            weight_scale_lr=args.weight_scale_lr,
                            pd_weight=args.pd_weight,
                            dc_iters=args.dc_iters,
                        )
                        start = time.perf_counter()
                        torch.manual_seed(seed)
                        # BRECQ keeps the stem RTN
                        skip = frozenset({0}) if args.convention == "brecq" else frozenset()
                        groups = [[i] for i in range(len(store.units))]
                        memo = corrections if pd else None
                        reconstruct(model, store, groups, config, DEVICE, skip=skip, bn_stats=stats, corrections=memo)
                        row.append(f"{top1(model):.2f} ({time.perf_counter() - start:.0f}s)")
                    lines.append("| " + " | ".join(row) + " |")
                    print(lines[-1], flush=True)
            for pair in corrections.values():
                for cache in pair:
                    cache.close()
    print(
        f"\n{args.iters} iterations per unit (BRECQ activation phase: {max(1, args.iters // 3)}), batch 32,"
        f" QDrop act lr {args.act_lr:g}, keep_prob {args.keep_prob:g}, seeds {' '.join(map(str, args.seed))},"
        f" PD-Quant weight {args.pd_weight:g}, correction steps {args.dc_iters},"
        f" convention {args.convention}, softmax {args.softmax}, device {DEVICE}\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
