"""Test top-1 of FP, RTN, BRECQ and QDrop at several W/A bit pairs on the embedded models.

Everything in one process, same calibration set (data/prepare/calibration.pt, 1024 images drawn with
seed 1005; run ``dvc repro prepare`` first), same seeds. Prints a markdown table.

    python bench/method_table.py [--iters 300] [--models resnet20 mobilenetv2_s] [--bits 4/4 2/4 3/3 2/2]
        [--seed 0] [--methods brecq qdrop genie] [--act-lr 4e-5] [--keep-prob 0.5] [--softmax uniform|log2]
        [--weight-scale-lr 1e-4]

``genie`` is QDrop with the weight steps learned jointly (Genie-M; ``reconstruct.weight_scale_lr``).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import DEVICE, ROOT, build_store, pretrained, rtn_model

from ptqflow.data import normalize
from ptqflow.evaluate import accuracy, predict_logits
from ptqflow.quant.model import QuantConfig
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from stages.common import load_split

#: lambda of the rounding regulariser per model (algorithms.md section 2: 0.01 ResNet, 0.1 MobileNetV2; 0.1 for
#: MobileNetV3, the same depthwise family; 0.01 for the ViT, whose linears are dense like ResNet's convs).
REG_WEIGHT = {"resnet20": 0.01, "mobilenetv2_s": 0.1, "mobilenetv3_s": 0.1, "vit_s": 0.01}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--bits", nargs="+", default=["4/4", "2/4", "3/3", "2/2"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--convention", choices=["brecq", "qdrop"], default="brecq")
    parser.add_argument("--act-lr", type=float, default=4e-5, help="QDrop's activation-step learning rate")
    parser.add_argument("--keep-prob", type=float, default=0.5, help="QDrop's keep_prob (1.0 = no drop)")
    parser.add_argument("--methods", nargs="+", default=["brecq", "qdrop"], choices=["brecq", "qdrop", "genie"])
    parser.add_argument("--weight-scale-lr", type=float, default=1e-4, help="genie's weight-step learning rate")
    parser.add_argument("--softmax", choices=["uniform", "log2"], default="uniform", help="softmax-output grid")
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")

    def top1(model: torch.nn.Module) -> float:
        return accuracy(predict_logits(model, test, 500, normalize, DEVICE), test.labels)["top1"]

    head = " | ".join({"brecq": "BRECQ", "qdrop": "QDrop", "genie": "Genie-M"}[m] for m in args.methods)
    lines = [f"| model | W/A | FP | RTN | {head} |", "|---|---|---|---" + "|---" * len(args.methods) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 1024, Path(tmp) / f"{name}.zarr")
            fp_top1 = top1(fp)
            for bits in args.bits:
                w, a = (int(b) for b in bits.split("/"))
                rtn = rtn_model(
                    fp, store, QuantConfig(weight_bits=w, act_bits=a, convention=args.convention, softmax=args.softmax)
                )
                row = [name, bits, f"{fp_top1:.2f}", f"{top1(rtn):.2f}"]
                for method in args.methods:
                    model = copy.deepcopy(rtn)
                    config = ReconConfig(
                        method="qdrop" if method == "genie" else method,
                        weight_scale_lr=args.weight_scale_lr if method == "genie" else 0.0,
                        iters=args.iters,
                        act_iters=max(1, args.iters // 3),
                        reg_weight=REG_WEIGHT.get(name, 0.01),
                        act_lr=args.act_lr,
                        keep_prob=args.keep_prob,
                        seed=args.seed,
                    )
                    start = time.perf_counter()
                    torch.manual_seed(args.seed)
                    skip = frozenset({0}) if args.convention == "brecq" else frozenset()  # BRECQ keeps the stem RTN
                    reconstruct(model, store, [[i] for i in range(len(store.units))], config, DEVICE, skip=skip)
                    row.append(f"{top1(model):.2f} ({time.perf_counter() - start:.0f}s)")
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    print(
        f"\n{args.iters} iterations per unit (BRECQ activation phase: {max(1, args.iters // 3)}), batch 32,"
        f" QDrop act lr {args.act_lr:g}, keep_prob {args.keep_prob:g}, seed {args.seed},"
        f" convention {args.convention}, softmax {args.softmax}, device {DEVICE}\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
