"""The one definition of the pipeline: every ``dvc.yaml`` (the root demo, the ImageNet presets, and what
``ptqflow init`` writes into a user's repository) is rendered from :data:`STAGES`.

A stage's entry says what it runs, the data it reads and writes, the params it declares and the code it
depends on. Only the code dependencies differ between the two layouts:

- ``checkout``: inside this repository, each stage depends on its modules as files (``src/ptqflow/quant``,
  ``stages/quantize.py``) relative to the pipeline's folder, and a stage that builds the model on
  ``${base.model_code}``;
- ``installed``: in a user's repository, where ptqflow is a pip-installed package, each stage depends on
  ``data/check/code/<stage>.json``, which the ``check`` stage (always run, seconds) rewrites from the
  installed package: torch's and torchvision's versions, the sha256 of exactly the modules that stage
  lists (not ptqflow's version: a release that leaves a module alone reruns nothing that reads only it),
  and, for a stage that builds the model, the model's own source (:func:`code_fingerprint`). A
  ``pip install -U ptqflow`` that changes a module reruns the stages that list it, and nothing else; an
  edit to the user's model file reruns the stages that build the model.

``python -m stages.template`` rewrites the repository's pipelines from this table; a test checks that the
committed files are what it renders.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ptqflow.errors import ConfigError

__all__ = ["PIPELINES", "STAGES", "Pipeline", "StageSpec", "code_fingerprint", "render"]

Layout = Literal["checkout", "installed"]
Dataset = Literal["fashion-mnist", "imagefolder"]

#: Where the code of each stage lives, as the repository names it.
LIB, CLI = "src/ptqflow", "stages"
#: The folder of the per-stage code fingerprints the ``check`` stage writes in the installed layout.
CODE_DIR = "data/check/code"


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline (its name is the key in :data:`STAGES`).

    Args:
        comment: a comment line above the stage.
        cmd: the command; ``{test}`` and ``{images}`` are filled in for the dataset kind, ``{select}`` /
            ``{plan}`` only when the pipeline has those stages.
        data: data dependencies (workspace paths or ``${...}``), in order.
        code: modules and packages, repository-relative (``src/ptqflow/...``, ``stages/...``).
        builds_model: the stage builds the FP model, so the model's own code is a dependency.
        params: declared params keys.
        outs, metrics, plots: as in ``dvc.yaml``.
    """

    cmd: str
    data: tuple[str, ...]
    code: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[Any, ...] = ()
    metrics: tuple[Any, ...] = ()
    plots: tuple[Any, ...] = ()
    builds_model: bool = False
    comment: str = ""


def _lib(*names: str) -> tuple[str, ...]:
    return tuple(f"{LIB}/{n}" for n in names)


#: The placement modules: a stage that traces or places quantizers reads the op tables and the attention
#: decomposition too.
_PLACE = _lib("kernels.py", "attention.py", "ops.py")
_UNCACHED = {"cache": False}
#: Custom DVC plot templates (``.dvc/plots/<name>.json``, shipped in ``stages/plots``): ``labelled`` is DVC's
#: scatter with each row's ``label`` column beside its point and rows with ``selected`` = 1 filled red (the
#: search fronts and the selected point); ``models`` colours one point per model by its ``label`` (legend).
LABELLED, MODELS = "labelled", "models"
#: The files ``init`` puts into a project's ``.dvc/plots`` (the checkout holds them as symlinks).
PLOT_FILES = ("labelled.json", "models.json", "page.html")
#: ``plots.html_template``, relative to ``.dvc``: DVC's page with a charset (Vega's minus sign is U+2212).
PLOT_PAGE = "plots/page.html"


def _scatter(path: str, template: str, xy: tuple[str, str], title: str, labels: tuple[str, str]) -> dict[str, Any]:
    """One uncached plot file of a stage, drawn as a scatter of columns ``xy`` with axis ``labels``."""
    x, y = xy
    return {
        path: {
            **_UNCACHED,
            "template": template,
            "x": x,
            "y": y,
            "title": title,
            "x_label": labels[0],
            "y_label": labels[1],
        }
    }


STAGES: dict[str, StageSpec] = {
    "check": StageSpec(
        comment="Every params section and input file checked before any stage's outputs are removed (check.py).",
        cmd="ptqflow check --out data/check",
        data=(),
        code=(CLI, LIB),
        params=(),  # every section of the params file, filled in by render()
        outs=("data/check",),
    ),
    "prepare": StageSpec(
        cmd="ptqflow prepare --out data/prepare",
        data=("data/check/check.json", "${prepare.data_root}"),
        code=(*_lib("data.py", "imagefolder.py"), "stages/prepare.py"),
        params=("prepare",),
        outs=("data/prepare",),
    ),
    "features": StageSpec(
        cmd="ptqflow features --calibration data/prepare/calibration.pt --out data/features/store.zarr",
        data=("data/prepare/calibration.pt", "${base.weights}"),
        code=(
            *_lib("features.py", "fold.py", "units.py", "attention.py", "ops.py", "models.py", "imagefolder.py"),
            *_lib("quant/units.py"),
            "stages/features.py",
            "stages/common.py",
        ),
        params=("base.kernels", "base.model", "base.weights", "base.device", "base.float_leaves", "features"),
        outs=("data/features/store.zarr",),
        builds_model=True,
    ),
    "quantize": StageSpec(
        cmd="ptqflow quantize --features data/features/store.zarr --out data/quantize",
        data=("data/features/store.zarr", "${base.weights}"),
        code=(*_lib("quant"), *_PLACE, *_lib("fold.py", "units.py", "models.py"), "stages/quantize.py"),
        params=("base.kernels", "base.model", "base.weights", "base.device", "base.float_leaves", "quantize"),
        outs=("data/quantize",),
        builds_model=True,
    ),
    "sensitivity": StageSpec(
        cmd="ptqflow sensitivity --features data/features/store.zarr --rtn data/quantize --out data/sensitivity "
        "--plots plots/sensitivity",
        data=("data/features/store.zarr", "data/quantize"),
        code=(*_lib("sensitivity.py", "quant"), *_PLACE, *_lib("features.py", "models.py"), "stages/sensitivity.py"),
        params=("base.kernels", "base.device", "sensitivity"),
        outs=("data/sensitivity",),
        plots=(
            {
                "plots/sensitivity/units.tsv": {
                    **_UNCACHED,
                    "x": "position",
                    "y": "loss_w2",  # DVC's default is the last column, the all-but-zero W8 loss
                    "x_label": "unit (network order)",
                    "y_label": "sensitivity at 2-bit weights",
                }
            },
        ),
        builds_model=True,
    ),
    "search": StageSpec(
        cmd="ptqflow search --tables data/sensitivity/tables.json --out data/search --plots plots/search",
        data=("data/sensitivity/tables.json",),
        code=(*_lib("search.py", "sensitivity.py"), "stages/search.py"),
        params=("search",),
        outs=("data/search",),
        # Plots, not uncached outs: DVC's run cache skips a stage with an uncached out that is neither a plot
        # nor a metric. The display plots draw these fronts again with the point the select stage picks.
        plots=(
            _scatter(
                "plots/search/front.tsv",
                "scatter",
                ("size_mb", "sensitivity"),
                "Mixed-precision Pareto front (size MB vs summed sensitivity)",
                ("size (MB)", "summed sensitivity"),
            ),
            _scatter(
                "plots/search/front_bitops.tsv",
                "scatter",
                ("bitops", "sensitivity"),
                "Mixed-precision Pareto front (GBitOPs vs summed sensitivity)",
                ("GBitOPs", "summed sensitivity"),
            ),
        ),
    ),
    "select": StageSpec(
        cmd="ptqflow select --front data/search/front.json --rtn data/quantize --out data/select --plots plots/select",
        data=("data/search/front.json", "data/quantize"),
        code=(*_lib("search.py", "quant"), *_PLACE, *_lib("models.py"), "stages/select.py"),
        params=("base.kernels", "select.base", "select.budget", "select.name"),
        outs=("data/select",),
        plots=(
            _scatter(
                "plots/select/selected.tsv",
                LABELLED,
                ("size_mb", "sensitivity"),
                "The mixed-precision point select.budget picks (drawn on the fronts too)",
                ("size (MB)", "summed sensitivity"),
            ),
        ),
        builds_model=True,
    ),
    "plan": StageSpec(
        cmd="ptqflow plan --modcap data/sensitivity/modcap.json --out data/plan --plots plots/plan",
        data=("data/sensitivity/modcap.json",),
        code=(*_lib("plan.py"), "stages/plan.py"),
        params=("plan",),
        outs=("data/plan",),
        plots=(
            {
                "plots/plan/modcap.tsv": {
                    **_UNCACHED,
                    "x": "position",
                    "y": "differential",  # the default, the last column (merged_with_next), is a flat 0 when k is 0
                    "x_label": "unit (network order)",
                    "y_label": "ModCap differential (plan.form)",
                }
            },
        ),
    ),
    "reconstruct": StageSpec(
        cmd="ptqflow reconstruct --features data/features/store.zarr --rtn data/quantize{rtn_select}{plan} "
        "--out data/reconstruct --plots plots/reconstruct --timing metrics/timing.json --unit-seconds plots/timing",
        data=("data/features/store.zarr", "data/quantize", "{select}", "{plan_file}", "${base.weights}"),
        code=(
            *_lib("recon", "quant"),
            *_PLACE,
            *_lib("features.py", "fold.py", "models.py"),
            "stages/reconstruct.py",
            "stages/common.py",
        ),
        params=("base.kernels", "base.model", "base.weights", "base.device", "reconstruct"),
        outs=("data/reconstruct",),
        metrics=(
            # Wall seconds: nondeterministic, so kept out of the byte-identical outputs (README "Reproducibility").
            {"metrics/timing.json": dict(_UNCACHED)},
        ),
        plots=(
            {"plots/reconstruct": {**_UNCACHED, "x": "step", "y": "loss_after", "y_label": "reconstruction loss"}},
            {
                "plots/timing": {
                    **_UNCACHED,
                    "template": "bar_horizontal",
                    "x": "seconds",
                    "y": "unit",
                    "title": "Reconstruction wall seconds per unit",
                }
            },
        ),
        builds_model=True,
    ),
    "predict": StageSpec(
        comment="predict runs every model on the test set (the expensive half); evaluate turns its logits into "
        "metrics,\n# so a reporting key (evaluate.topk) reruns evaluate alone, in seconds.",
        cmd="ptqflow predict --test {test}{images} --models rtn=data/quantize{models_select} "
        "--models recon=data/reconstruct --out data/predict",
        data=("{test}", "{val}", "data/quantize", "{select}", "data/reconstruct", "${base.weights}"),
        code=(
            *_lib("evaluate.py", "integer.py", "imagefolder.py", "sensitivity.py", "quant"),
            *_PLACE,
            *_lib("fold.py", "units.py", "models.py"),
            "stages/predict.py",
        ),
        params=("base.kernels", "base.model", "base.weights", "base.device", "predict"),
        outs=("data/predict",),
        builds_model=True,
    ),
    "evaluate": StageSpec(
        cmd="ptqflow evaluate --predictions data/predict --out metrics/evaluate.json --plots plots/evaluate",
        data=("data/predict",),
        code=(*_lib("evaluate.py"), "stages/evaluate.py", "stages/predict.py"),
        params=("base.kernels", "evaluate"),
        metrics=({"metrics/evaluate.json": dict(_UNCACHED)},),
        plots=(
            # Accuracy vs size, one point per model; `dvc plots diff` / `dvc exp show` overlay experiments.
            _scatter(
                "plots/evaluate",
                MODELS,
                ("size_mb", "top1"),
                "Top-1 (%) vs size (MB), one point per model",
                ("size (MB)", "top-1 (%)"),
            ),
        ),
    ),
    "export": StageSpec(
        cmd="ptqflow export --models data/reconstruct --test {test}{images} --out data/export "
        "--metrics metrics/export.json",
        data=("data/reconstruct", "{test}", "{val}"),
        code=(
            *_lib("export.py", "integer.py", "evaluate.py", "imagefolder.py", "quant"),
            *_PLACE,
            *_lib("models.py"),
            "stages/export.py",
        ),
        params=("base.kernels", "export"),
        outs=("data/export",),
        metrics=({"metrics/export.json": dict(_UNCACHED)},),
        builds_model=True,
    ),
}

#: The stages of a uniform-bits pipeline (no mixed-precision search, no MRECG plan, no export).
UNIFORM = ("check", "prepare", "features", "quantize", "reconstruct", "predict", "evaluate")
#: Every stage: mixed precision and export included.
FULL = tuple(STAGES)


@dataclass(frozen=True)
class Pipeline:
    """What a ``dvc.yaml`` is made of: its stages, the dataset kind, and a header comment."""

    dataset: Dataset
    stages: tuple[str, ...] = FULL
    header: str = ""
    display_plots: tuple[Any, ...] = field(default=())


#: Display-only plot definitions of the full pipeline (not outputs): columns of the files the stages declare.
FULL_DISPLAY_PLOTS: tuple[Any, ...] = (
    {
        "Reconstruction loss per unit (before/after)": {
            "template": "linear",
            "x": "step",
            "y": {"plots/reconstruct/w2a4.tsv": ["loss_before", "loss_after"]},
            "x_label": "unit (reconstruction order)",
            "y_label": "reconstruction loss",
        }
    },
    {
        "Sensitivity per unit (sensitivity.metric: each unit's searchable layers at W bits)": {
            "x": "position",
            "y": {"plots/sensitivity/units.tsv": ["loss_w2", "loss_w3", "loss_w4", "loss_w8"]},
            "x_label": "unit (network order)",
            "y_label": "sensitivity",
        }
    },
    *(
        {
            f"Mixed-precision Pareto front ({cost}) and the model select.budget picks": {
                "template": LABELLED,
                "x": x,
                "y": {f"plots/search/{front}": "sensitivity", "plots/select/selected.tsv": "sensitivity"},
                "x_label": x_label,
                "y_label": "summed sensitivity",
            }
        }
        for cost, x, front, x_label in (
            ("size", "size_mb", "front.tsv", "size (MB)"),
            ("BitOPs", "bitops", "front_bitops.tsv", "GBitOPs"),
        )
    ),
    {
        "MRECG module capacity along depth (plan.reference; the differential plan.form uses)": {
            "x": "position",
            "y": {"plots/plan/modcap.tsv": ["modcap_data_dependent", "differential"]},
            "x_label": "unit (network order)",
            "y_label": "ModCap",
        }
    },
)

_PRESET_HEADER = """# ImageNet preset: {title}. Hyperparameters and the top-1 to expect are in params.yaml.
# Run from this folder: `dvc repro` (the ptqflow command on PATH; a GPU for the 20k-iteration schedule).
# Rendered by stages/template.py (python -m stages.template): paths are relative to this folder, the code is
# the repository's. The first `dvc status`/`dvc repro` hashes the image folder (prepare.data_root) once.
"""

#: The repository's pipelines: folder (relative to the repository root) -> what it is made of.
PIPELINES: dict[str, Pipeline] = {
    ".": Pipeline(
        "fashion-mnist",
        FULL,
        "# The embedded demo: Fashion-MNIST, ResNet-20, CPU. Stage name = params section = CLI subcommand = "
        "data/<name>/.\n# Rendered by stages/template.py (python -m stages.template): edit the table there.\n",
        FULL_DISPLAY_PLOTS,
    ),
    **{
        f"pipelines/imagenet-{slug}": Pipeline("imagefolder", UNIFORM, _PRESET_HEADER.format(title=title))
        for slug, title in (
            ("mnasnet1-0", "torchvision MNASNet 1.0"),
            ("mobilenet-v2", "torchvision MobileNetV2"),
            ("regnet-x-3-2gf", "torchvision RegNetX-3.2GF"),
            ("regnet-x-600mf", "torchvision RegNetX-600MF"),
            ("resnet18", "torchvision ResNet-18"),
            ("resnet50", "torchvision ResNet-50"),
            ("vit-b-16", "torchvision ViT-B/16"),
        )
    },
}


def _fill(text: str, pipeline: Pipeline) -> str:
    folder = pipeline.dataset == "imagefolder"
    has = set(pipeline.stages)
    values = dict(
        test="data/prepare/test.json" if folder else "data/prepare/test.pt",
        images=" --images ${prepare.data_root}" if folder else "",
        val="${prepare.data_root}/val" if folder else "",
        rtn_select=" --rtn data/select" if "select" in has else "",
        models_select=" --models rtn=data/select" if "select" in has else "",
        select="data/select" if "select" in has else "",
        plan=" --plan data/plan/plan.json" if "plan" in has else "",
        plan_file="data/plan/plan.json" if "plan" in has else "",
    )
    for key, value in values.items():  # not str.format: the text holds ${...} interpolations
        text = text.replace("{" + key + "}", value)
    return text


def _code_deps(name: str, spec: StageSpec, layout: Layout, prefix: str) -> list[str]:
    if layout == "installed":
        return [] if name == "check" else [f"{CODE_DIR}/{name}.json"]
    deps = [prefix + c for c in spec.code]
    if spec.builds_model:
        deps.append("${base.model_code}")
    return deps


def stage_dict(name: str, pipeline: Pipeline, layout: Layout, prefix: str, sections: list[str]) -> dict[str, Any]:
    """One stage of ``pipeline`` as ``dvc.yaml`` holds it."""
    spec = STAGES[name]
    cmd = _fill(spec.cmd, pipeline)
    if name == "check" and layout == "installed":
        cmd += " --code"
    data = [d for d in (_fill(d, pipeline) for d in spec.data) if d]
    stage: dict[str, Any] = {"cmd": cmd}
    if name == "check":
        # Runs on every repro: in the installed layout it reads the installed package, which DVC cannot hash;
        # in both it names a dataset or weights file gone missing (with its hint) before DVC stops at the
        # first stage that depends on it with a bare "No such file".
        stage["always_changed"] = True
    stage["deps"] = [*data, *_code_deps(name, spec, layout, prefix)]
    if not stage["deps"]:
        del stage["deps"]
    stage["params"] = list(sections) if name == "check" else list(spec.params)
    if spec.outs:
        stage["outs"] = list(spec.outs)
    if spec.metrics:
        stage["metrics"] = list(spec.metrics)
    if spec.plots:
        stage["plots"] = list(spec.plots)
    return stage


class _Indented(yaml.SafeDumper):
    """Block sequences indented under their key, as the hand-written pipelines had them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _block(value: Any, indent: int) -> list[str]:
    text = yaml.dump(value, Dumper=_Indented, sort_keys=False, width=110, default_flow_style=False)
    return [" " * indent + line for line in text.rstrip("\n").split("\n")]


def _stage_lines(name: str, stage: dict[str, Any], comment: str) -> list[str]:
    lines = [f"  {name}:"]
    lines += [f"    # {c.removeprefix('# ')}" for c in comment.split("\n") if comment]
    for key, value in stage.items():
        if key == "params":
            lines.append(f"    params: [{', '.join(value)}]")
        elif isinstance(value, list):
            lines.append(f"    {key}:")
            lines += _block(value, 6)
        else:
            lines += _block({key: value}, 4)
    return lines


def render(pipeline: Pipeline, sections: list[str], layout: Layout = "checkout", prefix: str = "") -> str:
    """The ``dvc.yaml`` text of ``pipeline``.

    Args:
        pipeline: its stages and dataset kind.
        sections: the params sections of its params file (the ``check`` stage declares each, whole).
        layout: ``checkout`` (code deps are this repository's files) or ``installed`` (code fingerprints).
        prefix: the path from the pipeline's folder to the repository root (``../../``), checkout only.
    """
    unknown = [s for s in pipeline.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage {unknown[0]!r}; allowed: {', '.join(STAGES)}")
    lines = [pipeline.header.rstrip("\n")] if pipeline.header else []
    lines.append("stages:")
    for i, name in enumerate(pipeline.stages):
        if i:
            lines.append("")
        stage = stage_dict(name, pipeline, layout, prefix, sections)
        lines += _stage_lines(name, stage, STAGES[name].comment)
    if pipeline.display_plots and {"reconstruct", "sensitivity", "search", "select", "plan"} <= set(pipeline.stages):
        lines += [
            "",
            "# Display-only plot definitions (not outputs): they combine columns of files the stages declare.",
        ]
        lines += ["plots:", *_block(list(pipeline.display_plots), 2)]
    return "\n".join(lines) + "\n"


# -- the installed layout's code fingerprints -------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _py_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def package_roots() -> dict[str, Path]:
    """Where the installed (or checked-out) ``ptqflow`` and ``stages`` packages live."""
    import ptqflow
    import stages

    return {LIB: Path(ptqflow.__file__).parent, CLI: Path(stages.__file__).parent}


def distribution_versions(*dists: str) -> dict[str, str]:
    """The installed version of each distribution (``not installed`` for one that is not)."""
    found = {}
    for dist in dists:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def entry_point_origin(model: str) -> Path | None:
    """The resolved file of an entry point's module (``package.module:factory``), without importing it;
    ``None`` for a model name that is not an entry point or a module that cannot be found."""
    if ":" not in model:
        return None
    try:
        spec = importlib.util.find_spec(model.partition(":")[0])
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin else None


def model_source(model: str, project: Path) -> dict[str, str]:
    """What decides the FP model's architecture besides ptqflow: for an entry point ``package.module:factory``
    whose module lies in ``project``, the sha256 of every Python file of its top-level package (or of the
    module file); for one from an installed distribution, that distribution's version. Embedded and
    torchvision models are covered by ptqflow's and torchvision's versions."""
    if ":" not in model:
        return {}
    module = model.partition(":")[0]
    origin, root = entry_point_origin(model), project.resolve()
    if origin is None:
        raise ConfigError(f"base.model {model!r}: module {module!r} cannot be found from {project}")
    if origin.is_relative_to(root):
        top = root / module.split(".")[0]
        files = _py_files(top) if top.is_dir() else [origin]
        return {str(f.relative_to(root)): _sha256(f) for f in files}
    top_name = module.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top_name, []):
        return {f"{top_name} (distribution {dist})": importlib.metadata.version(dist)}
    return {f"{top_name} (outside the project)": _sha256(origin)}


def code_fingerprint(name: str, model: str, project: Path, roots: dict[str, Path] | None = None) -> dict[str, Any]:
    """The installed layout's code dependency of stage ``name``: torch's and torchvision's versions, the
    sha256 of every module the stage lists in :data:`STAGES` (read from ``roots``, by default the imported
    packages), and the model's source for a stage that builds it. The same installed code gives the same
    bytes on every machine (no absolute paths: modules are named as the repository names them)."""
    spec = STAGES[name]
    roots = roots or package_roots()
    modules: dict[str, str] = {}
    for entry in spec.code:
        top, _, rest = entry.partition("/")
        base = roots[LIB] if entry.startswith(LIB) else roots[top]
        rel = entry.removeprefix(LIB + "/") if entry.startswith(LIB) else rest
        path = base / rel if rel else base
        if not path.exists():
            raise ConfigError(f"installed ptqflow has no {entry} (stage {name}); reinstall ptqflow")
        for f in _py_files(path):
            key = LIB if entry.startswith(LIB) else CLI
            modules[f"{key}/{f.relative_to(roots[key]).as_posix()}"] = _sha256(f)
    result: dict[str, Any] = {
        "stage": name,
        "versions": distribution_versions("torch", "torchvision"),
        "modules": modules,
    }
    if spec.builds_model:
        result["model"] = model_source(model, project)
    return result


def _write_repository_pipelines(root: Path) -> list[Path]:
    """Render every pipeline of :data:`PIPELINES` into the repository at ``root``; return the files written."""
    written = []
    for folder, pipeline in PIPELINES.items():
        where = root / folder
        sections = list(yaml.safe_load((where / "params.yaml").read_text()))
        prefix = "../" * len(Path(folder).parts) if folder != "." else ""
        (where / "dvc.yaml").write_text(render(pipeline, sections, "checkout", prefix))
        written.append(where / "dvc.yaml")
    return written


if __name__ == "__main__":  # python -m stages.template: rewrite the repository's dvc.yaml files
    for path in _write_repository_pipelines(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()):
        print(path)
