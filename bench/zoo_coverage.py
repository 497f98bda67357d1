"""Coverage of torchvision's classification zoo (README "Any model"): every model, random weights.

    python bench/zoo_coverage.py --out bench/zoo_coverage.json            # all of them (about an hour)
    python bench/zoo_coverage.py --models resnet18 efficientnet_b0        # a few
    python bench/zoo_coverage.py --table bench/zoo_coverage.json          # the table of a saved run

Each model runs :func:`ptqflow.coverage.check_model` (W4A4, QDrop convention, 4 images, 2 QDrop iterations
per unit, ONNX export checked in onnxruntime) in its own process (bounded memory, one thread), at 64x64
unless the architecture needs more. Prints a markdown table; ``--out`` also writes the JSON rows.
``--timm`` runs the same check over a sample of timm CNN families (``pip install timm``; no weights needed).
A model refused for weights hidden in an op is then run the way its one-line error says: each module it names
added to ``float_leaves`` until accepted (``with_float_leaves`` in the JSON row).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

#: Input sizes other than 64: architectures with a fixed input, or whose adaptive pooling would upsample
#: (torch.onnx exports adaptive pooling only to a factor of its input size).
SIZES = {"inception_v3": 96, "alexnet": 224, "maxvit_t": 224}
SIZES.update({f"vgg{d}{bn}": 224 for d in (11, 13, 16, 19) for bn in ("", "_bn")})
SIZES.update({name: 224 for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")})
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "rexnet_100", "ghostnet_100",
        "convnext_atto", "mixnet_s", "dla34", "hrnet_w18_small", "cspresnet50", "dpn68", "tinynet_a", "lcnet_050",
        "repvgg_a0", "resnest14d", "selecsls42b", "vovnet39a", "xception41", "mobilevit_xxs"]  # fmt: skip


def _crash(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _checked(model: torch.nn.Module, size: int, leaves: list[str]) -> dict[str, Any]:
    """check_model on 4 random images; the row's fields and status (an export refused alone is noted)."""
    from ptqflow.coverage import check_model

    with tempfile.TemporaryDirectory() as tmp:
        report = check_model(model, torch.randn(4, 3, size, size), Path(tmp), float_leaves=leaves)
    row: dict[str, Any] = report.to_json()
    row["status"] = "pass" if report.passed else "FAIL"
    if report.onnx_error and not report.unquantized and not report.probe_violations and report.recon_finite:
        row["status"] = f"pass; export refused: {report.onnx_error}"
    return row


def _one(name: str, source: str, queue: Any) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from ptqflow.coverage import bn_statistics
    from ptqflow.errors import ModelError

    began = time.perf_counter()
    row: dict[str, Any] = {"model": name, "source": source}
    try:
        if source == "timm":
            import timm

            model = timm.create_model(name, pretrained=False, num_classes=10)
        else:
            model = torchvision.models.get_model(name, weights=None)
        size = SIZES.get(name, 64)
        bn_statistics(model, torch.randn(8, 3, size, size))
        row.update(_checked(model, size, []))
    except ModelError as exc:
        row.update(status="refused", reason=str(exc))
        if "holds weights ptqflow cannot quantize" in str(exc):
            # The refusal is the finding; report it before a retry that may not fit in memory.
            row["with_float_leaves"] = {"status": "error", "reason": "the retry's process died", "float_leaves": []}
            row["seconds"] = round(time.perf_counter() - began, 1)
            queue.put(dict(row))
            row["with_float_leaves"] = _with_float_leaves(model, size, str(exc))
    except Exception as exc:  # a crash is a finding: report it, do not stop the sweep
        row.update(status="error", reason=_crash(exc))
    row["seconds"] = round(time.perf_counter() - began, 1)
    queue.put(row)


def _with_float_leaves(model: torch.nn.Module, size: int, reason: str) -> dict[str, Any]:
    """Do what the refusal says: add each module it names to ``float_leaves`` until the model is accepted,
    then run the same check (the named modules stay float and are listed)."""
    from ptqflow.errors import ModelError

    leaves: list[str] = []
    while True:
        found = re.match(r"(?:module|function \S+ in) (\S+)", reason)
        if found is None or found.group(1) in leaves or len(leaves) >= 200:
            return {"status": "refused", "reason": reason, "float_leaves": leaves}
        leaves.append(found.group(1))
        try:
            return _checked(model, size, leaves)
        except ModelError as exc:
            reason = str(exc)
        except Exception as exc:  # a crash is a finding, as in _one
            return {"status": "error", "reason": _crash(exc), "float_leaves": leaves}


def _run(name: str, source: str, timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_one, args=(name, source, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"model": name, "source": source, "status": "error", "reason": f"timed out after {timeout:.0f} s"}
    rows: list[dict[str, Any]] = []
    while not queue.empty():
        rows.append(queue.get())
    if not rows:
        return {"model": name, "source": source, "status": "error", "reason": f"process died (exit {proc.exitcode})"}
    if proc.exitcode != 0 and "with_float_leaves" in rows[-1]:
        rows[-1]["with_float_leaves"]["reason"] = f"the retry's process died (exit {proc.exitcode})"
    return rows[-1]


HEADER = (
    "| model | units (blocks) | weight q | act q | silent float | probe | FP diff | QDrop | ONNX agree / rel "
    "| first ONNX divergence | s | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(row: dict[str, Any]) -> str:
    """One table row (README "Coverage of the torchvision zoo")."""
    name = row["model"]
    if row["status"] == "FAIL" or row["status"].startswith("pass"):
        return (
            f"| {name} | {row['units']} ({row['blocks']}) | {row['weight_quantizers']} | "
            f"{row['act_quantizers']} | {len(row['unquantized'])} | "
            f"{row['probed'] - len(row['probe_violations'])}/{row['probed']} | "
            f"{row['fp_max_abs_diff']:.1e} | {row['recon_steps']} steps | "
            f"{row['onnx_agreement']:.0f} % / {row['onnx_rel_diff']:.1e} | {row['onnx_first_divergence'] or ''} | "
            f"{row['seconds']} | {row['status']} |"
        )
    extra = ""
    retry = row.get("with_float_leaves")
    if retry:
        extra = f"; with {len(retry['float_leaves'])} float leaves: {retry['status']}"
        if retry["status"] != "pass" and "reason" in retry:
            extra += f" ({retry['reason']})"
        if "act_quantizers" in retry:
            extra += (
                f" ({retry['units']} units, {retry['weight_quantizers']} weight q, {retry['act_quantizers']} act q, "
                f"{len(retry['unquantized'])} silent float, ONNX first divergence "
                f"{retry['onnx_first_divergence'] or 'none'})"
            )
    return f"| {name} | | | | | | | | | | {row.get('seconds', '')} | {row['status']}: {row['reason']}{extra} |"


def summary(rows: list[dict[str, Any]]) -> str:
    passed = sum(r["status"] == "pass" for r in rows)  # a refused export is not a pass
    refused = sum(r["status"] == "refused" for r in rows)
    leaves = sum(r.get("with_float_leaves", {}).get("status") == "pass" for r in rows)
    return f"{passed} of {len(rows)} pass; {refused} refused in one line ({leaves} pass with the float leaves named)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="torchvision (or with --timm, timm) model names")
    parser.add_argument("--timm", action="store_true", help="the timm sample instead of torchvision")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per model")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--table", type=Path, help="only print the table of rows saved earlier with --out")
    args = parser.parse_args()
    if args.table:
        rows = json.loads(args.table.read_text())
        print("\n".join([HEADER, *map(markdown_row, rows), summary(rows)]))
        return 0
    source = "timm" if args.timm else "torchvision"
    names = args.models or (TIMM if args.timm else sorted(torchvision.models.list_models(module=torchvision.models)))
    rows = []
    print(HEADER)
    for name in names:
        row = _run(name, source, args.timeout)
        rows.append(row)
        print(markdown_row(row), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
