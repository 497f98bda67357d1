"""Stage ``check``: every params section and every input file checked before any other stage runs.

DVC removes a stage's outputs just before it runs the stage's command, so an error that the stage itself
finds (a mistyped key, bits the quantizer does not have, a missing weights file) used to cost the outputs
already there: the feature store, the reconstructed models, the tracked metrics. This stage is the first of
every pipeline (``prepare`` depends on its output), declares every params section the pipeline uses, and
does only cheap work: it parses each section with the same frozen config classes the stages use, checks
what the sections say about each other, reads the dataset's headers (not its images), loads the weights
into the model, traces it into units and places the quantizers once. A failure is one line and exit 2,
and no other stage has been touched; what is merely suspicious (more classes in the model's head than in
the data, a calibration subset smaller than a stage asks for) is logged as a warning.

Its output (``check.json``: the sections it checked) does not depend on the values of those sections, so
when the check passes, DVC reruns only what a changed value feeds.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ptqflow.atomic import atomic_dir, atomic_write_json
from ptqflow.data import fashion_mnist_counts
from ptqflow.errors import ConfigError, ModelError
from ptqflow.imagefolder import image_folder_classes
from ptqflow.quant.model import build_quant_model
from ptqflow.search import BUDGET_KINDS
from ptqflow.sensitivity import SensitivityConfig
from stages.common import load_fp_model, resolve_device
from stages.evaluate import EvaluateConfig
from stages.export import ExportStageConfig
from stages.features import FeaturesConfig
from stages.params import BaseConfig, section
from stages.plan import PlanConfig
from stages.predict import PredictConfig
from stages.prepare import PrepareConfig
from stages.quantize import QuantizeConfig
from stages.reconstruct import ReconstructConfig
from stages.search import SearchStageConfig
from stages.select import SelectConfig
from stages.template import STAGES, code_fingerprint, entry_point_origin

log = logging.getLogger("ptqflow")

#: The sections a pipeline's stages read, each with the config class its stage parses it into.
CONFIGS: dict[str, type] = {
    "base": BaseConfig,
    "prepare": PrepareConfig,
    "features": FeaturesConfig,
    "quantize": QuantizeConfig,
    "sensitivity": SensitivityConfig,
    "search": SearchStageConfig,
    "select": SelectConfig,
    "plan": PlanConfig,
    "reconstruct": ReconstructConfig,
    "predict": PredictConfig,
    "evaluate": EvaluateConfig,
    "export": ExportStageConfig,
}


def run(params: dict[str, Any], out: Path | None = None, code: bool = False) -> list[str]:
    """Check ``params`` and the files they name; write ``out/check.json`` when ``out`` is given.

    Args:
        code: also write ``out/code/<stage>.json`` for every stage: the installed layout's code dependencies
            (:func:`stages.template.code_fingerprint`; ``ptqflow init`` pipelines).

    Returns:
        The warnings (also logged).

    Raises:
        PtqflowError: the first problem found, as the stage that would meet it words it.
    """
    wanted = [name for name in CONFIGS if name in params or name == "base"]
    configs: dict[str, Any] = {name: section(params, name, CONFIGS[name]) for name in wanted}
    warnings: list[str] = []
    _cross_check(configs, warnings)
    classes = _check_dataset(configs)
    _check_model(configs, classes, warnings)
    for message in warnings:
        log.warning("%s", message)
    if out is not None:
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "check.json", {"sections": sorted(configs)})
            if code:
                (tmp / "code").mkdir()
                model = configs["base"].model
                for name in STAGES:
                    if name != "check":
                        atomic_write_json(tmp / "code" / f"{name}.json", code_fingerprint(name, model, Path.cwd()))
    return warnings


def _cross_check(configs: dict[str, Any], warnings: list[str]) -> None:
    """What one section says about another: names of bit pairs, fronts, gradients, sample counts."""
    base: BaseConfig = configs["base"]
    resolve_device(base.device)
    quantize: QuantizeConfig | None = configs.get("quantize")
    bits = sorted(quantize.bits) if quantize is not None else []
    select: SelectConfig | None = configs.get("select")
    recon: ReconstructConfig | None = configs.get("reconstruct")
    if quantize is not None and select is not None and select.base not in quantize.bits:
        raise ConfigError(f"select.base: {select.base!r} is not a quantize.bits entry; allowed: {bits}")
    if select is not None and "search" in configs:
        cost = BUDGET_KINDS[select.budget.kind]
        if cost not in configs["search"].costs:
            raise ConfigError(
                f"select.budget.kind {select.budget.kind!r} needs the {cost!r} front; add it to search.costs "
                f"(searched: {', '.join(configs['search'].costs)})"
            )
    if recon is not None and quantize is not None:
        allowed = sorted({*bits, *([select.name] if select is not None else [])})
        for target in recon.targets:
            if target not in allowed:
                raise ConfigError(
                    f"reconstruct.targets: {target!r} is not a quantize.bits entry or selected model; "
                    f"allowed: {allowed}"
                )
    plan: PlanConfig | None = configs.get("plan")
    if plan is not None and quantize is not None and plan.reference not in quantize.bits:
        raise ConfigError(f"plan.reference: {plan.reference!r} is not a quantize.bits entry; allowed: {bits}")
    features: FeaturesConfig | None = configs.get("features")
    if features is not None and not features.grads:
        readers = {
            "reconstruct.loss": recon.loss if recon is not None else None,
            "sensitivity.metric": configs["sensitivity"].metric if "sensitivity" in configs else None,
        }
        for key, value in readers.items():
            if value == "fisher":
                raise ConfigError(
                    f"{key}: fisher needs the FP output gradients, and features.grads is false: "
                    "set features.grads: true, or use mse"
                )
    if "export" in configs:
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"the export stage needs {' and '.join(missing)}, not installed: pip install 'ptqflow[export]'"
            )
    calib = configs["prepare"].calib_size if "prepare" in configs else None
    asks = [
        ("quantize.calib_size", quantize.calib_size if quantize is not None else None),
        ("sensitivity.samples", configs["sensitivity"].samples if "sensitivity" in configs else None),
        ("reconstruct.batch_size", recon.batch_size if recon is not None else None),
    ]
    if recon is not None and calib is not None and recon.holdout and calib - recon.holdout < recon.batch_size:
        raise ConfigError(
            f"reconstruct.holdout: {recon.holdout} of prepare.calib_size {calib} images held out leaves "
            f"{calib - recon.holdout} to train on, fewer than reconstruct.batch_size {recon.batch_size}"
        )
    for key, wanted in asks:
        if calib is not None and wanted is not None and wanted > calib:
            warnings.append(f"{key} is {wanted} but prepare.calib_size is {calib}: all {calib} images are used")


def _check_dataset(configs: dict[str, Any]) -> int | None:
    """The dataset exists and looks like one (headers or class folders only); return its class count."""
    prepare: PrepareConfig | None = configs.get("prepare")
    if prepare is None:
        return None
    root = Path(prepare.data_root)
    if prepare.dataset == "imagefolder":
        train, val = image_folder_classes(root, "train"), image_folder_classes(root, "val")
        if train != val:
            extra = sorted(set(train) ^ set(val))
            raise ConfigError(
                f"prepare.data_root: {root}/train and {root}/val hold different class folders "
                f"(e.g. {extra[0] if extra else 'order'}); they must match"
            )
        return len(train)
    counts = fashion_mnist_counts(root)
    if prepare.calib_size > counts["train"]:
        raise ConfigError(
            f"prepare.calib_size must be in [1, {counts['train']}] (the train split's size), got {prepare.calib_size}"
        )
    return 10


def _check_model(configs: dict[str, Any], classes: int | None, warnings: list[str]) -> None:
    """The model builds, its weights load into it, it splits into units, the quantizers can be placed,
    and its outputs fit the dataset's classes."""
    base: BaseConfig = configs["base"]
    _check_model_code(base)
    model = load_fp_model(base)
    quantize: QuantizeConfig | None = configs.get("quantize")
    if quantize is not None:
        pair = next(iter(quantize.bits.values()))
        build_quant_model(model, replace(quantize.quant_config(pair), float_leaves=base.float_leaves), False)
    if classes is None:
        return
    prepare: PrepareConfig = configs["prepare"]
    probe = torch.zeros(1, *_input_shape(prepare))
    with torch.no_grad():
        try:
            logits = int(model(probe).shape[-1])
        except Exception as exc:  # a user model may raise anything on an input of the wrong shape
            raise ModelError(
                f"base.model {base.model} fails on one {tuple(probe.shape[1:])} input of prepare.data_root: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    if logits < classes:
        raise ModelError(
            f"base.model {base.model} has {logits} outputs but {prepare.data_root} has {classes} classes; "
            "its head must have one output per class"
        )
    if logits > classes:
        warnings.append(
            f"base.model {base.model} has {logits} outputs and {prepare.data_root} has {classes} classes: labels "
            f"index the folder's sorted classes, so unless they are the first {classes} of the model's, "
            "every top-1 will be near 0 (use weights fine-tuned to these classes)"
        )
    evaluate: EvaluateConfig | None = configs.get("evaluate")
    if evaluate is not None and max(evaluate.topk) > min(logits, classes):
        raise ConfigError(f"evaluate.topk: {max(evaluate.topk)} exceeds the {min(logits, classes)} classes")


def _input_shape(prepare: PrepareConfig) -> tuple[int, ...]:
    if prepare.dataset == "imagefolder":
        return (3, prepare.image_size, prepare.image_size)
    return (1, 28, 28)


def _check_model_code(base: BaseConfig) -> None:
    """``base.model_code`` exists and, for an entry point in this project, holds the entry point's module
    (so editing the model's source reruns what it feeds)."""
    if not base.model_code:
        return  # not a checkout pipeline: the installed layout fingerprints the model's source itself
    code = Path(base.model_code)
    if not code.exists():
        raise ConfigError(
            f"base.model_code: {code} does not exist; name the file or folder holding the model's Python code"
        )
    if ":" not in base.model:
        return
    module = base.model.partition(":")[0]
    origin = entry_point_origin(base.model)
    if origin is None or not origin.is_relative_to(Path.cwd().resolve()):
        return  # an installed package: its version, not a file of this project, decides what it builds
    where = code.resolve()
    if not (origin == where or origin.is_relative_to(where)):
        shown = origin.relative_to(Path.cwd().resolve())
        raise ConfigError(
            f"base.model_code: {code} does not hold {module} ({shown}); set it to that file or its package's "
            "folder so that editing the model reruns the stages that build it"
        )
