"""Test top-1 against reconstruction iterations per unit: how many iterations a user needs.

For every model, bit pair, method and iteration count: the same RTN model, store and seed, a full
reconstruction at that schedule (the schedules are not prefixes of each other: the rounding regulariser's
annealing and the activation steps' cosine decay both span the whole schedule), its test top-1 and wall
seconds. Each (model, bit pair, method) series is written to ``bench/results/iterations/<model>-<wXaY>-<method>.tsv``
(columns ``iters``, ``top1``, ``seconds``; rows already there for other iteration counts are kept, so a long
sweep can be split across runs), which ``bench/dvc.yaml`` plots (``dvc plots show``).

    python bench/iterations_curve.py [--models resnet20 mobilenetv2_s] [--bits 2/2]
        [--iters 100 300 1000 2000 5000] [--methods qdrop genie] [--seed 0]
        [--stop-patience 3 --holdout 128 --stop-every 100 --stop-tol 0.01 --stop-finish 0.1]

With ``--stop-patience`` > 0 every reconstruction uses the held-out stopping rule
(:class:`ptqflow.recon.reconstruct.ReconConfig`'s ``stop_*`` and ``holdout`` keys) and its series is
``<model>-<wXaY>-<method>-stop.tsv`` (``-stop-finish.tsv`` with ``--stop-finish`` > 0), with a fourth
column ``run``: the mean iterations per unit actually run (``iters`` stays the schedule's length, which
sets the annealing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
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


def _read(path: Path) -> dict[int, list[str]]:
    if not path.is_file():
        return {}
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return {int(r[0]): r[1:] for r in rows}


def _write(path: Path, header: str, rows: dict[int, list[str]]) -> None:
    lines = [header] + ["\t".join([str(k), *v]) for k, v in sorted(rows.items())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--bits", nargs="+", default=["2/2"])
    parser.add_argument("--iters", nargs="+", type=int, default=[100, 300, 1000, 2000, 5000])
    parser.add_argument("--methods", nargs="+", default=["qdrop", "genie"], choices=sorted(NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT, help="where the series go")
    parser.add_argument("--stop-patience", type=int, default=0, help="the held-out stopping rule; 0: off")
    parser.add_argument("--holdout", type=int, default=128, help="calibration samples held out for the rule")
    parser.add_argument("--stop-every", type=int, default=100)
    parser.add_argument("--stop-tol", type=float, default=0.01)
    parser.add_argument("--stop-finish", type=float, default=0.0, help="the rule's finishing anneal (fraction)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every unit (and held-out check)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("ptqflow").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    stop = args.stop_patience > 0
    rule = {k: getattr(args, k) for k in ("stop_patience", "holdout", "stop_every", "stop_tol", "stop_finish")}
    suffix = ("-stop-finish" if args.stop_finish > 0 else "-stop") if stop else ""
    test = load_split(ROOT / "data" / "prepare" / "test.pt")
    args.out.mkdir(parents=True, exist_ok=True)

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
                    path = args.out / f"{name}-w{w}a{a}-{method}{suffix}.tsv"
                    for iters in args.iters:
                        model = copy.deepcopy(rtn)
                        config = method_config(name, method, iters, args.seed)
                        if stop:
                            config = dataclasses.replace(config, **rule)
                        start = time.perf_counter()
                        torch.manual_seed(args.seed)
                        groups = [[i] for i in range(len(store.units))]
                        steps = reconstruct(model, store, groups, config, DEVICE, skip=frozenset({0}), bn_stats=stats)
                        seconds = time.perf_counter() - start
                        run = sum(s["iters"] for s in steps) / len(steps)
                        result = top1(model)
                        rows = _read(path)
                        rows[iters] = [f"{result:.2f}", f"{seconds:.0f}"] + ([f"{run:.0f}"] if stop else [])
                        _write(path, "iters\ttop1\tseconds" + ("\trun" if stop else ""), rows)
                        ran = f", {run:.0f} it/unit run" if stop else ""
                        print(
                            f"{name} W{w}A{a} {NAMES[method]}{suffix} {iters} it/unit: "
                            f"{result:.2f} ({seconds:.0f}s{ran})",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
