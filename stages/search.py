"""Stage ``search``: mixed-precision search (exact or NSGA-II); stores the whole Pareto front of every cost.

Reads ``data/sensitivity/tables.json``; writes ``data/search/front.json`` (one front per cost in
``search.costs``, each point with its bits per layer) and, for ``dvc plots show``, one table per front:
``plots/search/front.tsv`` (the size front) and ``plots/search/front_bitops.tsv`` (size, average bits,
BitOPs and summed sensitivity of every point).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ptqflow.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ptqflow.errors import ConfigError, ModelError
from ptqflow.quant.quantizer import check_bits
from ptqflow.search import BitSpace, SearchConfig, pareto_front
from ptqflow.sensitivity import LayerInfo, UnitSensitivity
from stages.params import section

FORMAT = {"format": "ptqflow-front", "version": 1}


@dataclass(frozen=True)
class SearchStageConfig(SearchConfig):
    """``search.*``: the :class:`ptqflow.search.SearchConfig` keys, plus:

    Args:
        act_bits: activation bits the BitOPs cost assumes for every layer input but the image.
    """

    act_bits: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_bits(self.act_bits, "act_bits")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def library(self) -> SearchConfig:
        """The library config."""
        return SearchConfig(**{f.name: getattr(self, f.name) for f in fields(SearchConfig)})


def load_space(path: Path, act_bits: int) -> tuple[BitSpace, dict[str, Any]]:
    """The search space of a loss-tables document (``tables.json``, written by the sensitivity stage)."""
    try:
        document = json.loads(Path(path).read_text())
        infos = [LayerInfo(**layer) for layer in document["layers"]]
        tables = [UnitSensitivity.from_json(t) for t in document["tables"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{path} is not a sensitivity tables file ({type(exc).__name__}); rerun dvc repro sensitivity"
        ) from None
    return BitSpace(infos, tables, act_bits), document


#: Columns of the front tables (``plots/search/front*.tsv``; ``select`` writes its point the same way).
FRONT_COLUMNS = ("size_mb", "avg_bits", "bitops", "sensitivity")


def front_row(point: dict[str, Any]) -> str:
    """One front point as a row of :data:`FRONT_COLUMNS` (tab-separated, Python's float repr)."""
    return "\t".join(str(point[c]) for c in FRONT_COLUMNS)


def run(params: dict[str, Any], tables: Path, out: Path, plots: Path) -> dict[str, Any]:
    """Search every configured cost; write ``out/front.json`` and ``plots/front.tsv``."""
    config = section(params, "search", SearchStageConfig)
    space, document = load_space(tables, config.act_bits)
    fronts = {cost: pareto_front(space, cost, config.library()) for cost in config.costs}
    result = {
        **FORMAT,
        "model": document["model"],
        "config": {**asdict(config), "costs": list(config.costs)},
        "candidate_bits": list(space.candidates),
        "layers": [g.name for g in space.genes],
        "fronts": fronts,
    }
    with atomic_dir(out) as tmp_out, atomic_dir(plots) as tmp_plots:
        atomic_write_json(tmp_out / "front.json", result)
        for cost in ("size", "bitops"):  # both files always exist (DVC outputs); a cost not searched is empty
            lines = ["\t".join(FRONT_COLUMNS)] + [front_row(p) for p in fronts.get(cost, [])]
            name = "front.tsv" if cost == "size" else f"front_{cost}.tsv"
            atomic_write_text(tmp_plots / name, "\n".join(lines) + "\n")
    return result
