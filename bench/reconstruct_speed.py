"""Seconds per reconstruction iteration, per unit, against the unit's roofline, and peak RSS.

Builds a feature store from the first ``--samples`` calibration images (run ``dvc repro prepare``
first), then runs QDrop reconstruction with ``--iters`` iterations per unit and times iterations 2..N
of every unit through the progress callback (so per-unit set-up -- reading the store, the before/after
evaluation -- is reported separately). The roofline of a unit is its FP forward + backward (weight
gradients, MSE to the FP target) on a batch of the same size, without quantizers or AdaRound, with the
same kernels: the cost of the convolutions themselves. ``ratio`` = ms/iteration / roofline.

    python bench/reconstruct_speed.py [--models resnet20 mobilenetv2_s] [--iters 30] [--samples 1024]
        [--kernels portable|native] [--threads N] [--malloc keep|default] [--compile]

``--compile`` runs the reconstructed group's forward through ``torch.compile`` (inductor; its backward is
compiled with it), with native kernels (the portable ones switch thread counts inside the step: a graph
break that sends the whole frame back to eager). The first iteration of a unit pays the compilation: it is
in the ``setup s`` column.
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

from ptqflow.fold import fold_bn
from ptqflow.kernels import keep_freed_memory, portable_layers, use_kernels
from ptqflow.quant.model import QuantConfig
from ptqflow.recon import reconstruct as recon_module
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units


def roofline_ms(unit: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int = 12) -> float:
    """Median ms of the FP unit's forward + backward (weight gradients) on ``x`` against ``y``."""
    unit = unit.to(CPU).train(False)
    for p in unit.parameters():
        p.requires_grad_(True)
    times = []
    with portable_layers(unit):
        for _ in range(reps):
            began = time.perf_counter()
            unit.zero_grad(set_to_none=True)
            (unit(x) - y).pow(2).mean().backward()
            times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times[2:])


def bench(name: str, iters: int, samples: int, work: Path) -> list[tuple[str, float, float, float]]:
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
    fp_units = extract_units(fold_bn(fp))
    rows = []
    for index, ((label, times), row) in enumerate(zip(stamps.items(), stats, strict=True)):
        per_iter = (times[-1] - times[0]) / max(1, len(times) - 1)
        data = store.unit(units[index])
        x, y = data.inputs(slice(0, 32)).to(CPU), data.outputs(slice(0, 32)).to(CPU)
        roof = roofline_ms(fp_units[index].module, x, y)
        rows.append((label.split(" ", 1)[1], per_iter, roof, row["seconds"] - per_iter * len(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--kernels", choices=["portable", "native"], default="portable")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument(
        "--malloc", choices=["keep", "default"], default="keep", help="keep: as the stages run (keep_freed_memory)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the group's forward (native kernels)")
    args = parser.parse_args()
    if args.compile:
        if args.kernels != "native":
            parser.error("--compile needs --kernels native (portable kernels break the graph)")
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64  # one graph per unit (and per grad mode)
        recon_module._Group.forward = torch.compile(recon_module._Group.forward, dynamic=False)  # type: ignore[method-assign]
    use_kernels(args.kernels)
    if args.malloc == "keep":
        keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"device: {CPU}, torch threads: {torch.get_num_threads()}, kernels {args.kernels}, QDrop W2A4, batch 32, "
        f"{args.iters} iters/unit" + (", compiled" if args.compile else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows = bench(name, args.iters, args.samples, Path(tmp))
            print(f"\n{name}\n{'unit':<14} {'ms/iter':>8} {'roofline':>8} {'ratio':>6} {'setup s':>8}")
            for unit, per_iter, roof, setup in rows:
                print(f"{unit:<14} {1000 * per_iter:>8.1f} {roof:>8.1f} {1000 * per_iter / roof:>6.2f} {setup:>8.2f}")
            med_iter = 1000 * statistics.median(r[1] for r in rows)
            med_roof = statistics.median(r[2] for r in rows)
            ratio = statistics.median(1000 * r[1] / r[2] for r in rows)
            print(f"{'median':<14} {med_iter:>8.1f} {med_roof:>8.1f} {ratio:>6.2f}")
    print(f"\npeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
