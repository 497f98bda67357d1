"""Where a reconstruction step keeps its cached tensors (``base.memory``), with bounded memory on request.

A step of :func:`ptqflow.recon.reconstruct.reconstruct` needs, for every calibration sample, the
quantized-prefix input, the FP input, the FP target and (Fisher loss) the output gradient. For an ImageNet
ResNet-50 ``layer1`` block at 1024 images each is 1024 x 256 x 56 x 56 float32, about 3.3 GB, which is
where a 16 GB GPU runs out (QDrop issue #26, "OOM when caching"). Three places to keep them:

* ``device`` -- whole tensors on the compute device (fastest; what the papers' code does);
* ``cpu`` -- whole tensors in host memory (pinned when the device is CUDA), each mini-batch copied to the
  device; on a CPU-only machine this is the same as ``device``;
* ``stream`` -- each tensor spilled, uncompressed, to a scratch file on disk (decoded from the feature
  store one chunk of samples at a time), and every mini-batch read back by row with a bounded read-ahead
  (:func:`prefetch`). Host memory then holds a few mini-batches, not the calibration set.

Every mode hands the optimisation the same values in the same memory layout (4-D tensors channels-last,
others contiguous), so the reconstructed model is the same bytes whichever is chosen (tested on the CPU).
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ptqflow.errors import ConfigError

__all__ = ["MEMORY_MODES", "Cached", "Memory", "Sink", "layout", "peak_memory_mb", "prefetch"]

MEMORY_MODES: tuple[str, ...] = ("device", "cpu", "stream")
MemoryMode = Literal["device", "cpu", "stream"]


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory so far (``peak_rss_mb``, from ``getrusage``; Linux reports
    KiB) and, on CUDA, the peak memory torch allocated on the device (``peak_device_mb``)."""
    out: dict[str, float] = {}
    try:
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:  # not a POSIX system: no figure rather than a wrong one
        pass
    if device.type == "cuda":
        out["peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def layout(t: torch.Tensor) -> torch.Tensor:
    """The layout every mode hands out: channels-last for 4-D activations (faster CPU convolutions), else
    contiguous. A no-op when ``t`` already has it."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class Cached(ABC):
    """``n`` samples of one per-sample shape; rows are read as device tensors in :func:`layout`."""

    n: int
    shape: tuple[int, ...]

    @abstractmethod
    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Samples ``idx`` (a 1-D CPU int64 tensor, repeats allowed), on the device."""

    @abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Samples ``start:stop`` in order, on the device."""

    def fetch(self, idx: torch.Tensor) -> object:
        """The host-side part of :meth:`take` (disk reads), safe to run on a read-ahead thread."""
        return idx

    def finish(self, fetched: object) -> torch.Tensor:
        """The device-side part of :meth:`take` for what :meth:`fetch` returned."""
        assert isinstance(fetched, torch.Tensor)
        return self.take(fetched)

    @abstractmethod
    def close(self) -> None:
        """Release the memory or the scratch file."""


class _InMemory(Cached):
    def __init__(self, tensor: torch.Tensor, device: torch.device) -> None:
        self.tensor = tensor
        self.device = device
        self.n = tensor.shape[0]
        self.shape = tuple(tensor.shape[1:])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        index = idx.to(self.tensor.device)
        return layout(self.tensor[index].to(self.device, non_blocking=True))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return layout(self.tensor[start:stop].to(self.device, non_blocking=True))

    def close(self) -> None:
        self.tensor = torch.empty(0)


class _RowFile(Cached):
    """Raw float32 rows, sample-major, in one scratch file; read with ``pread`` (no mapping, so the rows
    read do not stay in this process's resident memory)."""

    def __init__(self, path: Path, n: int, shape: tuple[int, ...], device: torch.device) -> None:
        self.path = path
        self.n = n
        self.shape = shape
        self.device = device
        self.row_values = int(np.prod(shape, dtype=np.int64))
        self.row_bytes = self.row_values * 4
        self.fd = os.open(path, os.O_RDONLY)

    def _read(self, starts: Sequence[int], counts: Sequence[int]) -> np.ndarray:
        out = np.empty((sum(counts), *self.shape), dtype=np.float32)
        flat = out.reshape(-1).view(np.uint8)
        at = 0
        for start, count in zip(starts, counts, strict=True):
            size = count * self.row_bytes
            view = memoryview(flat[at : at + size])  # type: ignore[arg-type]
            done = 0
            while done < size:
                got = os.preadv(self.fd, [view[done:]], start * self.row_bytes + done)
                if got <= 0:
                    raise OSError(f"short read from scratch file {self.path}")
                done += got
            at += size
        return out

    def fetch(self, idx: torch.Tensor) -> object:
        rows = [int(i) for i in idx.tolist()]
        return self._read(rows, [1] * len(rows))

    def finish(self, fetched: object) -> torch.Tensor:
        assert isinstance(fetched, np.ndarray)
        return layout(torch.from_numpy(fetched).to(self.device, non_blocking=True))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        return self.finish(self.fetch(idx))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.finish(self._read([start], [stop - start]))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class Sink(ABC):
    """Receives a tensor's samples batch by batch, in order; :meth:`finish` gives the :class:`Cached`."""

    @abstractmethod
    def append(self, batch: torch.Tensor) -> None:
        """Add the next samples, in order."""

    @abstractmethod
    def finish(self) -> Cached:
        """The filled tensor (every sample appended)."""


class _MemorySink(Sink):
    def __init__(self, n: int, where: torch.device, device: torch.device, pin: bool) -> None:
        self.n, self.where, self.device, self.pin = n, where, device, pin
        self.tensor: torch.Tensor | None = None
        self.filled = 0

    def append(self, batch: torch.Tensor) -> None:
        if self.tensor is None:  # allocated once, at its final layout: no concatenation copy
            fmt = torch.channels_last if batch.dim() == 4 else torch.contiguous_format
            shape = (self.n, *batch.shape[1:])
            self.tensor = torch.empty(shape, dtype=torch.float32, device=self.where, memory_format=fmt)
            if self.pin:
                self.tensor = self.tensor.pin_memory()
        stop = self.filled + batch.shape[0]
        self.tensor[self.filled : stop].copy_(batch)
        self.filled = stop

    def finish(self) -> Cached:
        if self.tensor is None or self.filled != self.n:
            raise ValueError(f"cache filled with {self.filled} of {self.n} samples")
        return _InMemory(self.tensor, self.device)


class _FileSink(Sink):
    def __init__(self, n: int, scratch: Path, device: torch.device) -> None:
        self.n, self.device = n, device
        fd, name = tempfile.mkstemp(prefix=".ptqflow-", suffix=".f32", dir=scratch)
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.shape: tuple[int, ...] | None = None
        self.filled = 0

    def append(self, batch: torch.Tensor) -> None:
        self.shape = tuple(batch.shape[1:])
        # sample-major C order whatever the batch's layout: the file's rows are layout-free values
        self.file.write(batch.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        self.filled += batch.shape[0]

    def finish(self) -> Cached:
        self.file.close()
        if self.shape is None or self.filled != self.n:
            self.path.unlink(missing_ok=True)
            raise ValueError(f"cache filled with {self.filled} of {self.n} samples")
        return _RowFile(self.path, self.n, self.shape, self.device)


class Memory:
    """Makes the :class:`Cached` tensors of one ``base.memory`` mode.

    Args:
        mode: ``device``, ``cpu`` or ``stream`` (see the module docstring).
        device: the compute device.
        scratch: the folder for ``stream``'s scratch files (needed for that mode only; the caller removes
            it afterwards, the files are deleted as each tensor is released).
    """

    def __init__(self, mode: str, device: torch.device, scratch: Path | None = None) -> None:
        if mode not in MEMORY_MODES:
            raise ConfigError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {mode!r}")
        if mode == "stream" and scratch is None:
            raise ConfigError("memory 'stream' needs a scratch folder for its spill files")
        self.mode = mode
        self.device = device
        self.scratch = scratch

    def sink(self, n: int) -> Sink:
        """A new tensor of ``n`` samples, filled batch by batch."""
        if self.mode == "stream":
            assert self.scratch is not None
            return _FileSink(n, self.scratch, self.device)
        where = self.device if self.mode == "device" else torch.device("cpu")
        return _MemorySink(n, where, self.device, pin=self.mode == "cpu" and self.device.type == "cuda")

    def load(self, read: Callable[[slice], torch.Tensor], n: int, chunk: int) -> Cached:
        """A cached copy of ``read(slice)`` over ``n`` samples, read ``chunk`` samples at a time (so
        the store's decoded values never sit in memory whole, except as the in-memory modes' result)."""
        sink = self.sink(n)
        for start in range(0, n, chunk):
            sink.append(read(slice(start, min(start + chunk, n))))
        return sink.finish()

    def derive(self, source: Cached, fn: Callable[[torch.Tensor], torch.Tensor], batch: int) -> Cached:
        """``fn`` applied to ``source`` in order, ``batch`` samples at a time, cached in this mode."""
        sink = self.sink(source.n)
        for start in range(0, source.n, batch):
            sink.append(fn(source.rows(start, min(start + batch, source.n))))
        return sink.finish()


def prefetch(
    caches: Sequence[Cached | None], indices: Sequence[torch.Tensor], depth: int = 2
) -> Generator[list[torch.Tensor | None], None, None]:
    """For every index tensor in order, the rows of every cache (``None`` stays ``None``).

    Disk reads run on one background thread at most ``depth`` mini-batches ahead (bounded memory); the
    device copies and layout changes stay on the calling thread, in order, so the values are the same as
    without read-ahead.
    """
    present = [c for c in caches if c is not None]
    streamed = any(isinstance(c, _RowFile) for c in present)
    if not streamed:
        for idx in indices:
            yield [c.take(idx) if c is not None else None for c in caches]
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptqflow-read") as pool:
        pending: list[Future[list[object]]] = []

        def submit(i: int) -> None:
            idx = indices[i]
            pending.append(pool.submit(lambda: [c.fetch(idx) if c is not None else None for c in caches]))

        for i in range(min(depth, len(indices))):
            submit(i)
        for i in range(len(indices)):
            fetched = pending.pop(0).result()
            if i + depth < len(indices):
                submit(i + depth)
            yield [c.finish(f) if c is not None else None for c, f in zip(caches, fetched, strict=True)]
