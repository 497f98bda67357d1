"""Exceptions shared by the library.

Every error a user can cause with a bad file or value derives from :class:`PtqflowError`; the CLI turns
it into one line and exit code 2.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "ExportError", "ModelError", "PtqflowError", "StoreError"]


class PtqflowError(Exception):
    """A user-facing error: the message names the key or file and what is allowed."""


class ConfigError(PtqflowError, ValueError):
    """A parameter is unknown, of the wrong type or out of range."""


class DataError(PtqflowError):
    """A dataset file is missing, truncated or not what it claims to be."""


class ModelError(PtqflowError):
    """A model name, weights file or structure is not usable."""


class StoreError(PtqflowError):
    """A feature store is missing, corrupt or of another format version."""


class ExportError(PtqflowError):
    """A model cannot be exported, or its exported form disagrees with the PyTorch model."""
