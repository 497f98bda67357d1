"""Incremental-run costs of the root pipeline: cold ``dvc repro``, no-op ``dvc repro``, and a rerun
after editing an evaluate-only key. All three in one run, in a temporary git + DVC copy of this repo.

The evaluate-only edit is ``evaluate.topk`` (a reporting key: only ``evaluate`` reruns, on stored logits).
For comparison it also times an edit of ``predict.batch_size``, which reruns the inference of all models
(``predict``; ``evaluate`` too if the logits' bytes change).

    python bench/incremental.py [--noop-repeats 5] [--calib-size 1024]

Targets (issues 2 and 5): no-op <= 3 s; evaluate-only edit <= 3 % of the cold run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop-repeats", type=int, default=5)
    parser.add_argument("--calib-size", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for item in ("src", "stages", "dvc.yaml", "params.yaml"):
            (shutil.copytree if (ROOT / item).is_dir() else shutil.copy)(ROOT / item, repo / item)
        shutil.copytree(ROOT / "data" / "pretrained", repo / "data" / "pretrained")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["prepare"]["calib_size"] = args.calib_size
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        _timed(["git", "init", "-q"], repo)
        _timed(["dvc", "init", "-q"], repo)
        cold = _timed(["dvc", "repro"], repo)
        noop = [_timed(["dvc", "repro"], repo) for _ in range(args.noop_repeats)]
        params["evaluate"]["topk"] = [1, 3, 5]
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        edit = _timed(["dvc", "repro"], repo)
        params["predict"]["batch_size"] += 1
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        predict_edit = _timed(["dvc", "repro"], repo)
    print(f"cold dvc repro:              {cold:8.1f} s")
    runs = ", ".join(f"{t:.2f}" for t in noop)
    print(f"no-op dvc repro (median of {len(noop)}): {statistics.median(noop):6.2f} s  (all: {runs})")
    print(f"evaluate-only edit rerun:    {edit:8.1f} s  = {100 * edit / cold:.1f} % of cold  (evaluate.topk)")
    print(f"predict.batch_size rerun:    {predict_edit:8.1f} s  = {100 * predict_edit / cold:.1f} % of cold")


if __name__ == "__main__":
    main()
