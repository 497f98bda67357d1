"""Stage ``evaluate``: metrics and plots from the logits ``predict`` wrote (cheap: no model is run).

Writes ``metrics/evaluate.json`` (stable keys: ``samples``, ``fp``, then ``<method>.<config>`` with
``top1``, ``top5`` (per ``evaluate.topk``), ``top1_int`` (the integer-exact top-1: what an integer runtime
computes, :mod:`ptqflow.integer`), ``size_mb``, ``weight_bits``, ``act_bits``) and
``plots/evaluate/models.tsv`` (one row per model: the accuracy-vs-size scatter of ``dvc plots``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ptqflow.errors import ConfigError, DataError
from ptqflow.evaluate import accuracy
from stages.params import section
from stages.predict import LOGITS, MODELS

#: Columns of plots/evaluate/models.tsv.
PLOT_COLUMNS = ("model", "method", "config", "weight_bits", "act_bits", "size_mb", "top1", "label")


@dataclass(frozen=True)
class EvaluateConfig:
    """Args:
    topk: the top-k accuracies to report (``top1`` is always among them: plots and tables use it).
    """

    topk: tuple[int, ...] = (1, 5)

    def __post_init__(self) -> None:
        if 1 not in self.topk or any(k < 1 for k in self.topk) or len(set(self.topk)) != len(self.topk):
            raise ConfigError(f"topk must be distinct integers >= 1 including 1, e.g. [1, 5], got {list(self.topk)}")


def _load(
    predictions: Path,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    try:
        payload = torch.load(predictions / LOGITS, map_location="cpu", weights_only=True)
        models = json.loads((predictions / MODELS).read_text())
        labels, logits, integer = payload["labels"], payload["logits"], payload["logits_int"]
    except Exception as exc:  # missing or corrupt files
        raise DataError(
            f"{predictions} is not a valid predict output ({type(exc).__name__}); rerun dvc repro predict"
        ) from None
    if set(logits) != set(models) or "fp" not in logits or set(integer) != set(logits) - {"fp"}:
        raise DataError(f"{predictions}: {LOGITS} and {MODELS} disagree; rerun dvc repro predict")
    return labels, logits, integer, models


def run(params: dict[str, Any], predictions: Path, out: Path, plots: Path) -> dict[str, Any]:
    """Write ``out`` (metrics JSON) and ``plots/models.tsv``; return the metrics.

    Args:
        params: loaded params.
        predictions: the folder ``predict`` wrote.
        out: the metrics JSON.
        plots: folder of the plot tables.
    """
    config = section(params, "evaluate", EvaluateConfig)
    labels, logits, integer, models = _load(predictions)
    classes = next(iter(logits.values())).shape[1]
    if max(config.topk) > classes:
        raise ConfigError(f"evaluate.topk: {max(config.topk)} exceeds the {classes} classes")
    topk = tuple(sorted(config.topk))
    metrics: dict[str, Any] = {"samples": len(labels)}
    rows = ["\t".join(PLOT_COLUMNS)]
    for key in ["fp", *sorted(k for k in logits if k != "fp")]:
        entry = {**accuracy(logits[key], labels, topk), **models[key]}
        if key in integer:  # integer-exact (the deployed runtime's arithmetic), beside the fake-quant top-1
            entry["top1_int"] = accuracy(integer[key], labels, (1,))["top1"]
        method, _, name = key.partition("/")
        if name:
            metrics.setdefault(method, {})[name] = entry
        else:
            metrics[method] = {k: v for k, v in entry.items() if not k.endswith("_bits")}
        fields = (key.replace("/", " "), method, name or "fp32", entry["weight_bits"], entry["act_bits"])
        label = f"{fields[0]} {entry['top1']}"  # named beside its point by the labelled template
        rows.append("\t".join(str(v) for v in (*fields, entry["size_mb"], entry["top1"], label)))
    atomic_write_json(out, metrics)
    with atomic_dir(plots) as tmp:
        atomic_write_text(tmp / "models.tsv", "\n".join(rows) + "\n")
    return metrics
