"""ONNX QDQ export round trip of the embedded models: PyTorch fake-quant vs onnxruntime on the test set.

For each model and W/A pair: the round-to-nearest model (``brecq`` convention, first/last layer weights
8-bit, activation ranges from 256 calibration images), exported with :func:`ptqflow.export.export_onnx`,
run in onnxruntime node by node (the check the ``export`` stage enforces) and with its default fused
session (integer kernels, for information). Prints top-1 of both, per-sample argmax agreement and the
largest logit difference. Needs ``dvc repro prepare`` (calibration and test splits) and ``ptqflow[export]``.

    python bench/export_roundtrip.py [--models resnet20 mobilenetv2_s] [--bits 8/8 4/4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, build_store, pretrained, rtn_model

from ptqflow.data import normalize
from ptqflow.evaluate import predict_logits
from ptqflow.export import ExportConfig, compare_logits, export_onnx, onnx_logits
from ptqflow.quant.model import QuantConfig
from stages.common import load_split

CPU = torch.device("cpu")  # onnxruntime runs on the CPU; compare on the same device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2_s"])
    parser.add_argument("--bits", nargs="+", default=["8/8", "4/4"], help="W/A pairs")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    test = load_split(ROOT / "data" / "prepare" / "test.pt")
    lines = [
        "| model | W/A | top-1 torch | top-1 onnx | agreement % | max logit diff | fused top-1 | fused agreement % "
        "| onnx KiB | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fp = pretrained(name)
            store = build_store(fp, 256, Path(tmp) / f"{name}.zarr")
            for pair in args.bits:
                w, a = (int(b) for b in pair.split("/"))
                start = time.perf_counter()
                model = rtn_model(fp, store, QuantConfig(weight_bits=w, act_bits=a), CPU)
                model.eval()
                onnx_bytes, _ = export_onnx(model, normalize(test.images[:1]), ExportConfig())
                reference = predict_logits(model, test, args.batch_size, normalize, CPU)
                exact = compare_logits(reference, onnx_logits(onnx_bytes, test, args.batch_size, normalize, False),
                                       test.labels)  # fmt: skip
                fused = compare_logits(reference, onnx_logits(onnx_bytes, test, args.batch_size, normalize, True),
                                       test.labels)  # fmt: skip
                row = [
                    name,
                    pair,
                    f"{exact['top1_torch']:.2f}",
                    f"{exact['top1_onnx']:.2f}",
                    f"{exact['agreement']:.2f}",
                    f"{exact['max_abs_logit_diff']:.3g}",
                    f"{fused['top1_onnx']:.2f}",
                    f"{fused['agreement']:.2f}",
                    f"{len(onnx_bytes) / 1024:.0f}",
                    f"{time.perf_counter() - start:.0f}",
                ]
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    print(f"\n{len(test)} test images, onnxruntime CPU; 'fused' = default session (QDQ fused to integer kernels)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
