"""Mixed precision vs uniform W3A4, and QDrop+MRECG vs QDrop at W2A4/W2A2, on the embedded models.

Everything in one process per model, on the pipeline's calibration set (data/prepare/calibration.pt,
1024 images, seed 1005; run ``dvc repro prepare`` first), the ``brecq`` placement convention and the same
reconstruction settings for every row (QDrop, keep_prob 0.5, ``--iters`` per unit, ``--seed``, default 0):

* mixed precision: BRECQ sensitivity tables (``--metric``, default Fisher; candidates 2/4/8; 256
  samples), the size front (``--algorithm``: ``exact``, the pipeline's default, or ``nsga2`` with
  population 50 and 60 generations), the least-sensitive point at <= 3.0 average weight bits (the size of
  uniform 3-bit weights; first conv and fc stay 8-bit in both), activations 4-bit; compared with uniform
  W3A4. RTN and QDrop for both.
* hand-set configurations (``--hand FILE``, JSON ``{"row name": {"layer-name prefix": bits}}``): every
  searchable layer at 3 bits unless a prefix names it (the longest matching prefix wins), pinned layers at
  8; what an oracle allocation would have to beat.
* MRECG: ``--plan-form data_dependent`` (the round-to-nearest error along the model at the row's bits, the
  ``--k`` largest loss rises) or ``stage_boundary`` (the ``--k`` earliest pairs where the output shape
  changes, the pattern of the public code), merged into joint units (chains of 3), reconstructed with the
  same QDrop settings.

With several ``--seeds`` every QDrop cell is the mean and sample standard deviation over the
reconstruction seeds, followed by the single values; the ``paired`` line of each model gives the mean and
sd of (row - uniform W3A4) over the same seeds.

    python bench/mixed_precision_table.py [--iters 300] [--models resnet20 mobilenetv2_s] [--k 2]
        [--candidates 2 4 8] [--metric fisher|mse|kl] [--algorithm exact|nsga2] [--seeds 0 1 2] [--hand FILE]
        [--no-mrecg]
        [--plan-form data_dependent|stage_boundary] [--rtn-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import DEVICE, ROOT, build_store, pretrained, rtn_model, test_top1

from ptqflow.features import FeatureStore
from ptqflow.plan import mrecg_groups
from ptqflow.quant.model import QuantConfig, QuantModel, set_weight_bits
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.search import BitSpace, SearchConfig, pareto_front, select
from ptqflow.sensitivity import (
    LayerInfo,
    SensitivityConfig,
    capacity_differentials,
    layer_infos,
    modcap_data_dependent,
    stage_boundaries,
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
    parser.add_argument("--algorithm", choices=["exact", "nsga2"], default="exact", help="front search")
    parser.add_argument(
        "--seeds", "--seed", type=int, nargs="+", default=[0], help="reconstruction seeds (the search keeps seed 0)"
    )
    parser.add_argument("--hand", type=Path, help="JSON of hand-set configurations (module docstring)")
    parser.add_argument("--plan-form", choices=["data_dependent", "stage_boundary"], default="data_dependent")
    parser.add_argument("--rtn-only", action="store_true", help="skip reconstruction (RTN columns only)")
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")

    def top1(model: torch.nn.Module) -> float:
        return test_top1(model, test)

    lines = [
        "| model | setting | W/A | avg W bits | RTN | QDrop | QDrop+MRECG | merged |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def emit(row: list[str]) -> None:
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)

    hand: dict[str, dict[str, int]] = json.loads(args.hand.read_text()) if args.hand else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 1024, Path(tmp) / f"{name}.zarr")
            recons = [
                ReconConfig(method="qdrop", iters=args.iters, reg_weight=REG_WEIGHT.get(name, 0.01), seed=seed)
                for seed in args.seeds
            ]

            def qdrop(
                model: QuantModel, groups: list[list[int]], store: FeatureStore = store, rs: list[ReconConfig] = recons
            ) -> list[float]:
                return [] if args.rtn_only else [top1(_qdrop(model, store, groups, r)) for r in rs]

            blocks = [[i] for i in range(len(store.units))]
            # Mixed precision at the size of uniform 3-bit weights.
            w3a4 = _rtn(fp, store, 3, 4)
            infos = layer_infos(w3a4, store.unit(store.units[0]).inputs(slice(0, 1)), 8)
            hand_bits = {row: _hand_bits(infos, prefixes) for row, prefixes in hand.items()}  # fail before the search
            began = time.perf_counter()
            sens_config = SensitivityConfig(candidate_bits=tuple(args.candidates), metric=args.metric)
            tables = unit_sensitivities(w3a4, store, infos, sens_config, 2.4, DEVICE)
            space = BitSpace(infos, tables, act_bits=4)
            search = SearchConfig(algorithm=args.algorithm, pop_size=50, generations=60, seed=0)
            front = pareto_front(space, "size", search)
            point = select(front, "avg_bits", args.budget)
            search_seconds = time.perf_counter() - began
            print(f"{name} search pick: {json.dumps(point['bits'])}", flush=True)
            mixed = copy.deepcopy(w3a4)
            set_weight_bits(mixed, point["bits"], 2.4)
            uniform = qdrop(w3a4, blocks)
            emit([name, "uniform", "3/4", "3.00", f"{top1(w3a4):.2f}", _cell(uniform), "", ""])
            rows = {
                f"mixed {'/'.join(map(str, args.candidates))} {args.metric} {args.algorithm} "
                f"(search {search_seconds:.0f}s, {len(front)} points)": (point["bits"], point["avg_bits"])
            }
            for row, bits in hand_bits.items():
                rows[f"hand: {row}"] = (bits, _avg_bits(infos, bits))
            for row, (bits, avg) in rows.items():
                model = copy.deepcopy(w3a4)
                set_weight_bits(model, bits, 2.4)
                values = qdrop(model, blocks)
                emit([name, row, "mixed/4", f"{avg:.2f}", f"{top1(model):.2f}", _cell(values), "", ""])
                if len(values) > 1:
                    emit([name, f"paired: {row} - uniform", "", "", "", _cell(_minus(values, uniform)), "", ""])
            # QDrop vs QDrop+MRECG.
            for w, a in () if args.no_mrecg else ((2, 4), (2, 2)):
                model = _rtn(fp, store, w, a)
                if args.plan_form == "stage_boundary":
                    diffs = stage_boundaries([store.meta["output_shapes"][u] for u in store.units])
                else:
                    errors = modcap_data_dependent(model, store, 256, 64, DEVICE)
                    diffs = capacity_differentials(errors, "data_dependent")
                groups, _ = mrecg_groups(model.unit_kinds(), diffs, args.k)
                merged = "; ".join("+".join(store.units[i] for i in g) for g in groups if len(g) > 1)
                plain, joint = qdrop(model, blocks), qdrop(model, groups)
                rtn = f"{top1(model):.2f}"
                emit([name, "uniform", f"{w}/{a}", f"{w}.00", rtn, _cell(plain), _cell(joint), merged])
                if len(plain) > 1:
                    emit([name, "paired: MRECG - QDrop", f"{w}/{a}", "", "", "", _cell(_minus(joint, plain)), ""])
    seeds = " ".join(map(str, args.seeds))
    print(f"\n{args.iters} iterations per unit, batch 32, seeds {seeds}, brecq convention, device {DEVICE}")
    print(f"MRECG plan: {args.plan_form}, k = {args.k}\n")
    print("\n".join(lines))


def _cell(values: list[float]) -> str:
    """One value, or ``mean ± sd (v1/v2/...)`` over seeds; ``-`` when nothing was reconstructed."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    single = "/".join(f"{v:.2f}" for v in values)
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({single})"


def _minus(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _avg_bits(infos: list[LayerInfo], bits: dict[str, int]) -> float:
    searched = [i for i in infos if i.pinned_bits is None]
    return sum(bits[i.name] * i.params for i in searched) / sum(i.params for i in searched)


def _hand_bits(infos: list[LayerInfo], prefixes: dict[str, int]) -> dict[str, int]:
    """Weight bits per layer: pinned layers keep theirs, the rest 3 unless the longest matching prefix says."""
    searched = [i.name for i in infos if i.pinned_bits is None]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in searched)]
    if unknown:
        raise SystemExit(f"--hand: {unknown} match no searchable layer; layers: {searched}")
    bits = {}
    for info in infos:
        matches = [p for p in prefixes if info.name.startswith(p)]
        chosen = prefixes[max(matches, key=len)] if matches else 3
        bits[info.name] = info.pinned_bits if info.pinned_bits is not None else chosen
    return bits


if __name__ == "__main__":
    main()
