"""Stage ``plan``: the MRECG reconstruction plan (which adjacent units are reconstructed jointly).

Reads the ModCap differentials of ``data/sensitivity/modcap.json`` for the ``quantize.bits`` entry
``plan.reference``; writes ``data/plan/plan.json`` -- ``{"groups": [[unit, ...], ...], ...}``, the file
``reconstruct --plan`` reads -- with every pair considered and why it was or was not merged.
``k: 0`` is plain block-wise reconstruction. ``plots/plan/modcap.tsv`` holds the reference's ModCap in
both forms and the differential used, along depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ptqflow.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ptqflow.errors import ConfigError, ModelError
from ptqflow.plan import mrecg_groups
from stages.params import section


@dataclass(frozen=True)
class PlanConfig:
    """Args:
    reference: the ``quantize.bits`` entry whose ModCap decides (its weight bits for the data-free
        form, its round-to-nearest errors for the data-dependent form).
    form: ``data_dependent`` (loss rise between adjacent units), ``data_free`` (capacity drop) or
        ``stage_boundary`` (pairs where the output shape changes, earliest first: the pattern decoded
        from the public MRECG code).
    k: adjacent pairs to merge; ``0`` disables MRECG.
    ratio: instead of ``k``, this fraction of the mergeable adjacent pairs (rounded); ``null`` uses ``k``.
    max_group: most units in one joint group (MRECG: 3).
    """

    reference: str = "w2a4"
    form: Literal["data_dependent", "data_free", "stage_boundary"] = "data_dependent"
    k: int = 2
    ratio: float | None = None
    max_group: int = 3

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"k must be >= 0, got {self.k}")
        if self.ratio is not None and not 0 <= self.ratio <= 1:
            raise ConfigError(f"ratio must be in [0, 1] or null, got {self.ratio}")
        if self.max_group < 2:
            raise ConfigError(f"max_group must be >= 2, got {self.max_group}")


def run(params: dict[str, Any], modcap_path: Path, out: Path, plots: Path) -> dict[str, Any]:
    """Choose the merges; write ``out/plan.json`` and ``plots/modcap.tsv``; return the plan document."""
    config = section(params, "plan", PlanConfig)
    try:
        document = json.loads(Path(modcap_path).read_text())
        units, kinds, modcap = document["units"], document["kinds"], document["modcap"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{modcap_path} is not a ModCap file ({type(exc).__name__}); rerun dvc repro sensitivity"
        ) from None
    if config.reference not in modcap:
        raise ConfigError(
            f"plan.reference: {config.reference!r} is not a quantize.bits entry; allowed: {sorted(modcap)}"
        )
    if config.form == "stage_boundary":
        differentials = document["diff_stage_boundary"]
    else:
        differentials = modcap[config.reference][f"diff_{config.form}"]
    mergeable_pairs = sum(1 for a, b in zip(kinds[:-1], kinds[1:], strict=True) if a == b == "block")
    k = config.k if config.ratio is None else round(config.ratio * mergeable_pairs)
    groups, choices = mrecg_groups(kinds, differentials, k, config.max_group)
    plan = {
        "groups": [[units[i] for i in group] for group in groups],
        "reference": config.reference,
        "form": config.form,
        "k": k,
        "choices": [
            {
                "pair": [units[c.left], units[c.left + 1]],
                "differential": c.differential,
                "merged": c.merged,
                "why": c.reason,
            }
            for c in choices
        ],
    }
    lines = ["position\tunit\tmodcap_data_free\tmodcap_data_dependent\tdifferential\tmerged_with_next"]
    reference = modcap[config.reference]
    merged_left = {c.left for c in choices if c.merged}
    for i, unit in enumerate(units):
        d = differentials[i] if i < len(differentials) else ""
        row = [i, unit, reference["data_free"][i], reference["data_dependent"][i], d, int(i in merged_left)]
        lines.append("\t".join(str(v) for v in row))
    with atomic_dir(out) as tmp_out, atomic_dir(plots) as tmp_plots:
        atomic_write_json(tmp_out / "plan.json", plan)
        atomic_write_text(tmp_plots / "modcap.tsv", "\n".join(lines) + "\n")
    return plan
