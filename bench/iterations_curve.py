"""Test top-1 against reconstruction iterations per unit: how many iterations a user needs.

For every model, bit pair, method and iteration count: the same RTN model, store and seed, a full
reconstruction at that schedule (the schedules are not prefixes of each other: the rounding regulariser's
annealing and the activation steps' cosine decay both span the whole schedule), its test top-1 and wall
seconds. Each (model, bit pair, method) series is written to ``bench/results/iterations/<model>-<wXaY>-<method>.tsv``
(columns ``iters``, ``top1``, ``seconds``; rows already there for other iteration counts are kept, so a long
sweep can be split across runs), which ``bench/dvc.yaml`` plots (``dvc plots show``).

    python bench/iterations_curve.py [--models resnet20 mobilenetv2_s] [--bits 2/2]
        [--iters 100 300 1000 2000 5000] [--methods qdrop genie] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from common import DEVICE, ROOT, build_store, pretrained, rtn_model, test_top1
from method_table import NAMES, method_config

from ptqflow.atomic import atomic_write_text
from ptqflow.fold import bn_statistics
from ptqflow.quant.model import QuantConfig
from ptqflow.recon.reconstruct import reconstruct
from stages.common import load_split

OUT = ROOT / "bench" / "results" / "iterations"


def _read(path: Path) -> dict[int, tuple[str, str]]:
    if not path.is_file():
        return {}
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return {int(r[0]): (r[1], r[2]) for r in rows}


def _write(path: Path, rows: dict[int, tuple[str, str]]) -> None:
    lines = ["iters\ttop1\tseconds"] + [f"{k}\t{v[0]}\t{v[1]}" for k, v in sorted(rows.items())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--bits", nargs="+", default=["2/2"])
    parser.add_argument("--iters", nargs="+", type=int, default=[100, 300, 1000, 2000, 5000])
    parser.add_argument("--methods", nargs="+", default=["qdrop", "genie"], choices=sorted(NAMES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")
    OUT.mkdir(parents=True, exist_ok=True)

    def top1(model: torch.nn.Module) -> float:
        return test_top1(model, test)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 1024, Path(tmp) / f"{name}.zarr")
            stats = bn_statistics(fp)
            for bits in args.bits:
                w, a = (int(b) for b in bits.split("/"))
                rtn = rtn_model(fp, store, QuantConfig(weight_bits=w, act_bits=a))
                for method in args.methods:
                    path = OUT / f"{name}-w{w}a{a}-{method}.tsv"
                    for iters in args.iters:
                        model = copy.deepcopy(rtn)
                        config = method_config(name, method, iters, args.seed)
                        start = time.perf_counter()
                        torch.manual_seed(args.seed)
                        groups = [[i] for i in range(len(store.units))]
                        reconstruct(model, store, groups, config, DEVICE, skip=frozenset({0}), bn_stats=stats)
                        seconds = time.perf_counter() - start
                        result = top1(model)
                        rows = _read(path)
                        rows[iters] = (f"{result:.2f}", f"{seconds:.0f}")
                        _write(path, rows)
                        print(
                            f"{name} W{w}A{a} {NAMES[method]} {iters} it/unit: {result:.2f} ({seconds:.0f}s)",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
