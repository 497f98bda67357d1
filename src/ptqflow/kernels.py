"""CPU kernels that give the same bytes on every x86-64 machine, and thread counts that fit the free cores.

Two things make a CPU run's bytes depend on the machine (measured op by op in ``bench/cpu_determinism.py``):

1. **Instruction-set and vendor dispatch.** ATen's vectorised kernels, oneDNN's convolutions and MKL's GEMM
   each pick the widest code path the CPU has (AVX-512 here, AVX2 on another machine) and the wider path adds
   in a different order. :func:`use_kernels` ``("portable")`` caps ATen and oneDNN at AVX2 with the libraries'
   documented switches -- ``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's CPU capability override) and
   ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's ISA cap). MKL also dispatches by CPU *vendor*: capped at AVX2
   (``MKL_ENABLE_INSTRUCTIONS``), its GEMM still gave other bytes on an AMD EPYC than on an Intel Xeon
   (``bench/layer_digests.py``: every convolution of both embedded models agreed, the first linear layer
   did not). MKL's conditional numerical reproducibility branch ``MKL_CBWR=COMPATIBLE`` is the one its
   documentation gives for the same results on Intel and compatible (non-Intel) CPUs; its ``AVX2`` branch
   holds for Intel CPUs only (on others MKL falls back to its default branch, measured: the same bytes as
   without it on the AMD EPYC). CNR needs a fixed thread count, and measured on the AMD EPYC the
   ``COMPATIBLE`` branch's GEMM differs between 1, 2 and 3 threads, so portable mode runs every MKL GEMM on
   one thread (:func:`linear`, :func:`matmul`). The switches are read when each library first computes, so
   they are set before the first CPU op of the process.
2. **The thread count.** oneDNN's convolution backward-by-weights splits its reduction over the threads
   (measured: every conv weight gradient of both embedded models differs between 1 and 2 threads; the
   forward and the input gradient do not), and MKL's GEMM does for a linear layer's weight gradient and,
   on an Intel Xeon, for forwards with a long reduction and few outputs (a classifier). :func:`conv`
   computes the weight gradient single-threaded in portable mode and :func:`linear` / :func:`matmul` every
   GEMM, so the
   layers' outputs and gradients are the same for any thread count (an FP model's own layers take the same
   route inside :func:`portable_layers`). ATen's reduction of many elements to one value splits
   them over the threads too: :func:`fixed_sum` sums in a fixed order, and
   :func:`broadcast_scalar` gives a learned scalar (LSQ's step size) that fixed-order gradient.

``native`` leaves every library at its defaults: fastest, but the bytes then depend on the CPU and on the
thread count. Neither mode touches CUDA (a GPU run is not bit-reproducible across devices anyway).

The second half picks the intra-op thread count: :func:`auto_threads` counts the cores this process may
use (``os.sched_getaffinity``, the cgroup CPU quota) and how many of them other processes leave idle
(``/proc/stat`` over a short window), because two threads on two busy cores wait at the barrier of every
small op of a reconstruction step (issue "Speed and determinism": about 100x slower per iteration).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KERNELS",
    "PORTABLE_ENV",
    "auto_threads",
    "broadcast_scalar",
    "conv",
    "fixed_sum",
    "free_cores",
    "keep_freed_memory",
    "kernels_mode",
    "linear",
    "matmul",
    "portable_layers",
    "set_threads",
    "usable_cores",
    "use_kernels",
]

log = logging.getLogger(__name__)

Kernels = Literal["portable", "native"]
KERNELS: tuple[str, ...] = ("portable", "native")

#: The library switches of portable mode (see the module docstring for what each one pins).
PORTABLE_ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN's older spelling of the same switch
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_CBWR": "COMPATIBLE",  # MKL's branch for the same GEMM bytes on Intel and AMD CPUs (fixed threads)
}

_mode: Kernels = "native"


def use_kernels(mode: Kernels, strict: bool = False) -> bool:
    """Select ``portable`` or ``native`` CPU kernels for this process (see the module docstring).

    Portable mode pins the libraries only before the first CPU computation of the process: they read their
    switches once. Chosen later (a notebook, a test calling the CLI in-process), the fixed-order sums and
    single-threaded weight gradients still apply but the instruction set stays what ATen already picked:
    the return value says so (and a debug log line), or ``strict`` raises. ``ptqflow`` stage commands start a
    fresh process, so there the pin always applies (a stage's bytes are checked across instruction-set caps by
    the tests).

    Returns:
        whether this process's CPU kernels are now on the portable instruction set (``False`` in native mode).

    Raises:
        ValueError: ``mode`` is not one of :data:`KERNELS`.
        RuntimeError: ``strict`` and ATen had already picked a wider code path in this process.
    """
    global _mode
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {mode!r}")
    _mode = mode
    if mode == "native":
        return False
    os.environ.update(PORTABLE_ENV)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        message = f"portable kernels requested after ATen chose {capability}: call use_kernels before any CPU op"
        if strict:
            raise RuntimeError(message)
        log.debug("%s; this process keeps %s, so its bytes may differ from another machine's", message, capability)
        return False
    return capability == "AVX2"  # not on CPUs without AVX2, nor off x86


def kernels_mode() -> Kernels:
    """The mode :func:`use_kernels` set last (``native`` until then)."""
    return _mode


def _portable_grad(on: torch.Tensor, *needing: torch.Tensor) -> bool:
    """Whether a portable-mode replacement applies: portable mode, ``on`` a CPU tensor, and a gradient
    needed for one of ``needing`` (without a gradient every replacement computes what the plain op does)."""
    return _mode == "portable" and on.device.type == "cpu" and any(t.requires_grad for t in needing)


class _PortableConv(torch.autograd.Function):
    """``aten.convolution`` whose weight gradient is computed on one thread (the same bytes for any count).

    The input gradient keeps every thread (its kernel does not split a reduction over them); the bias
    gradient is a :func:`fixed_sum` (measured: oneDNN's differs between 1 and 2 threads for a folded
    MobileNetV2-s's 1x1 convolutions).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups, None if bias is None else list(bias.shape))  # type: ignore[attr-defined]
        zeros = [0] * len(stride)
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        stride, padding, dilation, groups, bias_shape = ctx.conv  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        zeros = [0] * len(stride)
        args = (stride, padding, dilation, False, zeros, groups)
        grad_x = grad_b = grad_w = None
        if need_x:
            grad_x, _, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, *args, [True, False, False])
        if need_b and bias_shape is not None:  # oneDNN's bias gradient splits its reduction over the threads
            grad_b = fixed_sum(grad.transpose(0, 1).reshape(grad.shape[1], -1), dim=1)
        if need_w:
            with _one_thread():
                _, grad_w, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, *args, [False, True, False])
        return grad_x, grad_w, grad_b, None, None, None, None


class _PortableLinear(torch.autograd.Function):
    """``F.linear`` whose every GEMM -- forward, input, weight and bias gradients -- runs on one thread.

    Measured: MKL's GEMM for a classifier's weight gradient (10x16 by 16x64) differs between 1 and 2
    threads on AMD EPYC; on an Intel Xeon (AVX2-capped) so do forwards with a long reduction and a small
    output (64x1280 by 1280x10, MobileNetV2-s's classifier at batch 64; 64x576 by 576x10) and a 1280x64 by
    64x10 product between 2 and 3 threads: MKL then splits the reduction over the threads. One thread
    costs little here: the embedded models' linear layers are their classifiers and ViT-S's small blocks.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        with _one_thread():
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_w = grad_b = None
        with _one_thread():
            grad_x = grad @ weight if need_x else None
        if need_w or (need_b and ctx.has_bias):  # type: ignore[attr-defined]
            rows_g, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
            with _one_thread():
                grad_w = rows_g.t() @ rows_x if need_w else None
                grad_b = rows_g.sum(0) if need_b and ctx.has_bias else None  # type: ignore[attr-defined]
        return grad_x, grad_w, grad_b


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def linear(layer: nn.Linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``layer``'s linear map of ``x`` with ``weight`` and ``bias`` (default: the layer's). In portable mode on
    the CPU every GEMM runs on one thread (:class:`_PortableLinear` when a gradient is needed); otherwise
    ``F.linear``."""
    bias = layer.bias if bias is None else bias
    if _mode != "portable" or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if not _portable_grad(x, x, weight):
        with _one_thread():
            return F.linear(x, weight, bias)
    return _PortableLinear.apply(x, weight, bias)


class _PortableMatmul(torch.autograd.Function):
    """``torch.matmul`` of two activations (attention's ``Q Kᵀ`` and ``P V``) with every GEMM on one thread.

    MKL's GEMM under ``MKL_CBWR=COMPATIBLE`` splits its work differently for 1, 2 and 3 threads (measured on
    an AMD EPYC, 64x1280 by 1280x10 and 256x300 by 300x200), so portable mode keeps the thread count fixed.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        with _one_thread():
            return torch.matmul(a, b)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors  # type: ignore[attr-defined]
        need_a, need_b = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_a = grad_b = None
        with _one_thread():
            if need_a:
                grad_a = _unbroadcast(torch.matmul(grad, b.transpose(-2, -1)), a.shape)
            if need_b:
                grad_b = _unbroadcast(torch.matmul(a.transpose(-2, -1), grad), b.shape)
        return grad_a, grad_b


def _unbroadcast(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``grad`` summed over the leading (batch) dimensions that ``torch.matmul`` broadcast to reach it."""
    extra = grad.dim() - len(shape)
    if extra > 0:
        grad = grad.sum(tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape[:-2]) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)``; in portable mode on the CPU on one thread (:class:`_PortableMatmul` when a
    gradient is needed), so the bytes do not depend on the thread count. Unit bodies call it for every
    activation matmul of a traced model (:mod:`ptqflow.units`)."""
    if _mode != "portable" or a.device.type != "cpu":
        return torch.matmul(a, b)
    if b.dim() == 1:  # torch.matmul's vector rules: a vector is a one-column / one-row matrix, squeezed after
        return matmul(a, b.unsqueeze(-1)).squeeze(-1)
    if a.dim() == 1:
        return matmul(a.unsqueeze(0), b).squeeze(-2)
    if not _portable_grad(a, a, b):
        with _one_thread():
            return torch.matmul(a, b)
    return _PortableMatmul.apply(a, b)


def _explicit_padding(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x`` padded the way ``layer`` pads it, as symmetric integer padding for ``aten.convolution``."""
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), [0] * (x.dim() - 2)
    if layer.padding == "valid":
        return x, [0] * (x.dim() - 2)
    if layer.padding == "same":
        pads, extra = [], []
        for k, d in zip(layer.kernel_size, layer.dilation, strict=True):
            total = d * (k - 1)
            pads.append(total // 2)
            extra.append(total - 2 * (total // 2))  # PyTorch puts an odd pixel after the input
        if any(extra):
            flat = [p for e in reversed(extra) for p in (0, e)]
            x = F.pad(x, flat)
        return x, pads
    return x, list(layer.padding)  # type: ignore[arg-type]


def conv(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``layer``'s convolution of ``x`` with ``weight`` and ``bias`` (default: the layer's): in portable mode
    on the CPU, through :class:`_PortableConv`; otherwise ``layer._conv_forward``. Both give the same forward
    values."""
    bias = layer.bias if bias is None else bias
    if not _portable_grad(x, x, weight):
        return layer._conv_forward(x, weight, bias)
    x, padding = _explicit_padding(layer, x)
    return _PortableConv.apply(x, weight, bias, list(layer.stride), padding, list(layer.dilation), layer.groups)


#: Elements per partial sum of :func:`fixed_sum`; ATen reduces fewer than 32768 elements (its grain) on
#: one thread, and a reduction with several outputs splits the outputs, not the reduced elements.
_ROW = 1024


def fixed_sum(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``t.sum()`` (or ``t.sum(dim)``) in an order that does not depend on the thread count.

    ATen's reduction of many elements to one value gives each thread a slice and adds the partial sums, so
    its bytes change with the thread count (measured: ``x.sum()`` of 10^5 floats, 1 vs 2 threads). Here the
    reduced axis is cut into rows of 1024 (zero-padded, exact) that are summed separately -- a reduction
    with many outputs, split over the outputs -- until fewer than 1024 values remain, then summed on one
    thread. In native mode this is plain ``sum``.
    """
    if _mode != "portable":
        return t.sum() if dim is None else t.sum(dim)
    t = t.reshape(1, -1) if dim is None else t.movedim(dim, -1)
    while t.shape[-1] > _ROW:
        pad = (-t.shape[-1]) % _ROW
        if pad:
            t = F.pad(t, (0, pad))
        t = t.reshape(*t.shape[:-1], -1, _ROW).sum(-1)
    out = t.sum(-1)
    return out.reshape(()) if dim is None else out


class _FixedBroadcast(torch.autograd.Function):
    """``value.expand(shape)`` whose gradient is reduced by :func:`fixed_sum` instead of autograd's sum."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return value.expand(shape)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return fixed_sum(grad).reshape(()), None


def broadcast_scalar(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d ``value`` used elementwise with ``like``: expanded to its shape in portable mode when it needs
    a gradient (its gradient is then a :func:`fixed_sum`, the same bytes for every thread count), else
    returned as is."""
    if not _portable_grad(like, value):
        return value
    return _FixedBroadcast.apply(value, like.shape)


@contextlib.contextmanager
def portable_layers(model: nn.Module, convs: bool = True) -> Iterator[nn.Module]:
    """Within the block, every ``Conv1d/2d/3d`` and ``Linear`` of ``model`` runs through :func:`conv` /
    :func:`linear` (for training a plain model: its weight gradients then do not depend on the thread
    count in portable mode). ``convs=False``: the linear layers only -- for forward passes and input
    gradients, which a convolution computes the same for any thread count, while a linear layer's GEMM
    may not (an FP model's features and logits)."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) if convs else (nn.Linear,)
    layers = [m for m in model.modules() if type(m) in kinds]
    for m in layers:
        m.forward = functools.partial(_layer_forward, m)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward


def _layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return linear(layer, x, layer.weight)
    return conv(layer, x, layer.weight)  # type: ignore[arg-type]


#: glibc ``mallopt`` parameters: ``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc reuse freed blocks instead of returning them to the OS and faulting fresh pages in.

    A reconstruction step allocates dozens of activation-sized temporaries (1.6 MB for a ResNet-20 block
    at batch 32); above glibc's mmap threshold each one is a fresh mapping whose pages fault in on first
    touch, which costs more than the arithmetic (measured: ``y + m * (x - y)`` on 401k floats, 1248 -> 84 us).
    Raising both thresholds keeps such blocks in the heap. Peak memory is unchanged; memory freed after the
    peak is kept for reuse. Returns whether the settings applied (glibc only; a no-op elsewhere).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_ticks() -> dict[int, tuple[int, int]]:
    """``{cpu: (busy ticks, total ticks)}`` from ``/proc/stat`` (idle and iowait count as not busy)."""
    ticks = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total = sum(values)
            ticks[int(name[3:])] = (total - values[3] - values[4], total)
    return ticks


def free_cores(window: float = 0.1) -> float:
    """How many of this process's cores other processes left idle during ``window`` seconds.

    Busy time of this process itself (e.g. its own worker threads still spinning) is not counted against
    it. Without ``/proc/stat`` (not Linux) every usable core counts as free.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
        before, own_before = _cpu_ticks(), time.process_time()
        time.sleep(window)
        after, own = _cpu_ticks(), time.process_time() - own_before
    except (AttributeError, OSError, ValueError):
        return float(usable_cores())
    busy = 0.0
    for cpu in cpus:
        if cpu in before and cpu in after:
            db = after[cpu][0] - before[cpu][0]
            dt = after[cpu][1] - before[cpu][1]
            busy += db / dt if dt > 0 else 0.0
    others = max(0.0, busy - own / window)
    return max(0.0, min(float(usable_cores()), len(cpus) - others))


def auto_threads(window: float = 0.1) -> int:
    """Intra-op threads for this process now: the usable cores that others leave free (at least one)."""
    return max(1, min(usable_cores(), math.floor(free_cores(window) + 0.5)))


def set_threads(setting: int | str) -> int:
    """Set torch's intra-op thread count to ``setting`` (``"auto"``: :func:`auto_threads`); return it.

    Raises:
        ValueError: ``setting`` is neither ``"auto"`` nor an integer >= 1.
    """
    if setting != "auto" and not (isinstance(setting, int) and setting >= 1):
        raise ValueError(f"threads must be 'auto' or an integer >= 1; got {setting!r}")
    threads = auto_threads() if setting == "auto" else int(setting)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
