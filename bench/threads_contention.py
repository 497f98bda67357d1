"""Reconstruction ms per iteration under CPU contention, for ``base.threads`` auto, 1 and 2.

    python bench/threads_contention.py [--iters 12] [--units 3] [--models resnet20 mobilenetv2_s]

For each model, thread setting and number of competing CPU-bound processes (``python -c 'while True:
pass'``, started before the measurement and killed after), a fresh interpreter applies the stage runtime
(portable kernels, the thread setting as ``stages.common.apply_runtime`` does; ``auto`` rechosen before
every unit, as the reconstruct stage does), builds a feature store of 256 calibration images, and runs QDrop
W2A4 reconstruction on ``--units`` units spread over the model (first, middle, last, ...), timing
iterations 2..N of each. Reported: the median over units of the per-unit mean ms/iteration, and the
threads ``auto`` chose. ``2`` is today's default on a 2-core machine (torch uses every core).
Run ``dvc repro prepare`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, tempfile, time
from pathlib import Path
import torch
from ptqflow.kernels import keep_freed_memory, set_threads, use_kernels
use_kernels("portable")
keep_freed_memory()
name, setting, iters, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
setting = setting if setting == "auto" else int(setting)
set_threads(setting)
sys.path.insert(0, str(Path.cwd() / "bench"))
from common import build_store, pretrained, rtn_model
from ptqflow.quant.model import QuantConfig
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
cpu = torch.device("cpu")
with tempfile.TemporaryDirectory() as tmp:
    fp = pretrained(name)
    store = build_store(fp, 256, Path(tmp) / "s.zarr")
    model = rtn_model(fp, store, QuantConfig(weight_bits=2, act_bits=4), cpu)
    n = len(store.units)
    picks = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})
    stamps, chosen = {}, []
    def progress(total, label):
        chosen.append(set_threads(setting))
        stamps[label] = []
        return lambda i, loss: stamps[label].append(time.perf_counter())
    others = frozenset(range(n)) - set(picks)
    reconstruct(model, store, [[i] for i in range(n)], ReconConfig(iters=iters), cpu, skip=others, progress=progress)
    per_unit = [1000 * (t[-1] - t[0]) / (len(t) - 1) for t in stamps.values()]
    print(json.dumps({"ms": statistics.median(per_unit), "threads": chosen}))
"""


def measure(name: str, setting: str, competitors: int, iters: int, units: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "ATEN_", "ONEDNN_", "DNNL_"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        time.sleep(0.5)
        done = subprocess.run(
            [sys.executable, "-c", CHILD, name, setting, str(iters), str(units)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--iters", type=int, default=12, help="QDrop iterations per unit")
    parser.add_argument("--units", type=int, default=3, help="units measured per model, spread over it")
    args = parser.parse_args()
    print(f"cores usable: {len(os.sched_getaffinity(0))}; QDrop W2A4, batch 32, portable kernels")
    print(f"{'model':<14} {'threads':>7} | {'quiet ms':>9} {'+1 busy':>9} {'+2 busy':>9} | auto chose")
    for name in args.models:
        for setting in ("auto", "1", "2"):
            cells, picks = [], []
            for competitors in (0, 1, 2):
                r = measure(name, setting, competitors, args.iters, args.units)
                cells.append(r["ms"])
                picks.append(",".join(map(str, sorted(set(r["threads"])))))
            quiet = cells[0]
            print(
                f"{name:<14} {setting:>7} | {quiet:>9.1f} {cells[1]:>9.1f} {cells[2]:>9.1f} | "
                f"{' / '.join(picks) if setting == 'auto' else '-'}   (x quiet: {cells[1] / quiet:.2f}, "
                f"{cells[2] / quiet:.2f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
