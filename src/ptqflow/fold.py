"""Batch-norm folding: merge each BN that directly follows a convolution into that convolution.

For a conv with weight W, bias b and a BN with running mean mu, variance var, scale gamma and shift beta,
``BN(conv(x)) = conv'(x)`` with ``W' = W * gamma / sqrt(var + eps)`` (per output channel) and
``b' = (b - mu) * gamma / sqrt(var + eps) + beta`` (Jacob et al., CVPR 2018, section 3.2; BRECQ's
``search_fold_and_remove_bn``). Pairs are found on the traced data-flow graph, not by the order of
``named_children`` -- that order is what mis-folds custom models in the public BRECQ code (BRECQ#40).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from ptqflow.errors import ModelError

__all__ = ["BNStatistics", "bn_statistics", "find_conv_bn_pairs", "fold_bn", "fold_conv_bn"]


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new conv (with bias) equal to ``bn(conv(x))`` in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    folded = copy.deepcopy(conv)
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std  # (C_out,)
    folded.weight.copy_(conv.weight * factor.view(-1, *([1] * (conv.weight.dim() - 1))))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
    return folded


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every BN whose only input is a conv used nowhere else.

    Raises:
        ModelError: the model cannot be traced by ``torch.fx``.
    """
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise ModelError(f"model {type(model).__name__} cannot be traced with torch.fx: {exc}") from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[str(src.target)], nn.Conv2d)
            and len(src.users) == 1
            and calls[str(src.target)] == 1
            and calls[str(node.target)] == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def fold_bn(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every foldable BN merged into its conv.

    Folded BNs become ``nn.Identity`` so module names (and any forward that calls them) keep working.
    BNs that cannot be folded (no conv before them) stay as they are.
    """
    model = copy.deepcopy(model).eval()
    for conv_name, bn_name in find_conv_bn_pairs(model):
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        model.set_submodule(conv_name, fold_conv_bn(conv, bn))
        model.set_submodule(bn_name, nn.Identity())
    return model


@dataclass(frozen=True)
class BNStatistics:
    """What a folded conv forgets about its BN: the running statistics of the conv's own output ``z``
    (before the BN) and the affine map ``y = factor * (z - mean) + shift`` that folding merged into it.

    ``std`` is ``sqrt(running_var + eps)`` (``eps``: the BN's); every tensor is ``(C_out,)``.
    :meth:`pre_bn` recovers ``z`` from the folded conv's output ``y`` for the channels with ``factor != 0``
    (the others are constant after the BN and carry no statistics a correction could use).
    """

    mean: torch.Tensor
    std: torch.Tensor
    factor: torch.Tensor
    shift: torch.Tensor
    eps: float = 1e-5

    def pre_bn(self, y: torch.Tensor) -> torch.Tensor:
        """``z = (y - shift) / factor + mean`` per channel (dim 1); channels with ``factor == 0`` give ``mean``."""
        view = (1, -1) + (1,) * (y.dim() - 2)
        factor = self.factor.to(y).view(view)
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        z = (y - self.shift.to(y).view(view)) / safe + self.mean.to(y).view(view)
        return torch.where(factor == 0, self.mean.to(y).view(view).expand_as(z), z)

    def live(self) -> torch.Tensor:
        """Boolean ``(C_out,)``: the channels whose pre-BN statistics :meth:`pre_bn` can recover."""
        return self.factor != 0


@torch.no_grad()
def bn_statistics(model: nn.Module) -> dict[str, BNStatistics]:
    """For every conv that :func:`fold_bn` folds: its module path -> its BN's :class:`BNStatistics`.

    Read from the unfolded FP model (folding keeps no trace of the running statistics); PD-Quant's
    distribution correction (:func:`ptqflow.recon.reconstruct.correct_inputs`) moves a block's calibration
    input toward them.
    """
    out: dict[str, BNStatistics] = {}
    for conv_name, bn_name in find_conv_bn_pairs(model):
        bn = model.get_submodule(bn_name)
        assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
        out[conv_name] = BNStatistics(
            mean=bn.running_mean.detach().clone().float(),
            std=std.detach().clone().float(),
            factor=(gamma / std).detach().clone().float(),
            shift=beta.detach().clone().float(),
            eps=float(bn.eps),
        )
    return out
