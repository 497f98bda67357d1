"""AdaRound: learned up/down rounding of weights (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020), as BRECQ and QDrop use it (algorithms.md section 2).

Soft weight (eq. 22/23 of the paper)::

    W~ = s * (clamp(floor(W / s) + h(V) + z, 0, 2^b - 1) - z),   h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

with the rectified sigmoid's zeta = 1.1, gamma = -0.1. V starts where h(V) equals the fractional part of
W / s, so the soft weight starts equal to the FP weight inside the clipping range. The regulariser
``sum(1 - |2 h(V) - 1|^beta)`` (eq. 24) pushes every h(V) to 0 or 1; beta is annealed from 20 to 2.

With ``learn_scale`` the per-channel step s is a parameter too, learned jointly with V and the activation
steps (Genie-M, the reconstruction half of Jeon et al., "Genie: Show Me the Data for Quantization", CVPR
2023; algorithms.md section 9): the integer part ``floor(W / s0)`` stays the one of the initial step s0, so
the soft weight is ``s * (clamp(floor(W / s0) + h(V) + z, 0, 2^b - 1) - z)`` and its gradient with respect
to s is the integer grid value times the incoming gradient (no straight-through estimate is needed).
"""

from __future__ import annotations

import torch
from torch import nn

from ptqflow.kernels import fixed_sum

__all__ = ["GAMMA", "MIN_SCALE", "ZETA", "AdaRound", "beta_schedule"]

ZETA = 1.1
GAMMA = -0.1
#: The smallest step a learned weight scale may take (a step driven to zero or below would void the grid).
MIN_SCALE = 1e-8


class AdaRound(nn.Module):
    """Learned rounding for one weight tensor, on the grid of a frozen per-channel quantizer.

    Args:
        weight: the FP weight ``(C_out, ...)``.
        scale: per-channel step ``(C_out,)``.
        zero_point: per-channel integer zero point ``(C_out,)``.
        bits: bit-width b.
        learn_scale: the step is a parameter (Genie-M, see the module docstring), else a frozen buffer.
    """

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, learn_scale: bool = False
    ) -> None:
        super().__init__()
        view = (-1,) + (1,) * (weight.dim() - 1)
        self.bits = bits
        initial = scale.detach().view(view).clone()
        if learn_scale:
            self.scale = nn.Parameter(initial)
        else:
            self.register_buffer("scale", initial)
        self.register_buffer("zero_point", zero_point.detach().view(view).clone())
        w = weight.detach() / initial
        self.register_buffer("floor", w.floor())
        rest = (w - self.floor).clamp(1e-6, 1 - 1e-6)  # fractional part, kept off 0 and 1 so V is finite
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    scale: torch.Tensor
    zero_point: torch.Tensor
    floor: torch.Tensor

    def h(self) -> torch.Tensor:
        """The rectified sigmoid h(V) in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self) -> torch.Tensor:
        """The soft weight (training) or the hard-rounded weight (``soft=False``)."""
        up = self.h() if self.soft else (self.v >= 0).to(self.floor.dtype)
        q = torch.clamp(self.floor + up + self.zero_point, 0, 2**self.bits - 1)
        scale = self.scale.clamp_min(MIN_SCALE) if isinstance(self.scale, nn.Parameter) else self.scale
        return (q - self.zero_point) * scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)`` over every weight (a sum, not a mean, as in BRECQ/QDrop)."""
        return fixed_sum(1 - (2 * self.h() - 1).abs().pow(beta))


def beta_schedule(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """Annealed beta at ``step``, or ``None`` during warm-up (the regulariser is off then).

    After ``warmup * total`` steps beta falls linearly from ``start`` to ``end`` (BRECQ's
    ``LinearTempDecay``).
    """
    begin = warmup * total
    if step < begin:
        return None
    progress = (step - begin) / max(1.0, total - begin)
    return end + (start - end) * max(0.0, 1.0 - progress)
