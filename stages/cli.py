"""The ``ptqflow`` command line: one subcommand per DVC stage.

Paths come from the command line (as ``dvc.yaml``'s ``cmd`` spells them), hyperparameters only from the
params file. A bad value or file ends in one line on stderr and exit code 2. torch is imported only when a
command runs, so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ptqflow.errors import PtqflowError
from stages.logs import configure_logging
from stages.params import load_params

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("ptqflow")

_PATH = click.Path(path_type=Path)


def _path_option(*decls: str, default: Path | None, help: str) -> Callable[[F], F]:
    """A ``--flag PATH`` option; the default (if any) is shown in ``--help``."""
    return click.option(*decls, type=_PATH, default=default, show_default=default is not None, help=help)


class _Context:
    def __init__(self, params_path: Path, verbosity: int) -> None:
        self.params_path = params_path
        self.verbosity = verbosity

    def params(self) -> dict[str, Any]:
        """The params file, after applying its ``base.kernels`` and ``base.threads`` to this process (every
        stage reads its params before its first CPU computation, when the kernel switches still apply)."""
        from stages.common import apply_runtime

        params = load_params(self.params_path)
        apply_runtime(params)
        return params


class BadInput(click.ClickException):
    """A user error: click prints ``Error: <message>`` as one line and exits with 2."""

    exit_code = 2


def _fail(exc: PtqflowError) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    raise BadInput(message)


def _stage(func: F) -> F:
    """Set up logging when the command runs, and turn library errors into :class:`BadInput` (one line,
    exit 2, no traceback)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        context = click.get_current_context().find_object(_Context)
        configure_logging(context.verbosity if context is not None else 0)
        try:
            return func(*args, **kwargs)
        except PtqflowError as exc:
            _fail(exc)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper  # type: ignore[return-value]


def _params_here(func: F) -> F:
    """``--params`` on a subcommand too (``ptqflow quantize --params p.yaml``), as on the group."""

    def use(ctx: click.Context, _: click.Parameter, value: Path | None) -> None:
        if value is not None:
            context = ctx.find_object(_Context)
            if context is not None:
                context.params_path = value

    return click.option(
        "--params", type=_PATH, default=None, expose_value=False, is_eager=True, callback=use,
        help="Params file to read hyperparameters from (default: the group's --params, params.yaml).",
    )(func)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@_path_option("--params", "params_path", default=Path("params.yaml"), help="Params file to read hyperparameters from.")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="ptqflow")
@click.pass_context
def cli(ctx: click.Context, params_path: Path, verbose: int, quiet: bool) -> None:
    """ptqflow: post-training quantization (BRECQ, QDrop, MRECG) as a DVC pipeline.

    Each subcommand is one stage of dvc.yaml; run them through `dvc repro` so that results are cached.
    """
    ctx.obj = _Context(params_path, -1 if quiet else verbose)


_pass_context = click.make_pass_decorator(_Context)


def pass_ctx(func: F) -> F:
    """Pass the :class:`_Context` and accept ``--params`` after the subcommand as well."""
    return _params_here(_pass_context(func))  # type: ignore[return-value]


@cli.command()
@_path_option("--out", default=None, help="Folder for check.json (the DVC stage's output); omit to only check.")
@click.option("--code", is_flag=True, help="Also write --out/code/<stage>.json, the installed package's code "
              "fingerprints (pipelines written by ptqflow init).")  # fmt: skip
@pass_ctx
@_stage
def check(ctx: _Context, out: Path | None, code: bool) -> None:
    """Check every params section and the files they name before any stage runs (params: all sections).

    The first stage of every pipeline: a typo or a missing file stops here, before DVC removes any other
    stage's outputs. Run it by hand too, e.g. before `dvc exp run --queue`.
    """
    from stages import check_memo

    if code and out is None:
        raise click.UsageError("--code needs --out")
    memo = check_memo.open_memo(ctx.params_path, out, code) if out is not None else None
    if memo is not None and out is not None:  # the DVC stage: torch-free when nothing it reads changed
        replayed = check_memo.replay(*memo, out)
        if replayed is not None:
            for message in replayed:
                log.warning("%s", message)
            log.info("params and inputs checked (nothing they name changed since the last check)")
            return
    from stages import check as stage

    warnings = stage.run(ctx.params(), out, code)
    if memo is not None and out is not None:
        check_memo.record(*memo, out, warnings)
    log.info("params and inputs checked%s", f" ({len(warnings)} warnings)" if warnings else "")


@cli.command()
@_path_option(
    "--out", "out_dir", default=Path("data/prepare"), help="Folder for calibration.pt, test.pt and manifest.json."
)
@pass_ctx
@_stage
def prepare(ctx: _Context, out_dir: Path) -> None:
    """Draw the seeded calibration subset and pin the test set (params: prepare.*)."""
    from stages import prepare as stage

    manifest = stage.run(ctx.params(), out_dir)
    log.info(
        "calibration: %d images (seed %d); test: %d images",
        manifest["calibration"]["count"],
        manifest["calibration"]["seed"],
        manifest["test"]["count"],
    )


@cli.command()
@_path_option(
    "--calibration", default=Path("data/prepare/calibration.pt"), help="Calibration split written by prepare."
)
@_path_option("--out", default=Path("data/features/store.zarr"), help="Feature store (zarr v3 folder) to write.")
@pass_ctx
@_stage
def features(ctx: _Context, calibration: Path, out: Path) -> None:
    """Cache FP input/output/gradient of every unit in a zarr store (params: base.*, features.*)."""
    from stages import features as stage

    units = stage.run(ctx.params(), calibration, out)
    log.info("feature store %s: %d units", out, units)


@cli.command()
@_path_option(
    "--features", "features_path", default=Path("data/features/store.zarr"), help="Feature store written by features."
)
@_path_option("--out", default=Path("data/quantize"), help="Folder for one <name>.pt per configured bit pair.")
@pass_ctx
@_stage
def quantize(ctx: _Context, features_path: Path, out: Path) -> None:
    """Round-to-nearest baseline at each bit pair of quantize.bits (params: base.*, quantize.*)."""
    from stages import quantize as stage

    names = stage.run(ctx.params(), features_path, out)
    log.info("wrote %s", ", ".join(f"{out}/{n}.pt" for n in names))


@cli.command()
@_path_option(
    "--features", "features_path", default=Path("data/features/store.zarr"), help="Feature store written by features."
)
@click.option(
    "--rtn",
    "rtn_dirs",
    type=_PATH,
    multiple=True,
    default=(Path("data/quantize"),),
    show_default=True,
    help="Folder of starting models: quantize's RTN models, select's mixed one (repeatable).",
)
@_path_option(
    "--plan",
    "plan_path",
    default=None,
    help='Optional unit plan (JSON {"groups": [[unit, ...], ...]}) merging adjacent units.',
)
@_path_option(
    "--out",
    default=Path("data/reconstruct"),
    help="Folder for one reconstructed <target>.pt per reconstruct.targets entry.",
)
@_path_option(
    "--plots",
    default=Path("plots/reconstruct"),
    help="Folder for per-unit loss tables (<target>.tsv, DVC plots data).",
)
@_path_option(
    "--timing",
    default=None,
    help="Optional JSON for the stage's wall seconds and peak memory (base.memory, peak_rss_mb, "
    "peak_device_mb on CUDA); not deterministic.",
)
@_path_option(
    "--unit-seconds",
    default=None,
    help="Optional folder for per-unit wall seconds (<target>.tsv, DVC plots data); not deterministic.",
)
@pass_ctx
@_stage
def reconstruct(
    ctx: _Context,
    features_path: Path,
    rtn_dirs: tuple[Path, ...],
    plan_path: Path | None,
    out: Path,
    plots: Path,
    timing: Path | None,
    unit_seconds: Path | None,
) -> None:
    """BRECQ / QDrop block reconstruction of RTN models (params: base.device, reconstruct.*)."""
    from stages import reconstruct as stage

    began = time.perf_counter()
    names = stage.run(ctx.params(), features_path, rtn_dirs, out, plots, plan_path, unit_seconds)
    if timing is not None:
        from ptqflow.atomic import atomic_write_json
        from ptqflow.recon.cache import peak_memory_mb
        from stages.common import resolve_device
        from stages.params import BaseConfig, section

        base = section(ctx.params(), "base", BaseConfig)
        figures = {"seconds": round(time.perf_counter() - began, 2), "memory": base.memory}
        atomic_write_json(timing, {"reconstruct": {**figures, **peak_memory_mb(resolve_device(base.device))}})
    log.info("wrote %s", ", ".join(f"{out}/{n}.pt" for n in names))


@cli.command()
@_path_option("--test", default=Path("data/prepare/test.pt"), help="Test split written by prepare.")
@click.option(
    "--models",
    "model_dirs",
    multiple=True,
    default=("rtn=data/quantize",),
    show_default=True,
    help="METHOD=FOLDER of quantized models to run (repeatable; a method may name several folders).",
)
@_path_option("--out", default=Path("data/predict"), help="Folder for logits.pt and models.json.")
@_path_option(
    "--images", default=None, help="Image folder root the test index (test.json) is relative to (prepare.data_root)."
)
@pass_ctx
@_stage
def predict(ctx: _Context, test: Path, model_dirs: tuple[str, ...], out: Path, images: Path | None) -> None:
    """Test-set logits, size and bits of the FP and quantized models (params: base.*, predict.*)."""
    from stages import predict as stage

    folders: dict[str, list[Path]] = {}
    for item in model_dirs:
        method, sep, folder = item.partition("=")
        if not sep or not method or not folder:
            raise BadInput(f"--models takes METHOD=FOLDER (e.g. rtn=data/quantize), got {item!r}")
        folders.setdefault(method, []).append(Path(folder))
    keys = stage.run(ctx.params(), test, folders, out, images)
    log.info("wrote %s/logits.pt for %s", out, ", ".join(keys))


@cli.command()
@_path_option("--predictions", default=Path("data/predict"), help="Folder written by predict.")
@_path_option("--out", default=Path("metrics/evaluate.json"), help="Metrics JSON to write.")
@_path_option(
    "--plots", default=Path("plots/evaluate"), help="Folder for models.tsv (accuracy vs size, DVC plots data)."
)
@pass_ctx
@_stage
def evaluate(ctx: _Context, predictions: Path, out: Path, plots: Path) -> None:
    """Top-k accuracy and size of every predicted model; metrics and plot data (params: evaluate.*)."""
    from stages import evaluate as stage

    metrics = stage.run(ctx.params(), predictions, out, plots)
    click.echo(_table(metrics))


@cli.command()
@click.argument("target", type=_PATH, default=Path("."))
@click.option("--model", default=None, help="resnet20 | torchvision.<name> | package.module:factory (your own).")
@click.option("--weights", default=None, help="The FP state_dict file (a path in the repository or absolute).")
@click.option("--data", default=None, help="imagefolder:PATH, a folder with train/<class>/ and val/<class>/.")
@click.option("--preset", default=None, help="An ImageNet preset instead of --model (imagenet-resnet18, ...).")
@click.option("--image-size", default=224, show_default=True, help="Crop size of the images (--model only).")
@click.option("--force", is_flag=True, help="Overwrite an existing dvc.yaml / params.yaml.")
@_stage
def init(
    target: Path, model: str | None, weights: str | None, data: str | None, preset: str | None, image_size: int,
    force: bool,
) -> None:  # fmt: skip
    """Start a ptqflow pipeline in a git repository (TARGET, default here): dvc.yaml + commented params.yaml.

    Not a DVC stage. The stages run the installed `ptqflow` command; each depends on a fingerprint of the
    installed code, so `pip install -U ptqflow` reruns exactly what changed. Runs `dvc init` if needed, never
    overwrites without --force. Then: `ptqflow check`, `dvc repro`.

    \b
    ptqflow init --model torchvision.resnet50 --weights weights/r50.pth --data imagefolder:/data/imagenet
    ptqflow init --model mynets.cnn:build --weights weights/cnn.pt --data imagefolder:data/images
    ptqflow init --preset imagenet-resnet18 --data imagefolder:/data/imagenet
    """
    from ptqflow import __version__
    from stages import init as stage

    written = stage.run(
        target, model=model, weights=weights, data=data, preset=preset, image_size=image_size, force=force,
        version=__version__,
    )  # fmt: skip
    for path in written:
        click.echo(f"wrote {path}")
    click.echo("next: ptqflow check, then dvc repro (edit params.yaml first: reconstruct.iters, bits, ...)")


@cli.command()
@_path_option("--metrics", "metrics_path", default=Path("metrics/evaluate.json"), help="Metrics JSON evaluate wrote.")
@_stage
def report(metrics_path: Path) -> None:
    """Print the demo's table (FP, RTN, mixed, reconstructed: bits, top-k, size) from evaluate's metrics.

    Not a DVC stage. The readable view of `dvc metrics show metrics/evaluate.json`; `make demo` ends with it.
    """
    from ptqflow.errors import DataError

    try:
        metrics = json.loads(Path(metrics_path).read_text())
        click.echo(_table(metrics))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{metrics_path} is not an evaluate metrics file ({type(exc).__name__}); run dvc repro"
        ) from None


def _table(metrics: dict[str, Any]) -> str:
    fp = metrics["fp"]
    topk = sorted((k for k in fp if k.startswith("top")), key=lambda k: int(k[3:]))
    # top-1 int: the integer-exact top-1, what an integer runtime (onnxruntime, OpenVINO) gives
    rows = [("model", "W/A", "avg W bits", *(f"top-{k[3:]}" for k in topk), "top-1 int", "size MB")]
    rows.append(("FP", "32/32", "32", *(f"{fp[k]:.2f}" for k in topk), "", f"{fp['size_mb']:.3f}"))
    for method, results in metrics.items():
        if method in ("fp", "samples"):
            continue
        for name, r in results.items():
            bits, avg = f"{r['weight_bits']}/{r['act_bits']}", f"{r['avg_weight_bits']:.2f}"
            exact = f"{r['top1_int']:.2f}" if "top1_int" in r else "n/a"
            cells = (*(f"{r[k]:.2f}" for k in topk), exact, f"{r['size_mb']:.3f}")
            rows.append((f"{method.upper()} {name}", bits, avg, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


@cli.command("export")
@_path_option(
    "--models",
    "models_dir",
    default=Path("data/reconstruct"),
    help="Folder of quantized models to export (reconstruct's; data/quantize for the RTN models).",
)
@_path_option(
    "--test", default=Path("data/prepare/test.pt"), help="Test split (test.pt) or image index (test.json) of prepare."
)
@_path_option("--out", default=Path("data/export"), help="Folder for <name>.onnx, <name>.state_dict.pt, <name>.json.")
@_path_option("--metrics", "metrics_path", default=Path("metrics/export.json"), help="Metrics JSON to write.")
@_path_option(
    "--images", default=None, help="Image folder root the test index (test.json) is relative to (prepare.data_root)."
)
@pass_ctx
@_stage
def export_(ctx: _Context, models_dir: Path, test: Path, out: Path, metrics_path: Path, images: Path | None) -> None:
    """QDQ ONNX + state_dict + scales JSON, checked in onnxruntime (params: export.*)."""
    from stages import export as stage

    metrics = stage.run(ctx.params(), models_dir, test, out, metrics_path, images)
    rows = [("model", "W/A", "top-1 torch", "top-1 onnx", "agreement %", "containers")]
    for name, r in metrics.items():
        if isinstance(r, dict):
            rows.append((name, f"{r['weight_bits']}/{r['act_bits']}", f"{r['top1_torch']:.2f}",
                         f"{r['top1_onnx']:.2f}", f"{r['agreement']:.2f}", ",".join(r["containers"])))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows))


@cli.command()
@_path_option(
    "--features", "features_path", default=Path("data/features/store.zarr"), help="Feature store written by features."
)
@_path_option("--rtn", "rtn_dir", default=Path("data/quantize"), help="Folder of RTN models written by quantize.")
@_path_option("--out", default=Path("data/sensitivity"), help="Folder for tables.json and modcap.json.")
@_path_option("--plots", default=Path("plots/sensitivity"), help="Folder for units.tsv (DVC plots).")
@pass_ctx
@_stage
def sensitivity(ctx: _Context, features_path: Path, rtn_dir: Path, out: Path, plots: Path) -> None:
    """Per-unit bit-assignment loss tables (BRECQ) and ModCap (MRECG) (params: base.device, sensitivity.*)."""
    from stages import sensitivity as stage

    document = stage.run(ctx.params(), features_path, rtn_dir, out, plots)
    log.info("%d unit tables, ModCap of %s", len(document["tables"]), ", ".join(document["modcap"]))


@cli.command()
@_path_option(
    "--tables", "tables_path", default=Path("data/sensitivity/tables.json"), help="Loss tables written by sensitivity."
)
@_path_option("--out", default=Path("data/search"), help="Folder for front.json.")
@_path_option("--plots", default=Path("plots/search"), help="Folder for front.tsv (DVC plots).")
@pass_ctx
@_stage
def search(ctx: _Context, tables_path: Path, out: Path, plots: Path) -> None:
    """Mixed-precision search: the Pareto fronts, exact or NSGA-II by search.algorithm (params: search.*)."""
    from stages import search as stage

    result = stage.run(ctx.params(), tables_path, out, plots)
    log.info("fronts: %s", ", ".join(f"{c} {len(f)} points" for c, f in result["fronts"].items()))


@cli.command("select")
@_path_option("--front", "front_path", default=Path("data/search/front.json"), help="Front written by search.")
@_path_option("--rtn", "rtn_dir", default=Path("data/quantize"), help="Folder of RTN models written by quantize.")
@_path_option("--out", default=Path("data/select"), help="Folder for the selected model and selection.json.")
@_path_option("--plots", default=Path("plots/select"), help="Folder for selected.tsv (the chosen front point).")
@pass_ctx
@_stage
def select_(ctx: _Context, front_path: Path, rtn_dir: Path, out: Path, plots: Path) -> None:
    """Pick the mixed-precision configuration for select.budget from the front (params: select.*)."""
    from stages import select as stage

    record = stage.run(ctx.params(), front_path, rtn_dir, out, plots)
    log.info(
        "selected %.4g MiB, %.3g avg bits, %.4g GBitOPs, sensitivity %.4g",
        record["size_mb"],
        record["avg_bits"],
        record["bitops"],
        record["sensitivity"],
    )


@cli.command()
@_path_option(
    "--modcap", "modcap_path", default=Path("data/sensitivity/modcap.json"), help="ModCap written by sensitivity."
)
@_path_option("--out", default=Path("data/plan"), help="Folder for plan.json (read by reconstruct --plan).")
@_path_option("--plots", default=Path("plots/plan"), help="Folder for modcap.tsv (DVC plots).")
@pass_ctx
@_stage
def plan(ctx: _Context, modcap_path: Path, out: Path, plots: Path) -> None:
    """MRECG: merge the adjacent units with the largest ModCap differentials (params: plan.*)."""
    from stages import plan as stage

    document = stage.run(ctx.params(), modcap_path, out, plots)
    merged = [g for g in document["groups"] if len(g) > 1]
    log.info("plan: %s", "; ".join("+".join(g) for g in merged) or "no merges (block-wise)")


@cli.command()
@click.option("--model", "model_name", required=True, help="Embedded model to train (resnet20, mobilenetv2_s).")
@click.option("--out", type=_PATH, required=True, help="Output state_dict file.")
@click.option("--metrics", type=_PATH, required=True, help="Output metrics JSON (per-epoch history).")
@pass_ctx
@_stage
def train(ctx: _Context, model_name: str, out: Path, metrics: Path) -> None:
    """Train an embedded FP model on Fashion-MNIST (params: base.device, prepare.data_root, train.*)."""
    from stages import train as stage

    final = stage.run(ctx.params(), model_name, out, metrics)
    click.echo(json.dumps({k: final[k] for k in ("epoch", "test_top1", "test_top5")}))


@cli.command("publish-weights")
@click.option("--model", "model_name", required=True, help="Embedded model name (resnet20, mobilenetv2_s).")
@_path_option(
    "--train-dir",
    default=Path("pipelines/train"),
    help="The training pipeline folder (its out/ and metrics/ hold the result).",
)
@_path_option(
    "--dest", default=Path("data/pretrained"), help="Folder of the released checkpoints and their manifest.json."
)
@_stage
def publish_weights(model_name: str, train_dir: Path, dest: Path) -> None:
    """Release a trained checkpoint to data/pretrained and record it in its manifest (not a DVC stage)."""
    from dataclasses import asdict

    from stages import train as stage

    params = load_params(train_dir / "params.yaml")
    entry = stage.publish(
        model_name,
        train_dir / "out" / f"{model_name}.pt",
        train_dir / "metrics" / f"{model_name}.json",
        dest,
        asdict(stage.train_config(params, model_name)),
    )
    click.echo(json.dumps(entry, indent=2))


@cli.command()
@click.option("-r", "--remote", default=None, help="DVC remote to push to (default: core.remote, e.g. 'shared').")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel transfers (default: DVC's).")
@_stage
def share(remote: str | None, jobs: int | None) -> None:
    """Push results for teammates: `dvc push --run-cache` plus every object the run entries need.

    Not a DVC stage. Teammates then run `dvc pull --run-cache` and `dvc repro --pull` (README, "Sharing
    results"), and any parameter set computed here restores there without rerunning.
    """
    from stages import share as helper

    result = helper.push(Path.cwd(), remote, jobs)
    click.echo(
        f"{result.run_entries} run entries; pushed {result.workspace_objects} files with dvc push --run-cache "
        f"and {result.entry_objects} more objects that run entries reference"
        + (f"; {result.missing} referenced objects are in no cache (dvc gc?)" if result.missing else "")
    )


def main() -> None:
    """Console-script entry point. The working directory (a pipeline's folder, where DVC runs the stage) is
    put on ``sys.path`` after everything else, as ``python -m`` would, so a model entry point of the
    user's project (``mynets.cnn:build``) imports without PYTHONPATH and never shadows an installed package."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    cli(prog_name="ptqflow")
