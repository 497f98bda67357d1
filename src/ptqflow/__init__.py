"""ptqflow: post-training quantization of vision models (BRECQ, QDrop, MRECG), cached through DVC.

The Python API (:mod:`ptqflow.api`) for notebooks and scripts::

    import ptqflow
    qmodel = ptqflow.quantize(model, calibration_images, weight_bits=4, act_bits=4, method="qdrop")

The API's names end in ``_model`` where a module of the package has the short name (``ptqflow.evaluate``,
``ptqflow.export``). Names are imported on first use, so ``import ptqflow`` (and the ``ptqflow`` command's
``--help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ptqflow.api import Data, evaluate_model, export_model, load_model, quantize, save_model
    from ptqflow.errors import ConfigError, DataError, ExportError, ModelError, PtqflowError, StoreError
    from ptqflow.models import build_model
    from ptqflow.quant.model import QuantConfig, QuantModel
    from ptqflow.recon.reconstruct import ReconConfig

#: public name -> the module that defines it
_EXPORTS = {
    "Data": "ptqflow.api",
    "evaluate_model": "ptqflow.api",
    "export_model": "ptqflow.api",
    "load_model": "ptqflow.api",
    "quantize": "ptqflow.api",
    "save_model": "ptqflow.api",
    "build_model": "ptqflow.models",
    "QuantConfig": "ptqflow.quant.model",
    "QuantModel": "ptqflow.quant.model",
    "ReconConfig": "ptqflow.recon.reconstruct",
    "PtqflowError": "ptqflow.errors",
    "ConfigError": "ptqflow.errors",
    "DataError": "ptqflow.errors",
    "ModelError": "ptqflow.errors",
    "StoreError": "ptqflow.errors",
    "ExportError": "ptqflow.errors",
}

__all__ = [
    "ConfigError",
    "Data",
    "DataError",
    "ExportError",
    "ModelError",
    "PtqflowError",
    "QuantConfig",
    "QuantModel",
    "ReconConfig",
    "StoreError",
    "__version__",
    "build_model",
    "evaluate_model",
    "export_model",
    "load_model",
    "quantize",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ptqflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
