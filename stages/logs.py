"""Logging and progress of the ``ptqflow`` command, torch-free: it runs before any command decides to import
torch, and a progress line costs no import of the library."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

log = logging.getLogger("ptqflow")


def configure_logging(verbosity: int) -> None:
    """-1 quiet (warnings), 0 info, 1+ debug; plain lines on stderr."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def _bar_disabled() -> bool | None:
    """tqdm's ``disable``: None (auto: a bar only on a terminal), or True under ``--quiet``."""
    return None if log.isEnabledFor(logging.INFO) else True


def _pace(done: int, total: int, began: float) -> str:
    """``12.3 it/s, ETA 4m05s`` from the items done since ``began`` (``time.perf_counter``)."""
    elapsed = time.perf_counter() - began
    if done <= 0 or elapsed <= 0:
        return "starting"
    rate = done / elapsed
    left = round((total - done) / rate)
    eta = f"{left // 3600}h{left % 3600 // 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"
    shown = f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it"
    return f"{shown}, ETA {eta}" if done < total else f"{shown}, {elapsed:.1f}s"


def progress_bar(total: int, label: str) -> Callable[[int, float], None]:
    """A tqdm bar on a terminal; plain log lines every 10 % otherwise (CI, DVC queue logs), each with the
    rate and the time left (``label: 300/3000, loss 0.012, 9.8 it/s, ETA 4m35s``).

    Returns:
        ``update(iteration, loss)``; the bar closes at ``iteration == total``.
    """
    bar = tqdm(total=total, desc=label, disable=_bar_disabled(), leave=False, file=sys.stderr, dynamic_ncols=True)
    every = max(1, total // 10)
    began = time.perf_counter()

    def update(iteration: int, loss: float) -> None:
        if bar.disable:
            if iteration % every == 0 or iteration == total:
                log.info("%s: %d/%d, loss %.4g, %s", label, iteration, total, loss, _pace(iteration, total, began))
        else:
            bar.update(1)
            if iteration % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if iteration == total:
            bar.close()

    return update


def track(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    """Yield ``items``, showing progress: a tqdm bar on a terminal, plain log lines otherwise.

    Off a terminal (CI, ``dvc queue logs``, a pipe) it logs ``label: i/total, rate, ETA`` at INFO about
    every 10 % and at the end, so long stages show they are alive; ``--quiet`` silences those lines.
    """
    bar = tqdm(total=total, desc=label, disable=_bar_disabled(), leave=False, file=sys.stderr, dynamic_ncols=True)
    every = max(1, total // 10)
    done = 0
    began = time.perf_counter()
    try:
        for item in items:
            yield item
            done += 1
            if bar.disable:
                if done % every == 0 or done == total:
                    log.info("%s: %d/%d, %s", label, done, total, _pace(done, total, began))
            else:
                bar.update(1)
    finally:
        bar.close()
