"""ImageNet scale on this machine: the feature store and the reconstruction at 224x224, measured.

For torchvision ResNet-18 and ResNet-50 (random-init weights saved to a file: the sizes and times do not
depend on the values) on a generated image folder of 224x224-croppable JPEGs, at calibration sizes 64, 256
and 1024, with the presets' store settings (``features.*`` of ``pipelines/imagenet-<model>/params.yaml``,
overridable with ``--dtype``/``--grads``/``--shard-size``), it runs the real stages as a user would
(``ptqflow prepare``, ``ptqflow features``, ``ptqflow quantize``, ``ptqflow reconstruct``) and reports:

* the store's bytes on disk (compressed) against its uncompressed size, and the features stage's wall
  time and peak RSS against a plain FP forward (and forward + backward) of the same images;
* DVC's cost for the store: ``dvc add`` (hash + copy into the cache), ``dvc status`` with the hash
  cache removed (a full re-hash), ``dvc push`` to a local directory remote;
* at ``--recon-size`` images: ``reconstruct`` with a few iterations per unit under each ``base.memory``
  mode: peak RSS of the process, ms per iteration per unit at batch 32, and whether the reconstructed
  models of all modes are the same bytes.

    python bench/imagenet_scale.py [--models resnet18 resnet50] [--sizes 64 256 1024] [--recon-size 1024]
        [--iters 4] [--modes device cpu stream] [--workdir DIR] [--json results.json]

The work folder needs about four times the largest store plus stream's spill files (about 16 GB for
ResNet-50 at 1024 images in float16); each size's folder is deleted after it is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PTQFLOW = str(Path(sys.executable).parent / "ptqflow")
DVC = str(Path(sys.executable).parent / "dvc")


def make_image_folder(root: Path, train: int, val: int, classes: int = 10, seed: int = 0) -> None:
    """Smooth random RGB images (low-frequency noise upsampled, plus grain) of 300x260 to 360x320 pixels,
    saved as JPEG quality 90: decoding and crop costs like photographs, no download."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(300, 361)), int(rng.integers(260, 321))
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{split}_{i:05d}.JPEG", quality=90)


def run(args: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run a command; return its wall seconds and its peak RSS in MB (``wait4``'s ``ru_maxrss``)."""
    began = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return seconds, usage.ru_maxrss / 1024


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def params_for(model: str, weights: Path, images: Path, size: int, args: argparse.Namespace) -> dict[str, Any]:
    preset = yaml.safe_load((ROOT / "pipelines" / f"imagenet-{model}" / "params.yaml").read_text())
    preset["base"].update(weights=str(weights), device="cpu")
    preset["prepare"].update(data_root=str(images), calib_size=size)
    for key in ("dtype", "grads", "shard_size"):
        if getattr(args, key) is not None:
            preset["features"][key] = getattr(args, key)
    preset["quantize"].update(bits={"w4a4": {"weight_bits": 4, "act_bits": 4}}, calib_size=min(256, size))
    preset["reconstruct"].update(targets=["w4a4"], iters=args.iters)
    return preset


def fp_baseline(model: torch.nn.Module, calibration: Path, batch: int) -> tuple[float, float]:
    """Seconds of a plain FP forward, and of forward + cross-entropy backward, over the calibration set."""
    from stages.common import load_calibration

    data, preprocess = load_calibration(calibration)
    times = []
    for backward in (False, True):
        began = time.perf_counter()
        for start in range(0, len(data), batch):
            x = preprocess(data.images[start : start + batch])
            with torch.set_grad_enabled(backward):
                out = model(x)
                if backward:
                    torch.nn.functional.cross_entropy(out, data.labels[start : start + batch]).backward()
        times.append(time.perf_counter() - began)
    return times[0], times[1]


def measure_size(model: str, size: int, work: Path, images: Path, weights: Path, args: argparse.Namespace) -> dict:
    ws = work / f"{model}-{size}"
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    log = ws / "log.txt"
    params = params_for(model, weights, images, size, args)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = ["--params", "params.yaml"]
    run([PTQFLOW, *p, "prepare", "--out", "data/prepare"], ws, log)
    store = ws / "data" / "features" / "store.zarr"
    feat_s, feat_rss = run(
        [PTQFLOW, *p, "features", "--calibration", "data/prepare/calibration.pt", "--out", str(store)], ws, log
    )
    meta = json.loads((store / "zarr.json").read_text())["attributes"]
    from ptqflow.features import store_bytes

    raw = store_bytes(meta["input_shape"], list(meta["output_shapes"].values()), size, meta["dtype"], meta["grads"])
    row: dict[str, Any] = {
        "model": model,
        "samples": size,
        "dtype": meta["dtype"],
        "grads": meta["grads"],
        "shard_size": meta["shard_size"],
        "store_bytes": tree_bytes(store),
        "store_files": sum(1 for f in store.rglob("*") if f.is_file()),
        "uncompressed_bytes": raw,
        "features_s": round(feat_s, 1),
        "features_rss_mb": round(feat_rss),
    }
    net = getattr(torchvision.models, model)()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    fwd, fwd_bwd = fp_baseline(net, ws / "data" / "prepare" / "calibration.pt", params["features"]["batch_size"])
    row.update(fp_forward_s=round(fwd, 1), fp_forward_backward_s=round(fwd_bwd, 1))
    remote = work / f"remote-{model}-{size}"
    run([DVC, "init", "--no-scm", "-q"], ws, log)
    run([DVC, "remote", "add", "-d", "local", str(remote)], ws, log)
    row["dvc_add_s"] = round(run([DVC, "add", "-q", "data/features/store.zarr"], ws, log)[0], 1)
    shutil.rmtree(ws / ".dvc" / "tmp", ignore_errors=True)  # drop DVC's hash cache: the next status re-hashes all
    row["dvc_status_cold_s"] = round(run([DVC, "status", "-q"], ws, log)[0], 1)
    row["dvc_status_warm_s"] = round(run([DVC, "status", "-q"], ws, log)[0], 1)
    row["dvc_push_s"] = round(run([DVC, "push", "-q"], ws, log)[0], 1)
    shutil.rmtree(remote, ignore_errors=True)
    shutil.rmtree(ws / ".dvc" / "cache", ignore_errors=True)
    if size == args.recon_size:
        row["reconstruct"] = measure_reconstruct(ws, p, args, log)
    shutil.rmtree(ws, ignore_errors=True)
    return row


def measure_reconstruct(ws: Path, p: list[str], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    quantize_s, _ = run(
        [PTQFLOW, *p, "quantize", "--features", "data/features/store.zarr", "--out", "data/quantize"], ws, log
    )
    results: dict[str, Any] = {"quantize_s": round(quantize_s, 1), "modes": {}}
    digests = set()
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for mode in args.modes:
        params["base"]["memory"] = mode
        (ws / f"params-{mode}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = ws / f"recon-{mode}"
        cmd = [PTQFLOW, "--params", f"params-{mode}.yaml", "reconstruct", "--features", "data/features/store.zarr"]
        cmd += ["--rtn", "data/quantize", "--out", str(out), "--plots", str(ws / f"plots-{mode}")]
        cmd += ["--timing", str(ws / f"timing-{mode}.json"), "--unit-seconds", str(ws / f"units-{mode}")]
        seconds, rss = run(cmd, ws, log)
        lines = (ws / f"units-{mode}" / "w4a4.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        units = [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]
        digests.add(hashlib.sha256((out / "w4a4.pt").read_bytes()).hexdigest())
        results["modes"][mode] = {
            "seconds": round(seconds, 1),
            "peak_rss_mb": round(rss),
            "iter_ms": {u["unit"]: float(u["iter_ms"]) for u in units},
            "unit_seconds": {u["unit"]: float(u["seconds"]) for u in units},
        }
        shutil.rmtree(out)
    results["identical"] = len(digests) == 1
    return results


def table(rows: list[dict[str, Any]]) -> str:
    gb = 1e9
    lines = [
        "| model | images | store on disk | uncompressed | features s (RSS) | FP fwd / fwd+bwd s | dvc add "
        "| status cold / warm | push |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['samples']} | {r['store_bytes'] / gb:.2f} GB ({r['store_files']} files) | "
            f"{r['uncompressed_bytes'] / gb:.2f} GB | {r['features_s']} ({r['features_rss_mb'] / 1024:.1f} GB) | "
            f"{r['fp_forward_s']} / {r['fp_forward_backward_s']} | {r['dvc_add_s']} s | "
            f"{r['dvc_status_cold_s']} / {r['dvc_status_warm_s']} s | {r['dvc_push_s']} s |"
        )
    for r in rows:
        if "reconstruct" not in r:
            continue
        rec = r["reconstruct"]
        lines += [
            "",
            f"{r['model']}, {r['samples']} images, quantize {rec['quantize_s']} s; "
            f"identical models across modes: {rec['identical']}",
            "",
        ]
        modes = list(rec["modes"])
        lines.append("| unit | " + " | ".join(f"{m} ms/iter" for m in modes) + " |")
        lines.append("|---|" + "---|" * len(modes))
        for unit in rec["modes"][modes[0]]["iter_ms"]:
            lines.append(f"| {unit} | " + " | ".join(f"{rec['modes'][m]['iter_ms'][unit]:.0f}" for m in modes) + " |")
        medians = [statistics.median(rec["modes"][m]["iter_ms"].values()) for m in modes]
        lines.append("| median | " + " | ".join(f"{v:.0f}" for v in medians) + " |")
        lines.append("| stage s | " + " | ".join(str(rec["modes"][m]["seconds"]) for m in modes) + " |")
        lines.append(
            "| peak RSS | " + " | ".join(f"{rec['modes'][m]['peak_rss_mb'] / 1024:.2f} GB" for m in modes) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 256, 1024])
    parser.add_argument("--recon-size", type=int, default=1024, help="calibration size of the reconstruct runs")
    parser.add_argument("--recon-models", nargs="+", default=None, help="models to reconstruct (default: all)")
    parser.add_argument("--iters", type=int, default=4, help="iterations per unit in the reconstruct runs")
    parser.add_argument("--modes", nargs="+", default=["device", "cpu", "stream"])
    parser.add_argument("--dtype", choices=["float32", "float16"], default=None, help="override the preset's")
    parser.add_argument("--grads", type=lambda s: s == "true", default=None, help="true|false: override the preset's")
    parser.add_argument("--shard-size", type=int, default=None, help="override the preset's")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    from stages.common import apply_runtime

    apply_runtime({"base": {"kernels": "portable", "threads": "auto"}})  # the stages' kernels and threads
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ptqflow-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    if not (images / "train").is_dir():
        make_image_folder(images, train=max(args.sizes), val=20)
    rows = []
    for model in args.models:
        weights = work / f"{model}-random.pth"
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, model)().state_dict(), weights)
        for size in args.sizes:
            reconstructing = args.recon_models is None or model in args.recon_models
            saved = args.recon_size
            args.recon_size = args.recon_size if reconstructing else -1
            rows.append(measure_size(model, size, work, images, weights, args))
            args.recon_size = saved
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
