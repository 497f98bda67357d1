"""Stage ``reconstruct``: BRECQ or QDrop block reconstruction of the RTN models named in
``reconstruct.targets``, streaming FP activations from the feature store.

After each step the whole quantized state is written atomically to a resume folder keyed by the inputs
and params (``<out>.resume/<target>-<key>/``, outside the DVC output so DVC does not delete it); a killed
run restarts at the first unfinished step and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ptqflow.atomic import atomic_dir, atomic_save_torch, atomic_write_text, safe_load_failure
from ptqflow.errors import ConfigError, ModelError
from ptqflow.features import FeatureStore
from ptqflow.fold import BNStatistics, bn_statistics
from ptqflow.models import build_model
from ptqflow.quant.model import QuantModel, load_quant_file, quant_payload
from ptqflow.recon.reconstruct import ReconConfig, Step, reconstruct
from stages.common import free_bytes, load_fp_model, require_grads, resolve_device, unit_progress
from stages.params import BaseConfig, section

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructConfig(ReconConfig):
    """``reconstruct.*``: every :class:`ptqflow.recon.reconstruct.ReconConfig` key, plus:

    Args:
        targets: names of ``quantize.bits`` entries whose RTN models are reconstructed.
        granularity: ``block`` (one unit per block, BRECQ's choice; adjacent units merged as a plan file
            (``--plan``, e.g. MRECG's) says), ``stage`` (blocks of one stage together) or ``net``
            (everything at once) or ``layer`` (each conv/linear on its own, inside each block: BRECQ's
            layer-wise baseline); the plan is used with ``block`` only.
    """

    targets: tuple[str, ...] = field(default=("w2a4",))
    granularity: Literal["layer", "block", "stage", "net"] = "block"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets:
            raise ConfigError("targets must name at least one quantize.bits entry, e.g. [w2a4]")

    def recon(self) -> ReconConfig:
        """The library config (every field but the stage's own)."""
        values = {k: v for k, v in asdict(self).items() if k not in ("targets", "granularity")}
        return ReconConfig(**values)


def unit_groups(names: list[str], granularity: str, plan: list[list[str]] | None) -> list[list[int]]:
    """Unit indices per reconstruction group: the plan's groups (``block``), or by the granularity."""
    if plan is not None and granularity == "block":
        flat = [n for group in plan for n in group]
        if flat != names:
            raise ModelError(f"unit plan does not match the model: it lists {flat}, the model's units are {names}")
        index = {n: i for i, n in enumerate(names)}
        return [[index[n] for n in group] for group in plan]
    if granularity == "net":
        return [list(range(len(names)))]
    if granularity in ("block", "layer"):
        return [[i] for i in range(len(names))]
    groups: list[list[int]] = []
    previous = None
    for i, name in enumerate(names):
        stage = name.rsplit(".", 1)[0] if "." in name else name
        if groups and stage == previous:
            groups[-1].append(i)
        else:
            groups.append([i])
        previous = stage
    return groups


def read_plan(path: Path) -> list[list[str]]:
    """A plan file: JSON ``{"groups": [["layer1.0", "layer1.1"], ...]}``."""
    try:
        groups = json.loads(Path(path).read_text())["groups"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"unit plan {path} is not a JSON file with a 'groups' list ({type(exc).__name__})") from None
    if not (isinstance(groups, list) and all(isinstance(g, list) and g for g in groups)):
        raise ModelError(f"unit plan {path}: 'groups' must be a list of non-empty lists of unit names")
    return [[str(n) for n in g] for g in groups]


def _resume_key(
    config: ReconstructConfig, target: str, rtn: Path, store: FeatureStore, groups: list[list[int]]
) -> str:
    h = hashlib.sha256()
    key = {"config": asdict(config.recon()), "groups": groups, "granularity": config.granularity}
    h.update(json.dumps(key, sort_keys=True).encode())
    h.update(rtn.read_bytes())
    h.update(json.dumps(store.meta["checksums"], sort_keys=True).encode())
    return f"{target}-{h.hexdigest()[:16]}"


def _load_resume_state(model: QuantModel, state_file: Path) -> tuple[int, list[dict[str, Any]]]:
    """Load a resume checkpoint into ``model`` (``weights_only``); return the next step and the rows so far.

    Raises:
        ModelError: the file needs unpickling, is damaged, or does not fit the model (names the folder to
            delete; the resume folder is a cache, deleting it only costs the finished steps).
    """
    try:
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"], strict=True)
        start = int(saved["next_step"])
        rows = json.loads(str(saved["rows"]))
        if not isinstance(rows, list):
            raise TypeError("rows is not a list")
    except Exception as exc:  # pickle payload, torn or foreign file, wrong keys or shapes
        raise ModelError(
            f"resume state {state_file} cannot be loaded safely (weights_only=True): "
            f"{safe_load_failure(state_file, exc)}; "
            f"delete {state_file.parent} to start that target afresh"
        ) from None
    return start, rows


def _reconstruct_one(
    model: QuantModel,
    store: FeatureStore,
    groups: list[list[int]],
    config: ReconConfig,
    device: torch.device,
    resume_dir: Path,
    convention: str,
    layerwise: bool,
    progress: Callable[[int, str], Callable[[int, float], None]],
    memory: str,
    scratch: Path,
    bn_stats: dict[str, BNStatistics] | None,
) -> list[dict[str, Any]]:
    start = 0
    state_file = resume_dir / "state.pt"
    rows: list[dict[str, Any]] = []
    if state_file.is_file():
        start, rows = _load_resume_state(model, state_file)
        log.info("resuming at step %d from %s", start, state_file)

    def checkpoint(index: int, step: Step, row: dict[str, float]) -> None:
        rows.append(
            {
                "step": index,
                "phase": step.phase,
                "unit": "+".join(store.units[i] for i in step.group),
                "loss_before": round(row["loss_before"], 8),
                "loss_after": round(row["loss_after"], 8),
                "seconds": round(row["seconds"], 3),
                "iter_ms": round(row["iter_ms"], 2),
                "iters": int(row["iters"]),
                **{k: row[k] for k in ("peak_rss_mb", "peak_device_mb") if k in row},
            }
        )
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_save_torch({"state_dict": state, "next_step": index + 1, "rows": json.dumps(rows)}, state_file)

    skip = frozenset(i for i, kind in enumerate(model.unit_kinds()) if kind == "stem" and convention == "brecq")
    reconstruct(
        model,
        store,
        groups,
        config,
        device,
        start=start,
        skip=skip,
        layerwise=layerwise,
        memory=memory,
        scratch=scratch if memory == "stream" else None,
        on_step_done=checkpoint,
        progress=progress,
        bn_stats=bn_stats,
    )
    return rows


def _check_scratch_space(store: FeatureStore, scratch: Path, fisher: bool) -> None:
    """``stream`` spills up to five tensors of the largest unit (old and new quantized-prefix input, FP
    input, target, gradient) as float32: stop before any work when the disk cannot hold them."""
    sizes = [math.prod(store.meta["input_shape"])] + [math.prod(s) for s in store.meta["output_shapes"].values()]
    need = store.num_samples * 4 * max(sizes) * (5 if fisher else 4)
    free = free_bytes(scratch)
    if need > free:
        raise ConfigError(
            f"base.memory: stream needs up to {need / 1e9:.1f} GB of scratch space in {scratch}, "
            f"{free / 1e9:.1f} GB are free; free space or use base.memory: cpu"
        )


def run(
    params: dict[str, Any],
    features: Path,
    rtn_dirs: Sequence[Path],
    out: Path,
    plots: Path,
    plan_path: Path | None,
    timing: Path | None = None,
) -> list[str]:
    """Reconstruct every target; write ``out/<target>.pt`` and ``plots/<target>.tsv``.

    Args:
        params: loaded params.
        features: the FP feature store.
        rtn_dirs: folders of starting models (``quantize``'s uniform ones, ``select``'s mixed one); a
            target names a file in one of them.
        out: folder of reconstructed models.
        plots: folder of per-unit loss tables.
        plan_path: optional unit plan (``plan`` stage), used with ``granularity: block``.
        timing: optional folder for per-step wall seconds (``<target>.tsv``, DVC plots data); seconds
            differ between identical runs, so it is kept apart from the byte-identical outputs.
    """
    base = section(params, "base", BaseConfig)
    config = section(params, "reconstruct", ReconstructConfig)
    device = resolve_device(base.device)
    store = FeatureStore.open(features)
    if config.loss == "fisher":
        require_grads(store, "reconstruct.loss: fisher")
    plan = read_plan(plan_path) if plan_path is not None else None
    sources = {p.stem: p for folder in rtn_dirs for p in sorted(Path(folder).glob("*.pt"))}
    for target in config.targets:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", target) or target not in sources:
            raise ConfigError(
                f"reconstruct.targets: {target!r} is not a quantize.bits entry or selected model; "
                f"allowed: {sorted(sources)}"
            )
    # PD-Quant's distribution correction reads the FP model's BatchNorm statistics (folding drops them).
    bn_stats = bn_statistics(load_fp_model(base)) if config.dc_iters > 0 else None
    resume_root = out.parent / f"{out.name}.resume"
    scratch = out.parent / f"{out.name}.scratch"  # base.memory: stream's spill files, removed at the end
    if base.memory == "stream":
        _check_scratch_space(store, scratch, fisher=config.loss == "fisher")
    with contextlib.ExitStack() as stack:
        if base.memory == "stream":
            shutil.rmtree(scratch, ignore_errors=True)  # a killed run's leftovers
            scratch.mkdir(parents=True)
            stack.callback(shutil.rmtree, scratch, True)
        tmp_out = stack.enter_context(atomic_dir(out))
        tmp_plots = stack.enter_context(atomic_dir(plots))
        tmp_timing = stack.enter_context(atomic_dir(timing)) if timing is not None else None
        for target in config.targets:
            rtn = sources[target]
            model, model_name, qconfig = load_quant_file(rtn, build_model)
            if model.names != store.units:
                raise ModelError(f"{rtn} has units {model.names[:3]}..., the feature store {store.units[:3]}...")
            if bn_stats is not None and model_name != base.model:
                raise ConfigError(f"base.model: {base.model!r}, but {rtn} quantizes {model_name!r}")
            groups = unit_groups(model.names, config.granularity, plan)
            resume_dir = resume_root / _resume_key(config, target, rtn, store, groups)
            torch.manual_seed(config.seed)
            rows = _reconstruct_one(
                model,
                store,
                groups,
                config.recon(),
                device,
                resume_dir,
                qconfig.convention,
                config.granularity == "layer",
                unit_progress(base.threads),
                base.memory,
                scratch,
                bn_stats,
            )
            atomic_save_torch(quant_payload(model.cpu(), model_name, qconfig), tmp_out / f"{target}.pt")
            header = "step\tphase\tunit\tloss_before\tloss_after\n"
            lines = "".join(
                f"{r['step']}\t{r['phase']}\t{r['unit']}\t{r['loss_before']}\t{r['loss_after']}\n" for r in rows
            )
            atomic_write_text(tmp_plots / f"{target}.tsv", header + lines)
            if tmp_timing is not None:  # a resumed run keeps the seconds of the steps it did not redo
                keys = ("step", "phase", "unit", "seconds", "iter_ms", "iters", "peak_rss_mb")
                seconds = "".join("\t".join(str(r.get(k, "")) for k in keys) + "\n" for r in rows)
                atomic_write_text(tmp_timing / f"{target}.tsv", "\t".join(keys) + "\n" + seconds)
    shutil.rmtree(resume_root, ignore_errors=True)
    return list(config.targets)
