"""Strict loading of ``params.yaml`` sections into the library's frozen config dataclasses.

Every section is parsed with ``yaml.safe_load`` and checked field by field: an unknown key gets a
"did you mean", a wrong type or range gets one line naming the dotted key. Nothing else in the project
reads params.yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from ptqflow.errors import ConfigError

__all__ = ["SECTIONS", "BaseConfig", "load_params", "parse_dataclass", "section"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Keys shared by every stage of a pipeline.

    Args:
        model: an embedded model name (``resnet20``, ``mobilenetv2_s``) or ``torchvision.<name>``.
        weights: the FP state_dict file the pipeline starts from.
        seed: seeds every random draw not seeded by a stage of its own.
        device: ``auto`` picks CUDA when present, else the CPU.
        float_leaves: module paths (``encoder.layers.0.self_attention``) kept as opaque float ops, for
            ops the placement rules cannot quantize (the error naming such an op says so). Every model's
            entry in ``metrics/evaluate.json`` then lists them: it is not quantized as its name says.
        kernels: ``portable`` pins the CPU libraries to code paths that give the same bytes on every x86-64
            machine with AVX2 and for every thread count (:mod:`ptqflow.kernels`); ``native`` lets them
            use the machine's widest path (faster on AVX-512 CPUs; bytes depend on the CPU and threads).
            A declared param of every computing stage: switching it reruns them.
        threads: intra-op CPU threads, ``auto`` (the usable cores other processes leave free, rechosen
            before every reconstruction unit) or a number. Not a declared param: in portable mode the
            outputs are the same bytes for every thread count, so changing it reruns nothing.
        model_code: the file or folder holding the model's Python code, a dependency (``${base.model_code}``
            in ``dvc.yaml``) of every stage that builds the model, so that editing it reruns them; for an
            entry point ``package.module:factory`` inside the project, ``check`` requires it to hold that
            module (its file, or its package's folder). Empty (the default) in a pipeline ``ptqflow init``
            wrote: there the ``check`` stage fingerprints the model's source (:mod:`stages.template`).
        memory: where ``reconstruct`` keeps a unit's cached calibration tensors while optimising it:
            ``device`` (whole tensors on the compute device), ``cpu`` (host memory, pinned on CUDA, each
            mini-batch copied over) or ``stream`` (spilled to scratch files next to the stage's output and
            read back mini-batch by mini-batch with a bounded read-ahead; host memory then holds a few
            mini-batches). Not a declared param: every mode gives the same bytes (:mod:`ptqflow.recon.cache`).
    """

    model: str = "resnet20"
    weights: str = "data/pretrained/resnet20.pt"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    float_leaves: tuple[str, ...] = ()
    kernels: Literal["portable", "native"] = "portable"
    model_code: str = ""
    threads: int | str = "auto"  # "auto" or a count; checked in __post_init__ for one clear message
    memory: Literal["device", "cpu", "stream"] = "device"

    def __post_init__(self) -> None:
        if self.threads != "auto" and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ConfigError(f"threads must be 'auto' or an integer >= 1; got {self.threads!r}")


#: Every top-level section a params file of this project may hold (each pipeline uses a subset).
SECTIONS = (
    "base",
    "prepare",
    "features",
    "quantize",
    "sensitivity",
    "search",
    "select",
    "plan",
    "reconstruct",
    "predict",
    "evaluate",
    "export",
    "train",
)


def load_params(path: Path) -> dict[str, Any]:
    """Read a params file into a dict of sections, rejecting syntax errors and unknown sections.

    Raises:
        ConfigError: the file is missing, not YAML, not a mapping, or names an unknown section.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path} is empty; it needs the sections {', '.join(SECTIONS)} (as the pipeline uses them)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections, got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(_unknown(str(key), SECTIONS, f"{path}: unknown section"))
    return data


def section(params: Mapping[str, Any], name: str, cls: type[T]) -> T:
    """Parse section ``name`` of loaded params into ``cls`` (a missing section means all defaults)."""
    return parse_dataclass(cls, params.get(name), name)


def parse_dataclass(cls: type[T], data: Any, prefix: str) -> T:
    """Build the frozen dataclass ``cls`` from a mapping, strictly.

    Args:
        cls: a dataclass whose field names are the params keys.
        data: the mapping (``None`` means every default).
        prefix: the dotted path of ``data``, used in messages.

    Raises:
        ConfigError: unknown key (with the closest match), wrong type, missing required key, or a
            value the dataclass's ``__post_init__`` rejects.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of keys, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown(str(key), tuple(fields), f"unknown key {prefix}.{key}"))
    kwargs = {key: _coerce(hints[key], value, f"{prefix}.{key}") for key, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]} is required")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc}") from None


def _unknown(key: str, allowed: tuple[str, ...], head: str) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{head}{hint} (allowed: {', '.join(allowed)})"


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{where} must be one of {', '.join(repr(a) for a in args)}; got {_show(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {_show(value)}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {_show(value)}")
        value_type = args[1] if args else Any
        return {str(k): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return parse_dataclass(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in a config class, not user input
