"""The Python API: quantize a model from calibration tensors or a DataLoader in one call, without DVC.

The same library code the pipeline's stages run, in the same order: FP unit activations into a feature store
(a temporary folder, removed afterwards; :mod:`ptqflow.features`), round-to-nearest weights with the Lp range
search and activation ranges from the FP unit inputs (:mod:`ptqflow.quant.model`), then, for ``qdrop`` and
``brecq``, block-wise reconstruction (:mod:`ptqflow.recon.reconstruct`: BRECQ, Li et al., ICLR 2021, eq. 7;
QDrop, Wei et al., ICLR 2022, eq. 9). Errors are the library's one-line :class:`~ptqflow.errors.PtqflowError`.

Example (also run by the tests, ``tests/ptqflow/test_api.py``)::

    import torch, ptqflow
    model = ptqflow.build_model("resnet20")           # or any traceable nn.Module of your own
    images = torch.randn(64, 1, 28, 28)               # preprocessed calibration inputs (or a DataLoader)
    qmodel = ptqflow.quantize(model, images, weight_bits=4, act_bits=4, method="qdrop", iters=50)
    print(ptqflow.evaluate_model(qmodel, (images, torch.zeros(64, dtype=torch.long)), topk=(1,)))
    ptqflow.save_model(qmodel, "w4a4.pt")
    again = ptqflow.load_model("w4a4.pt", "resnet20")  # the FP architecture: a name or an nn.Module
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ptqflow.atomic import atomic_save_torch, atomic_write_bytes
from ptqflow.errors import ConfigError, ExportError, ModelError
from ptqflow.evaluate import accuracy
from ptqflow.export import ExportConfig, beyond_thresholds, compare_logits, export_onnx, onnx_session_logits
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.integer import IntegerModel
from ptqflow.models import build_model
from ptqflow.quant.model import (
    QuantConfig,
    QuantModel,
    build_quant_model,
    calibrate_activations,
    load_quant_file,
    quant_payload,
)
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units

__all__ = ["Data", "evaluate_model", "export_model", "load_model", "quantize", "save_model"]

#: Inputs, or ``(inputs, labels)``: one tensor pair, or an iterable of batches (a DataLoader).
Data = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Iterable[torch.Tensor | tuple[torch.Tensor, ...]]
Method = Literal["rtn", "qdrop", "brecq"]


def _batches(data: Data, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(inputs, labels or None)`` batches from a tensor, a tensor pair or an iterable of batches."""
    if isinstance(data, torch.Tensor):
        data = (data, None)  # type: ignore[assignment]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        inputs: torch.Tensor = data[0]
        labels = data[1] if isinstance(data[1], torch.Tensor) else None
        for start in range(0, len(inputs), batch_size):
            yield inputs[start : start + batch_size], None if labels is None else labels[start : start + batch_size]
        return
    for item in data:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, list | tuple) and item and isinstance(item[0], torch.Tensor):
            second = item[1] if len(item) > 1 else None
            yield item[0], second if isinstance(second, torch.Tensor) else None
        else:
            raise ConfigError(f"data must yield tensors or (inputs, labels) pairs, got {type(item).__name__}")


def _inputs(data: Data) -> torch.Tensor:
    parts = [x.detach().float().cpu() for x, _ in _batches(data, 1 << 30)]
    if not parts:
        raise ConfigError("calibration data is empty")
    if parts[0].dim() < 2:
        raise ConfigError(f"calibration inputs must be batched (N, ...), got shape {tuple(parts[0].shape)}")
    return torch.cat(parts)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is 'cuda' but no CUDA device is available; allowed: None (auto), 'cpu', 'cuda'")
    return chosen


def _write_store(fp: nn.Module, x: torch.Tensor, path: Path, float_leaves: tuple[str, ...], device: torch.device,
                 batch_size: int) -> FeatureStore:  # fmt: skip
    """The features stage's store (float32, no gradients: the MSE objectives read none) for inputs ``x``."""
    extracted = extract_units(fold_bn(fp), float_leaves)
    units, names = [u.module.to(device) for u in extracted], [u.name for u in extracted]
    with torch.no_grad():
        probe, shapes = x[:1].to(device), []
        for unit in units:
            probe = unit(probe)
            shapes.append(tuple(probe.shape[1:]))
    chunk = min(32, len(x))
    writer = FeatureStoreWriter(path, names, tuple(x.shape[1:]), shapes, len(x), "float32", chunk, chunk * 8, False)
    labels = torch.zeros(len(x), dtype=torch.long)
    extract_features(units, _batches((x, labels), batch_size), writer, device)  # type: ignore[arg-type]
    return FeatureStore.open(path)


def quantize(
    model: nn.Module,
    calibration: Data,
    *,
    weight_bits: int = 4,
    act_bits: int = 4,
    method: Method = "qdrop",
    first_last_weight_bits: int | None = 8,
    iters: int = 20000,
    batch_size: int = 32,
    keep_prob: float = 0.5,
    reg_weight: float = 0.01,
    seed: int = 0,
    float_leaves: tuple[str, ...] = (),
    recon: ReconConfig | None = None,
    device: str | torch.device | None = None,
    name: str | None = None,
) -> QuantModel:
    """Quantize ``model`` post-training and return the quantized ``nn.Module`` (in eval mode, on ``device``).

    Args:
        model: the FP model (not modified); anything :func:`torch.fx.symbolic_trace` can trace.
        calibration: preprocessed calibration inputs ``(N, C, H, W)``, an ``(inputs, labels)`` pair or a
            DataLoader of either (labels are not needed: the objectives are MSE on unit outputs).
        weight_bits: bits of every conv/linear weight but the first and last (``first_last_weight_bits``).
        act_bits: bits of every activation a weight layer or matmul reads.
        method: ``rtn`` (round to nearest, Lp range search), ``qdrop`` or ``brecq`` (block reconstruction).
        iters: reconstruction iterations per block (the papers: 20,000); BRECQ's activation phase runs a
            quarter of them (the papers' 5,000 of 20,000).
        batch_size: calibration samples per reconstruction iteration.
        keep_prob: QDrop's probability of keeping an activation quantized (``brecq`` ignores it).
        reg_weight: lambda of AdaRound's rounding regulariser (0.01 for ResNets, 0.1 for MobileNetV2).
        seed: seeds the reconstruction's sampling and drop masks.
        float_leaves: module paths kept in float (ops the placement rules cannot quantize).
        recon: every reconstruction hyperparameter at once (overrides ``method`` ... ``reg_weight``).
        device: ``None`` picks CUDA when present.
        name: what :func:`save_model` records as the model's name (default: the class name).

    Raises:
        PtqflowError: bad bits or method, an untraceable model, an op the placement cannot quantize.
    """
    if method not in ("rtn", "qdrop", "brecq"):
        raise ConfigError(f"method must be one of 'rtn', 'qdrop', 'brecq', got {method!r}")
    chosen = _device(device)
    convention: Literal["brecq", "qdrop"] = "qdrop" if method == "qdrop" else "brecq"
    config = QuantConfig(
        weight_bits=weight_bits,
        act_bits=act_bits,
        first_last_weight_bits=first_last_weight_bits,
        convention=convention,
        float_leaves=tuple(float_leaves),
    )
    fp = copy.deepcopy(model).eval().cpu()
    x = _inputs(calibration)
    config = replace(config, calib_size=len(x))
    if method != "rtn":
        recon = recon or ReconConfig(
            method=method, iters=iters, act_iters=max(1, iters // 4), batch_size=min(batch_size, len(x)),
            keep_prob=keep_prob, reg_weight=reg_weight, seed=seed,
        )  # fmt: skip
    qmodel = build_quant_model(fp, config).to(chosen)
    with tempfile.TemporaryDirectory(prefix="ptqflow-") as tmp:
        store = _write_store(
            copy.deepcopy(fp).to(chosen), x, Path(tmp) / "store.zarr", config.float_leaves, chosen, 64
        )
        calibrate_activations(qmodel, lambda i: store.iter_inputs(i, 64, len(x)), config.p, chosen)
        if recon is not None:
            torch.manual_seed(recon.seed)
            skip = frozenset(
                i for i, kind in enumerate(qmodel.unit_kinds()) if kind == "stem" and convention == "brecq"
            )
            reconstruct(qmodel, store, [[i] for i in range(len(qmodel.names))], recon, chosen, skip=skip)
    qmodel.quant_config = config  # type: ignore[assignment]  # what save_model() records
    qmodel.model_name = name or type(model).__name__  # type: ignore[assignment]
    return qmodel.eval()


def evaluate_model(
    model: nn.Module, data: Data, *, topk: tuple[int, ...] = (1, 5), batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, float]:  # fmt: skip
    """Top-k accuracy (percent) of ``model`` on labelled ``data`` (an ``(inputs, labels)`` pair or a
    DataLoader of pairs), e.g. ``{"top1": 91.2, "top5": 99.8}``."""
    chosen = _device(device)
    model.eval().to(chosen)
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in _batches(data, batch_size):
            if y is None:
                raise ConfigError("evaluate needs labelled data: (inputs, labels) pairs")
            logits.append(model(x.to(chosen)).float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise ConfigError("evaluation data is empty")
    classes = logits[0].shape[1]
    if max(topk) > classes:
        raise ConfigError(f"topk: {max(topk)} exceeds the {classes} classes")
    return accuracy(torch.cat(logits), torch.cat(labels), tuple(sorted(topk)))


def export_model(
    model: QuantModel, path: str | Path, example: torch.Tensor, *, check: Data | None = None, opset: int = 21,
    max_top1_diff: float = 0.1, min_agreement: float = 99.5,
) -> dict[str, float]:  # fmt: skip
    """Write ``model`` as QDQ ONNX to ``path`` and, with labelled ``check`` data, check it the way the
    ``export`` stage does, the thresholds applying to both: the graph node by node in onnxruntime against the
    fake-quant model, and onnxruntime's fused integer kernels (``fused_*``) against ptqflow's integer-exact
    simulation (:class:`ptqflow.integer.IntegerModel`; its top-1 is ``top1_int``).

    Raises:
        ExportError: onnx/onnxruntime missing, an invalid graph, or a check beyond the thresholds (nothing
            is written then).
    """
    onnx_bytes, _ = export_onnx(model, example[:1], ExportConfig(opset=opset))
    result: dict[str, float] = {}
    if check is not None:
        pairs = [(x.float().cpu(), y) for x, y in _batches(check, 256)]
        if any(y is None for _, y in pairs):
            raise ConfigError("export check needs labelled data: (inputs, labels) pairs")
        labels = torch.cat([y for _, y in pairs])  # type: ignore[misc]
        integer = IntegerModel(model.eval().cpu())
        with torch.inference_mode():
            reference = torch.cat([model(x).float() for x, _ in pairs])
            exact = torch.cat([integer(x).float() for x, _ in pairs])
        inputs = [x for x, _ in pairs]
        result = compare_logits(reference, onnx_session_logits(onnx_bytes, inputs, optimize=False), labels)
        fused = compare_logits(exact, onnx_session_logits(onnx_bytes, inputs, optimize=True), labels)
        result.update({f"fused_{k}": fused[k] for k in ("top1_onnx", "agreement", "max_abs_logit_diff")})
        result["top1_int"] = fused["top1_torch"]
        for what, res in (("node by node vs PyTorch", result), ("fused vs integer-exact", fused)):
            failure = beyond_thresholds(res, max_top1_diff, min_agreement)
            if failure is not None:
                raise ExportError(
                    f"onnxruntime ({what}) disagrees: {failure} "
                    f"(max_top1_diff={max_top1_diff}, min_agreement={min_agreement})"
                )
    atomic_write_bytes(Path(path), onnx_bytes)
    return result


def save_model(model: QuantModel, path: str | Path) -> None:
    """Write a model :func:`quantize` returned (recipe, bits and state; ``weights_only``-loadable)."""
    config, name = getattr(model, "quant_config", None), getattr(model, "model_name", None)
    if not isinstance(model, QuantModel) or not isinstance(config, QuantConfig) or not isinstance(name, str):
        raise ModelError(f"save_model() takes a model returned by ptqflow.quantize, got {type(model).__name__}")
    atomic_save_torch(quant_payload(model, name, config), Path(path))


def load_model(path: str | Path, architecture: str | nn.Module) -> QuantModel:
    """Read a file :func:`save_model` (or a pipeline stage) wrote, never unpickling (``weights_only=True``).

    Args:
        path: the file.
        architecture: the FP model it was made from: a model name (``resnet20``, ``torchvision.resnet18``,
            ``package.module:factory``) or an ``nn.Module`` of that architecture (its weights are replaced).
    """

    def build(_: str) -> nn.Module:
        return build_model(architecture) if isinstance(architecture, str) else copy.deepcopy(architecture)

    model, name, config = load_quant_file(Path(path), build)
    model.quant_config = config  # type: ignore[assignment]
    model.model_name = name  # type: ignore[assignment]
    return model
