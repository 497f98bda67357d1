"""Stage ``select``: pick the bit configuration for a budget from the stored Pareto front.

Reads ``data/search/front.json`` and the round-to-nearest model ``quantize.bits[select.base]`` (whose
activation bits and ranges the mixed model keeps); writes ``data/select/<select.name>.pt`` -- that model
with the selected weight bits per layer, weight ranges searched again for the new bits -- and
``data/select/selection.json``. Only this stage and its successors rerun when the budget changes.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_json, atomic_write_text
from ptqflow.errors import ConfigError, ModelError
from ptqflow.models import build_model
from ptqflow.quant.model import load_quant_file, quant_payload, set_weight_bits
from ptqflow.search import BUDGET_KINDS, select
from stages.params import section
from stages.search import FRONT_COLUMNS, front_row


@dataclass(frozen=True)
class Budget:
    """Args:
    kind: ``size_mb`` (MiB, as evaluate reports it), ``avg_bits`` (parameter-weighted mean weight bits of
        the searched layers; 3.0 = the size of uniform 3-bit weights) or ``bitops`` (10^9 per image).
    value: the budget; the least-sensitive front point at or below it is chosen.
    """

    kind: Literal["size_mb", "avg_bits", "bitops"] = "avg_bits"
    value: float = 3.0

    def __post_init__(self) -> None:
        if self.value <= 0:
            raise ConfigError(f"value must be > 0, got {self.value}")


@dataclass(frozen=True)
class SelectConfig:
    """Args:
    base: the ``quantize.bits`` entry whose activation bits and ranges the mixed model starts from.
    budget: the size or BitOPs budget.
    name: file name of the selected model (``reconstruct.targets`` can name it).
    """

    base: str = "w4a4"
    budget: Budget = field(default_factory=Budget)
    name: str = "mp"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ConfigError(f"name may hold letters, digits, '_' and '-' only, got {self.name!r}")


#: The selected point's table in the select stage's plots folder.
SELECTED_PLOT = "selected.tsv"


def run(
    params: dict[str, Any], front_path: Path, rtn_dir: Path, out: Path, plots: Path | None = None
) -> dict[str, Any]:
    """Select, build and write the mixed-precision model; return the selection record.

    ``plots/selected.tsv`` (when given) is the chosen front point as one labelled row, drawn over the search's
    fronts by the pipeline's display plots.
    """
    config = section(params, "select", SelectConfig)
    try:
        document = json.loads(Path(front_path).read_text())
        fronts = document["fronts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{front_path} is not a search front ({type(exc).__name__}); rerun dvc repro search"
        ) from None
    cost = BUDGET_KINDS[config.budget.kind]
    if cost not in fronts:
        raise ConfigError(
            f"select.budget.kind {config.budget.kind!r} needs the {cost!r} front; add it to search.costs "
            f"(searched: {', '.join(fronts)})"
        )
    try:
        point = select(fronts[cost], config.budget.kind, config.budget.value)
    except ConfigError as exc:
        raise ConfigError(f"select.{exc}") from None
    rtn = Path(rtn_dir) / f"{config.base}.pt"
    if not rtn.is_file():
        available = sorted(p.stem for p in Path(rtn_dir).glob("*.pt"))
        raise ConfigError(f"select.base: {config.base!r} is not a quantize.bits entry; allowed: {available}")
    model, model_name, qconfig = load_quant_file(rtn, build_model)
    if model_name != document.get("model"):
        raise ModelError(f"{front_path} was searched for {document.get('model')}, {rtn} is {model_name}")
    set_weight_bits(model, point["bits"], qconfig.p)
    record = {
        "base": config.base,
        "budget": {"kind": config.budget.kind, "value": config.budget.value},
        "front": cost,
        **{k: point[k] for k in ("sensitivity", "size_mb", "avg_bits", "bitops", "bits")},
    }
    label = f"selected: {config.name} ({config.budget.kind} <= {config.budget.value:g})"
    table = "\t".join((*FRONT_COLUMNS, "selected", "label")) + f"\n{front_row(point)}\t1\t{label}\n"
    with atomic_dir(out) as tmp, atomic_dir(plots) if plots is not None else nullcontext() as tmp_plots:
        atomic_save_torch(quant_payload(model, model_name, qconfig), tmp / f"{config.name}.pt")
        atomic_write_json(tmp / "selection.json", record)
        if tmp_plots is not None:
            atomic_write_text(tmp_plots / SELECTED_PLOT, table)
    return record
