"""Stage ``sensitivity``: BRECQ's per-unit bit-assignment loss tables and MRECG's module capacity.

Reads the FP feature store (never recomputing the FP model) and the round-to-nearest models of
``quantize``. Writes ``data/sensitivity/tables.json`` (layer facts and loss tables, read by ``search``),
``data/sensitivity/modcap.json`` (ModCap of every ``quantize.bits`` entry in both forms and their
differentials, read by ``plan``) -- two files, so a change that moves only one reruns only its reader --
and the DVC plots table ``plots/sensitivity/units.tsv`` (each unit's loss with its layers at each
candidate bit-width). The ModCap curve is plotted by ``plan``, for the configuration it uses.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ptqflow.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ptqflow.errors import ModelError
from ptqflow.features import FeatureStore
from ptqflow.models import build_model
from ptqflow.quant.model import load_quant_file
from ptqflow.sensitivity import (
    SensitivityConfig,
    capacity_differentials,
    layer_infos,
    modcap_data_dependent,
    modcap_data_free,
    stage_boundaries,
    unit_sensitivities,
)
from stages.common import progress_bar, require_grads, resolve_device
from stages.params import BaseConfig, section

FORMAT = {"format": "ptqflow-sensitivity", "version": 1}


def run(params: dict[str, Any], features: Path, rtn_dir: Path, out: Path, plots: Path) -> dict[str, Any]:
    """Measure and write ``out/tables.json``, ``out/modcap.json`` and the plots tables; return both documents."""
    base = section(params, "base", BaseConfig)
    config = section(params, "sensitivity", SensitivityConfig)
    device = resolve_device(base.device)
    store = FeatureStore.open(features)
    if config.metric == "fisher":
        require_grads(store, "sensitivity.metric: fisher")
    files = sorted(Path(rtn_dir).glob("*.pt"))
    if not files:
        raise ModelError(f"no round-to-nearest models (*.pt) in {rtn_dir}; rerun dvc repro quantize")
    models = {path.stem: load_quant_file(path, build_model) for path in files}
    for name, (model, _, _) in models.items():
        if model.names != store.units:
            raise ModelError(
                f"{rtn_dir}/{name}.pt has units {model.names[:3]}..., the feature store {store.units[:3]}..."
            )
    # Weight-only tables: every RTN file holds the same folded FP weights; take the first by name.
    model, model_name, qconfig = models[files[0].stem]
    example = store.unit(store.units[0]).inputs(slice(0, 1))
    infos = layer_infos(model, example, qconfig.first_last_weight_bits)
    tables = unit_sensitivities(model, store, infos, config, qconfig.p, device, progress=progress_bar)
    kinds = model.unit_kinds()
    modcap: dict[str, Any] = {}
    for name, (rtn, _, rtn_config) in models.items():
        bits = {n: q.weight_quantizer.bits for n, q in rtn.quant_layers()}
        free = modcap_data_free(infos, len(store.units), bits, config.modcap_alpha)
        dependent = modcap_data_dependent(rtn, store, config.samples, config.batch_size, device)
        modcap[name] = {
            "weight_bits": rtn_config.weight_bits,
            "act_bits": rtn_config.act_bits,
            "data_free": _round(free),
            "data_dependent": _round(dependent),
            "diff_data_free": _round(capacity_differentials(free, "data_free")),
            "diff_data_dependent": _round(capacity_differentials(dependent, "data_dependent")),
        }
    document = {
        **FORMAT,
        "model": model_name,
        "config": {**asdict(config), "candidate_bits": list(config.candidate_bits)},
        "units": store.units,
        "kinds": kinds,
        "layers": [asdict(i) for i in infos],
        "tables": [t.to_json() for t in tables],
    }
    shapes = [store.meta["output_shapes"][u] for u in store.units]
    capacity = {
        **FORMAT,
        "model": model_name,
        "units": store.units,
        "kinds": kinds,
        "modcap": modcap,
        "diff_stage_boundary": stage_boundaries(shapes),
    }
    with atomic_dir(out) as tmp_out, atomic_dir(plots) as tmp_plots:
        atomic_write_json(tmp_out / "tables.json", document)
        atomic_write_json(tmp_out / "modcap.json", capacity)
        atomic_write_text(tmp_plots / "units.tsv", _units_tsv(store.units, tables, config.candidate_bits))
    return {**document, "modcap": modcap}


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.9g}") for v in values]


def _units_tsv(units: list[str], tables: list[Any], candidates: tuple[int, ...]) -> str:
    """One row per unit with searchable layers: its loss with all of them at each candidate bit-width."""
    lines = ["\t".join(["position", "unit", *(f"loss_w{b}" for b in candidates)])]
    for table in tables:
        measured = dict(table.measured)
        losses = [measured.get(tuple(b for _ in table.layers), float("nan")) for b in candidates]
        lines.append("\t".join([str(units.index(table.unit)), table.unit, *(f"{v:.9g}" for v in losses)]))
    return "\n".join(lines) + "\n"
