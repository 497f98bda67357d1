"""Seconds per reconstruction iteration, per unit, and peak RSS, for the embedded models.

Builds a feature store from the first ``--samples`` calibration images (run ``dvc repro prepare``
first), then runs QDrop reconstruction with ``--iters`` iterations per unit and times iterations 2..N
of every unit through the progress callback (so per-unit set-up -- reading the store, the before/after
evaluation -- is reported separately).

    python bench/reconstruct_speed.py [--models resnet20 mobilenetv2_s] [--iters 30] [--samples 1024]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import DEVICE as CPU
from common import build_store, pretrained, rtn_model

from ptqflow.quant.model import QuantConfig
from ptqflow.recon.reconstruct import ReconConfig, reconstruct


def bench(name: str, iters: int, samples: int, work: Path) -> list[tuple[str, float, float]]:
    fp = pretrained(name)
    store = build_store(fp, samples, work / f"{name}.zarr")
    units = store.units
    model = rtn_model(fp, store, QuantConfig(weight_bits=2, act_bits=4), CPU)
    stamps: dict[str, list[float]] = {}

    def progress(total: int, label: str) -> Callable[[int, float], None]:
        stamps[label] = []
        return lambda i, loss: stamps[label].append(time.perf_counter())

    stats = reconstruct(
        model, store, [[i] for i in range(len(units))], ReconConfig(iters=iters), CPU, progress=progress
    )
    rows = []
    for (label, times), row in zip(stamps.items(), stats, strict=True):
        per_iter = (times[-1] - times[0]) / max(1, len(times) - 1)
        rows.append((label.split(" ", 1)[1], per_iter, row["seconds"] - per_iter * len(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args()
    print(f"device: {CPU}, torch threads: {torch.get_num_threads()}, QDrop W2A4, batch 32, {args.iters} iters/unit")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows = bench(name, args.iters, args.samples, Path(tmp))
            print(f"\n{name}\n{'unit':<14} {'ms/iter':>8} {'setup s':>8}")
            for unit, per_iter, setup in rows:
                print(f"{unit:<14} {1000 * per_iter:>8.1f} {setup:>8.2f}")
            print(f"{'median':<14} {1000 * statistics.median(r[1] for r in rows):>8.1f}")
    print(f"\npeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
