"""``ptqflow init``: start a ptqflow pipeline in a user's own git repository, as ``dvc init`` starts DVC.

Writes ``dvc.yaml`` (rendered from :data:`stages.template.STAGES` in the ``installed`` layout: the stages run
the installed ``ptqflow`` command, and each depends on a fingerprint of the installed code that
``ptqflow check --code`` writes) and a commented ``params.yaml`` for the user's model and data, or a preset's.
Asks nothing; runs ``dvc init`` when the repository has no ``.dvc``; never overwrites a file unless told to.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import yaml

from ptqflow.errors import ConfigError
from stages.template import FULL, FULL_DISPLAY_PLOTS, PLOT_FILES, PLOT_PAGE, UNIFORM, Pipeline, render

__all__ = ["PRESETS", "run"]

#: ``--preset`` names: the ImageNet presets of the repository (``pipelines/<name>``), shipped in the package.
PRESETS = tuple(
    sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("stages.presets").iterdir()
        if p.name.startswith("imagenet-")
    )
)

_HEADER = (
    "# Written by `ptqflow init` (ptqflow {version}): the stages run the installed `ptqflow` command. Each stage\n"
    "# depends on data/check/code/<stage>.json, the installed code's fingerprint that the check stage (always run,\n"
    "# seconds) rewrites: a `pip install -U ptqflow` reruns exactly the stages whose modules changed, and editing\n"
    "# your model's source reruns the stages that build it. Regenerate with `ptqflow init --force`.\n"
)


def _data_option(data: str) -> str:
    kind, sep, root = data.partition(":")
    if not sep or kind != "imagefolder" or not root:
        raise ConfigError(
            f"--data must be imagefolder:PATH (a folder with train/<class>/ and val/<class>/), got {data!r}"
        )
    return root


def _user_params(model: str, weights: str, data_root: str, image_size: int) -> str:
    text = resources.files("stages.presets").joinpath("imagefolder.yaml").read_text()
    values: dict[str, str | int] = {
        "@MODEL@": model,
        "@WEIGHTS@": weights,
        "@DATA_ROOT@": data_root,
        "@IMAGE_SIZE@": image_size,
        "@RESIZE_SIZE@": image_size * 8 // 7,
    }
    for key, value in values.items():  # each as YAML writes the scalar (quoted where it must be)
        text = text.replace(key, yaml.safe_dump(value, default_style=None).splitlines()[0].removesuffix(" ..."))
    return text


def _replacement(value: str) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return f"{match.group(1)} {value}"

    return replace


def _preset_params(preset: str, weights: str | None, data_root: str | None) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    text = resources.files("stages.presets").joinpath(f"{preset}.yaml").read_text()
    text = re.sub(r"(?m)^  model_code:.*\n", "", text)  # the checkout layout's key: init fingerprints the code
    for key, value in (("weights", weights), ("data_root", data_root)):
        if value is not None:
            text, count = re.subn(rf"(?m)^(  {key}:) \S+", _replacement(value), text, count=1)
            assert count == 1, key
    return text


def _dvc(target: Path, *args: str) -> None:
    """Run DVC of this interpreter's environment (the one ptqflow was installed with), PATH or not."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=target, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise ConfigError(f"dvc {args[0]} failed in {target}: {message[-1]}")


def run(
    target: Path,
    *,
    model: str | None = None,
    weights: str | None = None,
    data: str | None = None,
    preset: str | None = None,
    image_size: int = 224,
    force: bool = False,
    version: str = "",
) -> list[Path]:
    """Write ``dvc.yaml`` and ``params.yaml`` into the git repository ``target`` (DVC adds its outputs to
    ``.gitignore`` files itself when the stages run).

    Returns:
        The files written (and ``.dvc`` when ``dvc init`` ran).

    Raises:
        ConfigError: not a git repository, a file exists (without ``force``), bad or missing options.
    """
    target = Path(target)
    if not (target / ".git").exists():
        raise ConfigError(f"{target} is not the top of a git repository (no .git); run git init there first")
    if preset is not None:
        if model is not None:
            raise ConfigError("--model and --preset exclude each other: a preset names its model")
        params = _preset_params(preset, weights, _data_option(data) if data else None)
        stages: tuple[str, ...] = UNIFORM
    else:
        if model is None or weights is None or data is None:
            missing = [n for n, v in (("--model", model), ("--weights", weights), ("--data", data)) if v is None]
            raise ConfigError(
                f"ptqflow init needs {', '.join(missing)} (or --preset NAME; allowed: {', '.join(PRESETS)})"
            )
        if image_size < 8:
            raise ConfigError(f"--image-size must be >= 8, got {image_size}")
        params = _user_params(model, weights, _data_option(data), image_size)
        stages = FULL
    sections = list(yaml.safe_load(params))
    display = FULL_DISPLAY_PLOTS if stages == FULL else ()
    pipeline = Pipeline("imagefolder", stages, _HEADER.format(version=version or "?"), display)
    files = {target / "dvc.yaml": render(pipeline, sections, "installed"), target / "params.yaml": params}
    plot_files: dict[Path, str] = {}
    for name in PLOT_FILES:  # the labelled scatter template and the page with a charset, beside DVC's own
        plot_files[target / ".dvc" / "plots" / name] = resources.files("stages.plots").joinpath(name).read_text()
    existing = [p.name for p in files if p.exists()]
    existing += [str(p.relative_to(target)) for p, t in plot_files.items() if p.exists() and p.read_text() != t]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exist in {target}; pass --force to overwrite")
    written = []
    for path, text in files.items():
        path.write_text(text)
        written.append(path)
    if not (target / ".dvc").exists():
        written.append(target / ".dvc")
        _dvc(target, "init", "-q")
    for path, text in plot_files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        written.append(path)
    _dvc(target, "config", "plots.html_template", PLOT_PAGE)
    return written
