"""Stage ``export``: every quantized model of a folder (``reconstruct``'s by default, or ``quantize``'s RTN
models) to a QDQ ONNX file, a plain state_dict and a JSON of scales/zero points/bits, checked in
onnxruntime (CPU) against the PyTorch fake-quant model on the test set.

Per model ``<name>``: ``<out>/<name>.onnx``, ``<out>/<name>.state_dict.pt``, ``<out>/<name>.json``; the
check's numbers go to the metrics JSON. The check runs the graph in onnxruntime node by node (graph
optimisations off: the file's exact float semantics); a model whose ONNX top-1 differs from PyTorch's by
more than ``export.max_top1_diff`` points, or whose argmax agrees on fewer than ``export.min_agreement``
percent of the samples, fails the stage (nothing is written). The same comparison under onnxruntime's
default session (QDQ groups fused into integer kernels, which round on their own) is recorded under
``fused``, for information.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_bytes, atomic_write_json
from ptqflow.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, normalize
from ptqflow.errors import ConfigError, ExportError, ModelError
from ptqflow.evaluate import predict_logits
from ptqflow.export import ExportConfig, compare_logits, export_onnx, onnx_logits, plain_state_dict
from ptqflow.models import build_model
from ptqflow.quant.model import load_quant_file
from stages.common import load_split
from stages.params import section

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportStageConfig(ExportConfig):
    """``export.*``: :class:`ptqflow.export.ExportConfig`'s keys (``opset``, ``containers``), plus:

    Args:
        batch_size: test images per forward pass (PyTorch and onnxruntime).
        max_top1_diff: largest allowed |top-1 ONNX - top-1 PyTorch|, in points.
        min_agreement: smallest allowed per-sample argmax agreement, in percent.
    """

    batch_size: int = 500
    max_top1_diff: float = 0.1
    min_agreement: float = 99.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.max_top1_diff <= 100.0 or not 0.0 <= self.min_agreement <= 100.0:
            raise ConfigError("max_top1_diff and min_agreement are percentages in [0, 100]")

    def library(self) -> ExportConfig:
        """The library config (the graph-writing keys only)."""
        return ExportConfig(opset=self.opset, containers=self.containers)


def run(params: dict[str, Any], models_dir: Path, test: Path, out: Path, metrics_path: Path) -> dict[str, Any]:
    """Export and check every ``models_dir/*.pt``; write ``out/`` and ``metrics_path``."""
    config = section(params, "export", ExportStageConfig)
    files = sorted(Path(models_dir).glob("*.pt"))
    if not files:
        raise ModelError(f"no quantized models (*.pt) in {models_dir}; run dvc repro reconstruct (or pass --models)")
    data = load_split(test)
    cpu = torch.device("cpu")
    metrics: dict[str, Any] = {"samples": len(data), "opset": config.opset}
    failures = []
    with atomic_dir(out) as tmp:
        for path in files:
            model, model_name, qconfig = load_quant_file(path, build_model)
            example = normalize(data.images[:1])
            onnx_bytes, table = export_onnx(model, example, config.library())
            table.update(
                model=model_name,
                input={"name": "image", "shape": ["batch", *example.shape[1:]], "dtype": "float32",
                       "preprocess": {"scale": 1 / 255, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}},
                output={"name": "logits"},
            )  # fmt: skip
            atomic_write_bytes(tmp / f"{path.stem}.onnx", onnx_bytes)
            atomic_save_torch(plain_state_dict(model), tmp / f"{path.stem}.state_dict.pt")
            atomic_write_json(tmp / f"{path.stem}.json", table)
            reference = predict_logits(model, data, config.batch_size, normalize, cpu)
            # The check: the graph node by node (its exact float semantics) against the torch fake-quant model.
            result = compare_logits(reference, onnx_logits(onnx_bytes, data, config.batch_size, normalize, False),
                                    data.labels)  # fmt: skip
            # For information: onnxruntime's default session, which fuses QDQ groups into integer kernels.
            fused = compare_logits(reference, onnx_logits(onnx_bytes, data, config.batch_size, normalize, True),
                                   data.labels)  # fmt: skip
            containers = sorted({t["container"] for kind in ("weights", "activations") for t in table[kind].values()})
            metrics[path.stem] = {
                **result,
                "fused": {k: fused[k] for k in ("top1_onnx", "agreement", "max_abs_logit_diff")},
                "weight_bits": qconfig.weight_bits,
                "act_bits": qconfig.act_bits,
                "containers": containers,
                "onnx_bytes": len(onnx_bytes),
            }
            log.info("%s: %s", path.stem, metrics[path.stem])
            diff = abs(result["top1_onnx"] - result["top1_torch"])
            if diff > config.max_top1_diff or result["agreement"] < config.min_agreement:
                failures.append(
                    f"{path.stem}: top-1 {result['top1_onnx']} (onnx) vs {result['top1_torch']} (torch), "
                    f"agreement {result['agreement']}%"
                )
        if failures:
            raise ExportError(
                f"onnxruntime disagrees with PyTorch beyond export.max_top1_diff={config.max_top1_diff} / "
                f"export.min_agreement={config.min_agreement}: " + "; ".join(failures)
            )
        atomic_write_json(metrics_path, metrics)
    return metrics
