"""Mixed precision vs uniform W3A4, and QDrop+MRECG vs QDrop at W2A4/W2A2, on the embedded models.

Everything in one process per model, on the pipeline's calibration set (data/prepare/calibration.pt,
1024 images, seed 1005; run ``dvc repro prepare`` first), the ``brecq`` placement convention and the same
reconstruction settings for every row (QDrop, keep_prob 0.5, ``--iters`` per unit, ``--seed``, default 0):

* mixed precision: BRECQ sensitivity tables (``--metric``, default Fisher; candidates 2/4/8; 256
  samples), NSGA-II size front, the least-sensitive point at <= 3.0 average weight bits (the size of
  uniform 3-bit weights; first conv and fc stay 8-bit in both), activations 4-bit; compared with uniform
  W3A4. RTN and QDrop for both.
* MRECG: data-dependent ModCap (the round-to-nearest error along the model at the row's bits), the ``--k``
  largest loss rises merged into joint units (chains of 3), reconstructed with the same QDrop settings.

    python bench/mixed_precision_table.py [--iters 300] [--models resnet20 mobilenetv2_s] [--k 2]
        [--candidates 2 4 8] [--metric fisher|mse|kl] [--no-mrecg] [--rtn-only]
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
from ptqflow.features import FeatureStore
from ptqflow.plan import mrecg_groups
from ptqflow.quant.model import QuantConfig, QuantModel, set_weight_bits
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.search import BitSpace, SearchConfig, pareto_front, select
from ptqflow.sensitivity import (
    SensitivityConfig,
    capacity_differentials,
    layer_infos,
    modcap_data_dependent,
    unit_sensitivities,
)
from stages.common import load_split

REG_WEIGHT = {"resnet20": 0.01, "mobilenetv2_s": 0.1}


def _rtn(fp: torch.nn.Module, store: FeatureStore, w: int, a: int) -> QuantModel:
    return rtn_model(fp, store, QuantConfig(weight_bits=w, act_bits=a))


def _qdrop(model: QuantModel, store: FeatureStore, groups: list[list[int]], recon: ReconConfig) -> QuantModel:
    model = copy.deepcopy(model)
    torch.manual_seed(recon.seed)
    reconstruct(model, store, groups, recon, DEVICE, skip=frozenset({0}))  # brecq convention: the stem stays RTN
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--budget", type=float, default=3.0, help="average weight bits of the mixed model")
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 8], help="candidate weight bits")
    parser.add_argument("--no-mrecg", action="store_true", help="only the mixed-precision rows")
    parser.add_argument("--metric", choices=["fisher", "mse", "kl"], default="fisher", help="sensitivity metric")
    parser.add_argument("--seed", type=int, default=0, help="reconstruction seed (the search keeps seed 0)")
    parser.add_argument("--rtn-only", action="store_true", help="skip reconstruction (RTN columns only)")
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")

    def top1(model: torch.nn.Module) -> float:
        return accuracy(predict_logits(model, test, 500, normalize, DEVICE), test.labels)["top1"]

    lines = [
        "| model | setting | W/A | avg W bits | RTN | QDrop | QDrop+MRECG | merged |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def emit(row: list[str]) -> None:
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 1024, Path(tmp) / f"{name}.zarr")
            recon = ReconConfig(
                method="qdrop", iters=args.iters, reg_weight=REG_WEIGHT.get(name, 0.01), seed=args.seed
            )

            def qdrop(
                model: QuantModel, groups: list[list[int]], store: FeatureStore = store, r: ReconConfig = recon
            ) -> str:
                if args.rtn_only:
                    return "-"
                start = time.perf_counter()
                done = _qdrop(model, store, groups, r)
                return f"{top1(done):.2f} ({time.perf_counter() - start:.0f}s)"

            blocks = [[i] for i in range(len(store.units))]
            # Mixed precision at the size of uniform 3-bit weights.
            w3a4 = _rtn(fp, store, 3, 4)
            infos = layer_infos(w3a4, store.unit(store.units[0]).inputs(slice(0, 1)), 8)
            began = time.perf_counter()
            sens_config = SensitivityConfig(candidate_bits=tuple(args.candidates), metric=args.metric)
            tables = unit_sensitivities(w3a4, store, infos, sens_config, 2.4, DEVICE)
            space = BitSpace(infos, tables, act_bits=4)
            front = pareto_front(space, "size", SearchConfig(pop_size=50, generations=60, seed=0))
            point = select(front, "avg_bits", args.budget)
            search_seconds = time.perf_counter() - began
            mixed = copy.deepcopy(w3a4)
            set_weight_bits(mixed, point["bits"], 2.4)
            emit([name, "uniform", "3/4", "3.00", f"{top1(w3a4):.2f}", qdrop(w3a4, blocks), "", ""])
            emit(
                [
                    name,
                    f"mixed {'/'.join(map(str, args.candidates))} {args.metric} "
                    f"(search {search_seconds:.0f}s, {len(front)} points)",
                    "mixed/4",
                    f"{point['avg_bits']:.2f}",
                    f"{top1(mixed):.2f}",
                    qdrop(mixed, blocks),
                    "",
                    "",
                ]
            )
            # QDrop vs QDrop+MRECG.
            for w, a in () if args.no_mrecg else ((2, 4), (2, 2)):
                model = _rtn(fp, store, w, a)
                errors = modcap_data_dependent(model, store, 256, 64, DEVICE)
                groups, _ = mrecg_groups(model.unit_kinds(), capacity_differentials(errors, "data_dependent"), args.k)
                merged = "; ".join("+".join(store.units[i] for i in g) for g in groups if len(g) > 1)
                emit(
                    [
                        name,
                        "uniform",
                        f"{w}/{a}",
                        f"{w}.00",
                        f"{top1(model):.2f}",
                        qdrop(model, blocks),
                        qdrop(model, groups),
                        merged,
                    ]
                )
    print(f"\n{args.iters} iterations per unit, batch 32, seed {args.seed}, brecq convention, device {DEVICE}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
