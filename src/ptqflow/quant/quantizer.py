"""Uniform affine quantizers with an Lp-norm range search.

Notation (algorithms.md section 1): ``Q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)`` on an unsigned,
asymmetric grid. The symmetric scheme (TensorRT's: signed integers, zero point 0) is the same formula with
``z = 2^(b-1)`` fixed: the centred integers ``q - z`` span ``[-2^(b-1), 2^(b-1) - 1]``, the grid holds 0
exactly, and only the step is searched (and learned). Weights are quantized per output channel,
activations per tensor. The range is chosen as in BRECQ's ``mse`` initialiser: shrink ``[min, max]`` by
1 % steps (80 candidates) and keep the one minimising ``mean |x - Q(x)|^p`` with ``p = 2.4`` (the Lp norm
of LAPQ, Nahshan et al. 2021). Rounding uses the straight-through estimator, so activation step sizes can
be learned (LSQ, Esser et al., ICLR 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ptqflow.kernels import broadcast_scalar, fixed_sum

__all__ = [
    "ActQuantizer",
    "Log2ActQuantizer",
    "WeightQuantizer",
    "check_bits",
    "fake_quantize",
    "log2_fake_quantize",
    "lp_range_search",
    "qdrop_mix",
    "round_ste",
]

_EPS = 1e-8
#: Upper bound on the activation elements an Lp search looks at (a strided subsample beyond it).
MAX_SEARCH_ELEMENTS = 1 << 18
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise ``ValueError`` naming ``what``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"{what} must be an integer in 2..8, got {bits!r}")
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


class _Clamp(torch.autograd.Function):
    """``clamp(v, 0, top)`` whose backward multiplies by the strictly-in-range mask: the gradient of ``torch.clamp``
    (zero outside the range) without ``aten::where``, which on the CPU costs about 10x an elementwise
    product (measured: 460 us vs 30 us on a 32x16x28x28 activation).

    The mask is a 0/1 tensor of ``v``'s dtype, written by the comparisons themselves (``out=``): a bool mask
    costs a conversion in every product that reads it, and on a channels-last activation a bool-output
    comparison and a float-by-bool product are each several times a float product (measured on the 2-core
    AMD EPYC, 32x16x28x28, one thread: 0.3 ms per bool comparison and 3.9 ms per product against 0.1 ms)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, v: torch.Tensor, top: float) -> torch.Tensor:
        # as torch.clamp: no gradient at the bounds themselves
        inside = torch.gt(v, 0, out=torch.empty_like(v))
        inside.mul_(torch.lt(v, top, out=torch.empty_like(v)))
        ctx.save_for_backward(inside)
        return v.clamp(0, top)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (inside,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * inside, None


def qdrop_mix(q: torch.Tensor, x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """QDrop's element-wise mix ``where(u < keep_prob, q, x)``, ``u ~ U[0, 1)`` drawn like ``x`` (Wei et al.,
    ICLR 2022, eq. 7), as products with a 0/1 mask: ``q * m + x * (1 - m)``, the same values (one term is an
    exact zero) and ~10x faster than ``aten::where`` forward and backward on the CPU. The mask is the draw
    itself compared in place (``lt_``: 1.0/0.0 in ``x``'s dtype), never a bool tensor, whose products cost a
    conversion each (:class:`_Clamp`)."""
    keep = torch.rand_like(x).lt_(keep_prob)
    return q * keep + x * (1.0 - keep)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)`` with a straight-through round."""
    if not torch.is_grad_enabled() or not (x.requires_grad or scale.requires_grad):
        # Inference: the same arithmetic in place, without the STE's extra passes over the tensor.
        return torch.div(x, scale).round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point).mul_(scale)
    q = _Clamp.apply(round_ste(x / scale) + zero_point, float(2**bits - 1))
    return (q - zero_point) * scale


@torch.no_grad()
def lp_range_search(
    x: torch.Tensor, bits: int, p: float = 2.4, steps: int = 80, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point minimising ``mean |x - Q(x)|^p`` over shrunk ranges.

    Args:
        x: ``(rows, elements)``: one row per output channel (weights) or a single row (activations).
        bits: bit-width b.
        p: the norm's exponent.
        steps: candidates ``[min, max] * (1 - 0.01 i)``, ``i = 0 .. steps - 1``.
        symmetric: the signed grid (zero point ``2^(b-1)``): candidates ``max |x| * (1 - 0.01 i)`` mapped to
            the largest positive integer, ``s = m / (2^(b-1) - 1)`` (TensorRT's max calibration, shrunk).

    Returns:
        ``(scale, zero_point)``, each ``(rows,)``; the zero point is an integer in ``[0, 2^b - 1]``.
    """
    x = x.float()
    qmax = 2**bits - 1
    if symmetric:
        amax = x.abs().amax(dim=1)
        xmin, xmax = -amax * (2 ** (bits - 1)) / (2 ** (bits - 1) - 1), amax
    else:
        xmin = x.amin(dim=1)
        xmax = x.amax(dim=1)
    best_score = torch.full_like(xmin, float("inf"))
    best_scale = torch.ones_like(xmin)
    best_zero = torch.zeros_like(xmin)
    for i in range(steps):
        factor = 1.0 - 0.01 * i
        lo, hi = xmin * factor, xmax * factor
        scale = ((hi - lo) / qmax).clamp_min(_EPS)
        zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else (-lo / scale).round().clamp(0, qmax)
        q = fake_quantize(x, scale[:, None], zero[:, None], bits)
        score = fixed_sum((x - q).abs().pow(p), dim=1) / x.shape[1]
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


class WeightQuantizer(nn.Module):
    """Per-output-channel weight quantizer (scale and zero point frozen after init).

    Args:
        bits: bit-width b.
        channels: output channels (the first dimension of the weight).
        symmetric: the signed grid with zero point ``2^(b-1)`` (module docstring); else asymmetric.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, bits: int, channels: int, symmetric: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits, "weight bits")
        self.symmetric = symmetric
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels))
        self.initialized = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}" + (", symmetric" if self.symmetric else "")

    def init_range(self, weight: torch.Tensor, p: float = 2.4) -> None:
        """Choose scale and zero point for ``weight`` by the Lp search (BRECQ's ``mse`` init)."""
        scale, zero = lp_range_search(
            weight.detach().reshape(weight.shape[0], -1), self.bits, p, symmetric=self.symmetric
        )
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)
        self.initialized = True

    def _shape(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (-1,) + (1,) * (weight.dim() - 1)
        return self.scale.view(view), self.zero_point.view(view)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zero = self._shape(weight)
        return fake_quantize(weight, scale, zero, self.bits)


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a learnable step size (LSQ).

    Lifecycle: ``observe`` collects calibration activations, :meth:`init_range` runs the Lp search, then
    the quantizer is applied whenever ``enabled``. The zero point stays fixed after init.

    Args:
        bits: bit-width b.
        symmetric: the signed grid with zero point ``2^(b-1)`` (module docstring); else asymmetric.
    """

    zero_point: torch.Tensor

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.symmetric = symmetric
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        self.enabled = True
        #: QDrop (Wei et al., ICLR 2022, eq. 7): while < 1, each element keeps its quantized value with this
        #: probability and its FP value otherwise; a fresh mask every call. 1.0 = always quantized.
        self.keep_prob = 1.0
        #: LSQ's gradient scale 1/sqrt(numel * Qmax) on the step size (Esser et al. 2020, section 2.2).
        self.lsq_grad_scale = False
        self.observing = False
        self._observed: list[torch.Tensor] = []
        self.initialized = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (", symmetric" if self.symmetric else "")

    def _take_observed(self) -> torch.Tensor:
        """The observed activations, flattened (a deterministic strided subsample beyond the search bound);
        stops observing."""
        if not self._observed:
            raise RuntimeError(f"{type(self).__name__}.init_range: no activations observed; run calibration first")
        flat = torch.cat([t.reshape(-1) for t in self._observed])
        if flat.numel() > MAX_SEARCH_ELEMENTS:
            flat = flat[:: flat.numel() // MAX_SEARCH_ELEMENTS + 1]
        self._observed.clear()
        self.observing = False
        self.initialized = True
        return flat

    @torch.no_grad()
    def init_range(self, p: float = 2.4) -> None:
        """Set scale and zero point from the observed activations; stop observing."""
        scale, zero = lp_range_search(self._take_observed()[None, :], self.bits, p, symmetric=self.symmetric)
        self.scale.copy_(scale[0])
        self.zero_point.copy_(zero[0])

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The quantize-dequantize of ``x`` at step ``scale`` (uniform grid)."""
        return fake_quantize(x, scale, self.zero_point, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observed.append(x.detach().float().cpu())
            return x
        if not self.enabled:
            return x
        scale: torch.Tensor = self.scale
        if self.lsq_grad_scale and scale.requires_grad:
            g = 1.0 / math.sqrt(x.numel() * (2**self.bits - 1))
            scale = (scale - scale * g).detach() + scale * g  # forward: s; backward: g * ds
        q = self.fake_quantize(x, broadcast_scalar(scale.abs().clamp_min(_EPS), x))
        if self.keep_prob < 1.0:
            return qdrop_mix(q, x, self.keep_prob)
        return q


def log2_fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(x) = s * 2^-c`` with ``c = clamp(round(-log2(x / s)), 0, 2^b - 1)``, and 0 where ``c = 2^b - 1``.

    The power-of-two grid of the ViT PTQ literature for post-softmax values (FQ-ViT, Lin et al., IJCAI 2022,
    its log2 quantizer; RepQ-ViT, Li et al., ICCV 2023, uses base sqrt(2)): ``2^b - 1`` levels
    ``s, s/2, ..., s/2^(2^b-2)`` plus zero (values below the smallest level underflow to zero, as a
    probability that small contributes nothing), so a b-bit code holds it. Inputs are non-negative (softmax
    outputs). Straight-through round.
    """
    top = 2**bits - 1
    code = -torch.log2((x / scale).clamp_min(2.0 ** -(top + 1)))
    code = round_ste(code).clamp(0, top) if torch.is_grad_enabled() else code.round_().clamp_(0, top)
    return torch.where(code < top, scale * torch.exp2(-code), torch.zeros_like(x))


class Log2ActQuantizer(ActQuantizer):
    """A :class:`ActQuantizer` on the power-of-two grid of :func:`log2_fake_quantize` (softmax outputs).

    The range search picks ``s`` from ``max * 2^(-i/16)``, ``i = 0..31``, by the same Lp error as the uniform
    search. Under the straight-through round ``Q(x) ~ x`` does not depend on ``s``, so LSQ's gradient on the
    step vanishes and the searched ``s`` stays (no learned step, unlike the uniform quantizer); QDrop's drop
    and the observe/init lifecycle are the same. No ONNX QDQ pair expresses this grid: export refuses it.
    """

    @torch.no_grad()
    def init_range(self, p: float = 2.4) -> None:
        flat = self._take_observed()
        top = float(flat.max().clamp_min(_EPS))
        best_score, best_scale = float("inf"), top
        for i in range(32):
            scale = top * 2.0 ** (-i / 16)
            err = (flat - log2_fake_quantize(flat, torch.tensor(scale), self.bits)).abs().pow(p)
            score = float(fixed_sum(err)) / err.numel()
            if score < best_score:
                best_score, best_scale = score, scale
        self.scale.fill_(best_scale)
        self.zero_point.zero_()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=log2"

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return log2_fake_quantize(x, scale, self.bits)
