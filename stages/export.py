"""Stage ``export``: every quantized model of a folder (``reconstruct``'s by default, or ``quantize``'s RTN
models) to a QDQ ONNX file, a plain state_dict and a JSON of scales/zero points/bits, checked in
onnxruntime (CPU) against the PyTorch fake-quant model on the test set.

Per model ``<name>``: ``<out>/<name>.onnx``, ``<out>/<name>.state_dict.pt``, ``<out>/<name>.json``; the
check's numbers go to the metrics JSON. Two checks, each with the same thresholds (a top-1 difference above
``export.max_top1_diff`` points or an argmax agreement below ``export.min_agreement`` percent fails the
stage, and nothing is written):

1. the graph in onnxruntime node by node (graph optimisations off: the file's exact float semantics)
   against the PyTorch fake-quant model -- the graph is the model;
2. onnxruntime's default session -- the QDQ groups fused into integer kernels, what a user deploys --
   against ptqflow's integer-exact simulation of those kernels (:mod:`ptqflow.integer`; ``top1_int``,
   the number ``evaluate`` reports beside the fake-quant top-1), under ``fused``.

OpenVINO (CPU, f32 float parts) reads the same file as a third runtime, recorded under ``openvino``
against the integer-exact logits, or ``skipped`` with the reason when openvino is not installed. Whether the
graph follows TensorRT's explicit-quantization rules is recorded under ``tensorrt``
(:func:`ptqflow.export.tensorrt_violations`: ready only for ``quantize.scheme: symmetric`` at 8-bit
activations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_bytes, atomic_write_json
from ptqflow.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, batches, normalize
from ptqflow.errors import ConfigError, ExportError, ModelError
from ptqflow.export import (
    ExportConfig,
    beyond_thresholds,
    compare_logits,
    export_onnx,
    onnx_session,
    openvino_session,
    plain_state_dict,
    tensorrt_violations,
)
from ptqflow.imagefolder import normalize_channels
from ptqflow.integer import IntegerModel
from ptqflow.models import build_model
from ptqflow.quant.model import QuantModel, load_quant_file
from stages.common import load_split, open_image_test_set
from stages.params import section

log = logging.getLogger(__name__)

#: A test set that can be iterated more than once: ``(normalized float inputs, labels)`` batches.
TestBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


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


def _test_set(test: Path, images: Path | None, batch_size: int) -> tuple[TestBatches, dict[str, Any], int]:
    """The test set as a re-iterable of ``(float input, labels)`` batches, the ONNX input's preprocessing
    (for the scales JSON) and its size: ``test.pt`` in memory, or an image folder's ``test.json`` streamed
    from ``images`` (decoded once per pass, as ``predict`` does)."""
    if Path(test).suffix == ".json":
        dataset, mean, std = open_image_test_set(Path(test), images)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)

        def folder() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in loader:
                yield normalize_channels(x, mean, std), y

        pre = {"scale": 1 / 255, "mean": list(mean), "std": list(std), "resize": dataset.resize, "crop": dataset.crop}
        return folder, pre, len(dataset)
    data = load_split(test)

    def memory() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in batches(data, batch_size):
            yield normalize(images), labels

    pre = {"scale": 1 / 255, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}
    return memory, pre, len(data)


def _all_logits(model: QuantModel, onnx_bytes: bytes, test: TestBatches) -> tuple[dict[str, torch.Tensor], str | None]:
    """Logits of every runtime over the test set in one pass, and why OpenVINO was skipped (or ``None``).

    Keys: ``torch`` (the fake-quant model, run as :func:`ptqflow.evaluate.predict_logits` runs it:
    channels_last, inference mode, so these are the bits ``predict`` reported), ``int`` (integer-exact,
    :class:`ptqflow.integer.IntegerModel`), ``node`` (onnxruntime node by node), ``fused`` (onnxruntime's
    default session), ``openvino`` (when installed) and ``labels``.
    """
    runtimes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "node": onnx_session(onnx_bytes, optimize=False),
        "fused": onnx_session(onnx_bytes, optimize=True),
    }
    skipped = None
    try:
        runtimes["openvino"] = openvino_session(onnx_bytes)
    except ExportError as exc:
        skipped = str(exc)
        log.warning("OpenVINO check skipped: %s", exc)
    integer = IntegerModel(model)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("torch", "int", *runtimes, "labels")}
    model.eval().to(memory_format=torch.channels_last)  # outside inference mode, as predict_logits does
    with torch.inference_mode():
        for x, y in test():
            out["torch"].append(model(x.contiguous(memory_format=torch.channels_last)).float())
            out["int"].append(integer(x.contiguous(memory_format=torch.channels_last)).float())
            for name, runtime in runtimes.items():
                out[name].append(runtime(x))
            out["labels"].append(y)
    model.to(memory_format=torch.contiguous_format)
    return {k: torch.cat(v) for k, v in out.items()}, skipped


def run(
    params: dict[str, Any], models_dir: Path, test: Path, out: Path, metrics_path: Path, images: Path | None = None
) -> dict[str, Any]:
    """Export and check every ``models_dir/*.pt``; write ``out/`` and ``metrics_path``.

    Args:
        test: ``test.pt`` from prepare, or ``test.json`` (an image-folder index, streamed from ``images``).
        images: the image folder's root the index's paths are relative to (``test.json`` only).
    """
    config = section(params, "export", ExportStageConfig)
    files = sorted(Path(models_dir).glob("*.pt"))
    if not files:
        raise ModelError(f"no quantized models (*.pt) in {models_dir}; run dvc repro reconstruct (or pass --models)")
    test_batches, preprocess, samples = _test_set(Path(test), images, config.batch_size)
    example = next(iter(test_batches()))[0][:1]
    metrics: dict[str, Any] = {"samples": samples, "opset": config.opset}
    failures = []
    with atomic_dir(out) as tmp:
        for path in files:
            model, model_name, qconfig = load_quant_file(path, build_model)
            onnx_bytes, table = export_onnx(model, example, config.library())
            table.update(
                model=model_name,
                input={"name": "image", "shape": ["batch", *example.shape[1:]], "dtype": "float32",
                       "preprocess": preprocess},
                output={"name": "logits"},
            )  # fmt: skip
            atomic_write_bytes(tmp / f"{path.stem}.onnx", onnx_bytes)
            atomic_save_torch(plain_state_dict(model), tmp / f"{path.stem}.state_dict.pt")
            atomic_write_json(tmp / f"{path.stem}.json", table)
            logits, skipped = _all_logits(model, onnx_bytes, test_batches)
            labels = logits["labels"]
            # Check 1: the graph node by node (its exact float semantics) against the torch fake-quant model.
            result = compare_logits(logits["torch"], logits["node"], labels)
            # Check 2: onnxruntime's default session (QDQ groups fused into integer kernels) against the
            # integer-exact simulation of those kernels.
            fused = compare_logits(logits["int"], logits["fused"], labels)
            containers = sorted({t["container"] for kind in ("weights", "activations") for t in table[kind].values()})
            entry: dict[str, Any] = {
                **result,
                "top1_int": fused["top1_torch"],
                "int_agreement": compare_logits(logits["torch"], logits["int"], labels)["agreement"],
                "fused": {k: fused[k] for k in ("top1_onnx", "agreement", "max_abs_logit_diff")},
            }
            if skipped is None:  # a third runtime, recorded against the integer-exact logits
                vino = compare_logits(logits["int"], logits["openvino"], labels)
                entry["openvino"] = {k: vino[k] for k in ("top1_onnx", "agreement", "max_abs_logit_diff")}
            else:
                entry["openvino"] = {"skipped": skipped}
            rules = tensorrt_violations(onnx_bytes)  # TensorRT's explicit-quantization rules, on the graph
            entry["tensorrt"] = {"ready": not rules, "violations": len(rules), "first": rules[:3]}
            metrics[path.stem] = {
                **entry,
                "weight_bits": qconfig.weight_bits,
                "act_bits": qconfig.act_bits,
                "scheme": qconfig.scheme,
                "bias": qconfig.bias,
                "containers": containers,
                "onnx_bytes": len(onnx_bytes),
            }
            log.info("%s: %s", path.stem, metrics[path.stem])
            for what, res in (("node by node vs torch fake-quant", result), ("fused session vs integer-exact", fused)):
                failure = beyond_thresholds(res, config.max_top1_diff, config.min_agreement)
                if failure is not None:
                    failures.append(f"{path.stem} {what}: {failure}")
        if failures:
            raise ExportError(
                f"onnxruntime disagrees beyond export.max_top1_diff={config.max_top1_diff} / "
                f"export.min_agreement={config.min_agreement}: " + "; ".join(failures)
            )
        atomic_write_json(metrics_path, metrics)
    return metrics
