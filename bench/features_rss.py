"""Peak RSS of the ``features`` stage against the calibration-set size (it should stay flat).

Runs ``prepare`` then ``features`` in a fresh child process for each size and reads the child's peak
RSS (``getrusage``), so nothing else in this process skews it. Prints a table and the ratio.

    python bench/features_rss.py [--sizes 1024 4096] [--model resnet20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# The child imports everything, records its RSS, runs one stage, then prints both peaks (KiB).
_CHILD = """
import resource, sys
from pathlib import Path
from stages import features, prepare
from stages.params import load_params
params = load_params(Path(sys.argv[2]))
out = Path(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "prepare":
    prepare.run(params, out / "prepare")
else:
    features.run(params, out / "prepare" / "calibration.pt", out / "store.zarr")
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(size: int, model: str, weights: str, work: Path) -> tuple[float, float, float]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"].update(model=model, weights=str(ROOT / weights), device="cpu")
    params["prepare"]["calib_size"] = size
    run_dir = work / f"n{size}"
    run_dir.mkdir()
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    child = [sys.executable, "-c", _CHILD]
    subprocess.run([*child, "prepare", str(run_dir / "params.yaml"), str(run_dir)], check=True, capture_output=True)
    start = time.perf_counter()
    out = subprocess.run(
        [*child, "features", str(run_dir / "params.yaml"), str(run_dir)], check=True, capture_output=True, text=True
    ).stdout.split()
    seconds = time.perf_counter() - start
    before, peak = (int(v) / 1024 for v in out[-2:])  # KiB -> MiB
    return before, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--weights", default="data/pretrained/resnet20.pt")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            before, peak, seconds = measure(size, args.model, args.weights, Path(tmp))
            rows.append((size, before, peak, seconds))
    print(f"{'calib size':>10}  {'RSS after imports (MiB)':>26}  {'peak RSS (MiB)':>14}  {'seconds':>8}")
    for size, before, peak, seconds in rows:
        print(f"{size:>10}  {before:>26.0f}  {peak:>14.0f}  {seconds:>8.1f}")
    print(f"peak RSS ratio {rows[-1][0]}/{rows[0][0]} images: {rows[-1][2] / rows[0][2]:.3f}")


if __name__ == "__main__":
    main()
