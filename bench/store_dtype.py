"""float16 against float32 feature stores: QDrop top-1 at W2A4 on the embedded models, paired by seed.

The presets store activations in float16 only if this costs at most 0.1 points of top-1 (issue "ImageNet
scale"). Both stores are built from the same calibration images (data/prepare/calibration.pt, 1024
images; run ``dvc repro prepare`` first) without gradients (the MSE loss reads none); the RTN ranges and
the reconstruction then read the stored values, so the whole pipeline sees the rounding. Prints a
markdown table with the per-seed paired difference (float16 - float32) and its mean and sd.

    python bench/store_dtype.py [--models resnet20 mobilenetv2_s] [--seeds 0 1 2] [--iters 300]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch
from common import DEVICE, ROOT, pretrained, rtn_model, test_top1
from method_table import REG_WEIGHT

from ptqflow.data import normalize
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.quant.model import QuantConfig
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units
from stages.common import load_split


def store(fp: torch.nn.Module, dtype: str, path: Path) -> FeatureStore:
    data = load_split(ROOT / "data" / "prepare" / "calibration.pt")
    units = extract_units(fold_bn(fp))
    x = normalize(data.images)
    with torch.no_grad():
        shapes, h = [], x[:1]
        for u in units:
            h = u.module(h)
            shapes.append(tuple(h.shape[1:]))
    writer = FeatureStoreWriter(path, [u.name for u in units], tuple(x.shape[1:]), shapes, len(x), dtype, grads=False)
    batches = ((x[i : i + 64], data.labels[i : i + 64]) for i in range(0, len(x), 64))
    extract_features([u.module for u in units], batches, writer, DEVICE)
    return FeatureStore.open(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--bits", default="2/4")
    args = parser.parse_args()
    w, a = (int(b) for b in args.bits.split("/"))
    test = load_split(ROOT / "data" / "prepare" / "test.pt")

    def top1(model: torch.nn.Module) -> float:
        return test_top1(model, test)

    lines = [
        f"| model | W{w}A{a} | seed | RTN fp32 | RTN fp16 | QDrop fp32 | QDrop fp16 | fp16 - fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            stores = {d: store(fp, d, Path(tmp) / f"{name}-{d}.zarr") for d in ("float32", "float16")}
            rtns = {
                d: rtn_model(fp, s, QuantConfig(weight_bits=w, act_bits=a, convention="brecq"))
                for d, s in stores.items()
            }
            diffs = []
            for seed in args.seeds:
                got = {}
                for dtype, s in stores.items():
                    model = copy.deepcopy(rtns[dtype])
                    config = ReconConfig(method="qdrop", iters=args.iters, reg_weight=REG_WEIGHT[name], seed=seed)
                    torch.manual_seed(seed)
                    groups = [[i] for i in range(len(s.units))]
                    reconstruct(model, s, groups, config, DEVICE, skip=frozenset({0}))
                    got[dtype] = top1(model)
                diffs.append(got["float16"] - got["float32"])
                row = [name, args.bits, str(seed), f"{top1(rtns['float32']):.2f}", f"{top1(rtns['float16']):.2f}"]
                row += [f"{got['float32']:.2f}", f"{got['float16']:.2f}", f"{diffs[-1]:+.2f}"]
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            lines.append(f"| {name} | {args.bits} | mean ± sd | | | | | {statistics.mean(diffs):+.2f} ± {sd:.2f} |")
            print(lines[-1], flush=True)
    print(f"\n{args.iters} iterations per unit, QDrop (keep_prob 0.5), brecq convention, device {DEVICE}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
