"""Logging set-up of the ``ptqflow`` command (torch-free: it runs before any command decides to import it)."""

from __future__ import annotations

import logging
import sys


def configure_logging(verbosity: int) -> None:
    """-1 quiet (warnings), 0 info, 1+ debug; plain lines on stderr."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
