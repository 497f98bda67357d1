"""Sequential block reconstruction: BRECQ (Li et al., ICLR 2021) and QDrop (Wei et al., ICLR 2022).

One generic loop over groups of consecutive units (a group is one unit, or several merged by a plan, as
MRECG does). For each group it takes the quantized-prefix input (the calibration set pushed through the
already reconstructed groups), the FP input, FP target and output gradient streamed from the feature
store, optimises, hard-rounds and moves on.

* ``brecq`` -- two phases, as in BRECQ's released code (algorithms.md section 3): (1) AdaRound on every
  group with activations unquantized, quantized-prefix input and FP target; (2) after all weights, the
  activation step sizes of every group with FP input and target, Adam + cosine, Lp loss with p = 2.4.
* ``qdrop`` -- one phase: AdaRound and activation step sizes jointly; the group input and every
  activation quantizer inside the group keep the quantized value with probability ``keep_prob`` and take
  the FP value otherwise (section 5). ``keep_prob = 1`` is "no drop".

The reconstruction loss is ``mean_{n,h,w} sum_c |y^ - y|^p`` (``mse``, p = 2) or, for ``fisher``,
BRECQ eq. 10 with the cached gradient: ``mean sum_c (y^ - y)^2 (|g| + 1)^2``.

``layerwise=True`` is BRECQ's layer granularity (its table 1 baseline, AdaRound layer by layer): inside
each unit every conv/linear is reconstructed on its own, in order, against its FP output (before the
activation) computed from the unit's cached FP input; its input is the quantized-prefix input pushed
through the unit's already reconstructed layers (QDrop mixes it with the FP input element-wise). The
loss is always ``mse`` there: the cached Fisher weights belong to unit outputs, not layer outputs.
Activation step sizes are learned per unit by BRECQ's activation phase; with ``qdrop`` they keep their
initial (RTN) values, since no activation quantizer lies inside a single layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore
from ptqflow.kernels import fixed_sum
from ptqflow.quant.adaround import beta_schedule
from ptqflow.quant.model import QuantModel
from ptqflow.quant.quantizer import ActQuantizer
from ptqflow.quant.units import QuantLayer, QuantUnit

__all__ = ["ReconConfig", "Step", "plan_steps", "reconstruct", "reconstruction_loss"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconConfig:
    """Hyperparameters of :func:`reconstruct` (defaults: the papers' ImageNet settings).

    Args:
        method: ``brecq`` (two phases) or ``qdrop`` (joint, with drop).
        iters: iterations per group for the weights (BRECQ phase 1) or the joint phase (QDrop).
        act_iters: iterations per group of BRECQ's activation phase.
        batch_size: calibration samples per iteration.
        weight_lr: Adam learning rate of the AdaRound variables V.
        act_lr: Adam learning rate of the activation step sizes (QDrop's ``scale_lr``).
        brecq_act_lr: learning rate of BRECQ's activation phase.
        reg_weight: lambda, the weight of the rounding regulariser (0.01 ResNet, 0.1 MobileNetV2).
        warmup: fraction of iterations before the regulariser starts.
        beta_start: beta at the end of warm-up.
        beta_end: beta at the last iteration.
        keep_prob: QDrop's probability of keeping the *quantized* value (the public code's
            ``drop_prob``/``prob`` means the same, despite its name).
        loss: ``mse`` or ``fisher`` (diagonal-Fisher weighted, from the cached gradients).
        p: exponent of the reconstruction loss (QDrop 2.0; BRECQ's activation phase uses 2.4).
        lsq_grad_scale: LSQ gradient scaling of activation steps (QDrop's ``qdrop`` branch).
        seed: seeds sampling and drop masks (each group reseeds, so a resumed run matches a full one).
    """

    method: Literal["brecq", "qdrop"] = "qdrop"
    iters: int = 20000
    act_iters: int = 5000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    brecq_act_lr: float = 4e-4
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    keep_prob: float = 0.5
    loss: Literal["mse", "fisher"] = "mse"
    p: float = 2.0
    lsq_grad_scale: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters", "act_iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("weight_lr", "act_lr", "brecq_act_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.reg_weight < 0:
            raise ConfigError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.keep_prob <= 1:
            raise ConfigError(f"keep_prob must be in [0, 1], got {self.keep_prob}")
        if not 1 <= self.p <= 4:
            raise ConfigError(f"p must be in [1, 4], got {self.p}")
        if self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ConfigError(f"need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}")


@dataclass(frozen=True)
class Step:
    """One optimisation step of the loop: a phase on a group of consecutive unit indices."""

    phase: Literal["weights", "acts", "joint", "layers"]
    group: tuple[int, ...]


def plan_steps(method: str, groups: Sequence[Sequence[int]], layerwise: bool = False) -> list[Step]:
    """The ordered steps of ``method`` over ``groups`` (BRECQ: all weights, then all activations).

    With ``layerwise`` the weight step of a group reconstructs its layers one at a time (``layers``).
    """
    if method == "brecq":
        weights: Literal["weights", "layers"] = "layers" if layerwise else "weights"
        return [Step(weights, tuple(g)) for g in groups] + [Step("acts", tuple(g)) for g in groups]
    return [Step("layers" if layerwise else "joint", tuple(g)) for g in groups]


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None, p: float) -> torch.Tensor:
    """``mean over (n, h, w) of sum over c`` of ``|pred - target|^p``, Fisher-weighted if ``grad`` is given."""
    diff = (pred - target).abs()
    if grad is not None:
        err = diff.pow(2) * (grad.abs() + 1).pow(2)  # BRECQ eq. 10, damped by 1 as in its code
    else:
        err = diff.pow(p)
    per_position = err.sum(dim=1)
    return fixed_sum(per_position) / per_position.numel()


class _Group(nn.Module):
    def __init__(self, units: Sequence[nn.Module]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


def _act_quantizers(group: _Group) -> list[ActQuantizer]:
    return [m for m in group.modules() if isinstance(m, ActQuantizer)]


@torch.no_grad()
def _forward_all(module: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([module(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def _eval_loss(group: _Group, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        total += float(reconstruction_loss(group(x[i : i + batch_size]), y[i : i + batch_size], None, 2.0)) * len(
            x[i : i + batch_size]
        )
    return total / x.shape[0]


ProgressFactory = Callable[[int, str], Callable[[int, float], None]]


def reconstruct(
    model: QuantModel,
    store: FeatureStore,
    groups: Sequence[Sequence[int]],
    config: ReconConfig,
    device: torch.device,
    *,
    start: int = 0,
    skip: frozenset[int] = frozenset(),
    layerwise: bool = False,
    on_step_done: Callable[[int, Step, dict[str, float]], None] | None = None,
    progress: ProgressFactory | None = None,
) -> list[dict[str, float]]:
    """Reconstruct ``model`` in place, group by group.

    Args:
        model: the quantized model, weight and activation ranges initialised (RTN).
        store: the FP feature store of the same model.
        groups: consecutive unit indices per group, covering every unit in order.
        config: hyperparameters.
        device: where to optimise.
        start: the first step to run; earlier steps are taken as done (resume: their units must
            already hold their reconstructed state).
        skip: units never reconstructed (BRECQ's stem): a group made only of them keeps RTN.
        layerwise: reconstruct layer by layer inside each group (BRECQ's layer granularity).
        on_step_done: called after each step with its index, the step and its stats (write resume
            state there).
        progress: ``progress(total, label)`` returns ``update(iteration, loss)`` for a progress bar.

    Returns:
        One stats dict per step run: ``{"loss_before", "loss_after", "seconds"}`` (full-set MSE of
        the group output against the FP target, all quantizers on).
    """
    flat = [i for g in groups for i in g]
    if flat != list(range(len(model.units))):
        raise ConfigError(f"reconstruction groups must cover units 0..{len(model.units) - 1} in order, got {groups}")
    steps = plan_steps(config.method, groups, layerwise)
    n = store.num_samples
    eval_batch = max(config.batch_size, 64)
    # channels_last: about 2x faster convolutions on the CPU for these nets (measured in training).
    model.to(device).to(memory_format=torch.channels_last)
    x_q = _load(store, store.units[0], "inputs", n, device)  # quantized-prefix input
    stats: list[dict[str, float]] = []
    for index, step in enumerate(steps):
        first, last = step.group[0], step.group[-1]
        group = _Group([model.units[i] for i in step.group])
        acts_during = step.phase != "weights" and not (step.phase == "layers" and config.method == "brecq")
        if index < start or set(step.group) <= skip:
            if step.phase != "acts":
                model.set_quant_state(weight=True, act=acts_during)
                x_q = _forward_all(group, x_q, eval_batch)
            continue
        began = time.perf_counter()
        torch.manual_seed(config.seed * 1_000_003 + index)
        x_fp = _load(store, store.units[first], "inputs", n, device)
        y_fp = _load(store, store.units[last], "outputs", n, device)
        grad = _load(store, store.units[last], "grads", n, device) if config.loss == "fisher" else None
        x_in = x_fp if step.phase == "acts" else x_q
        model.set_quant_state(weight=True, act=True)
        before = _eval_loss(group, x_in, y_fp, eval_batch)
        label = f"{step.phase} {'+'.join(store.units[i] for i in step.group)}"
        total = config.act_iters if step.phase == "acts" else config.iters
        if step.phase == "layers":
            total *= sum(1 for m in group.modules() if isinstance(m, QuantLayer))
        update = progress(total, label) if progress else None
        model.set_quant_state(weight=True, act=acts_during)
        if step.phase == "acts":
            _optimise_acts(group, x_fp, y_fp, grad, config, update)
        elif step.phase == "layers":
            _optimise_layers(group, x_q, x_fp, config, acts_during, update)
        else:
            _optimise_weights(group, x_q, x_fp, y_fp, grad, config, joint=step.phase == "joint", update=update)
        model.set_quant_state(weight=True, act=True)
        after = _eval_loss(group, x_in, y_fp, eval_batch)
        if step.phase != "acts":
            model.set_quant_state(weight=True, act=acts_during)
            x_q = _forward_all(group, x_q, eval_batch)
        row = {"loss_before": before, "loss_after": after, "seconds": time.perf_counter() - began}
        log.info("%s: loss %.5g -> %.5g (%.1fs)", label, before, after, row["seconds"])
        stats.append(row)
        if on_step_done is not None:
            on_step_done(index, step, row)
    model.set_quant_state(weight=True, act=True)
    model.to(memory_format=torch.contiguous_format)
    return stats


def _load(store: FeatureStore, unit: str, what: str, n: int, device: torch.device) -> torch.Tensor:
    """All ``n`` calibration samples of one cached quantity, read once per step, on ``device``."""
    tensor: torch.Tensor = getattr(store.unit(unit), what)(slice(0, n)).to(device)
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def _sample(n: int, batch: int, method: str) -> torch.Tensor:
    # BRECQ draws without replacement (randperm), QDrop with replacement (randint).
    return torch.randperm(n)[:batch] if method == "brecq" else torch.randint(0, n, (batch,))


def _optimise_weights(
    group: _Group,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    y_fp: torch.Tensor,
    grad: torch.Tensor | None,
    config: ReconConfig,
    joint: bool,
    update: Callable[[int, float], None] | None,
) -> None:
    layers = [m for m in group.modules() if isinstance(m, QuantLayer)]
    rounding = [layer.start_adaround() for layer in layers]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam([r.v for r in rounding], lr=config.weight_lr)]
    scheduler = None
    quantizers = _act_quantizers(group)
    if joint:
        for q in quantizers:
            q.keep_prob = config.keep_prob
            q.lsq_grad_scale = config.lsq_grad_scale
        scales = [q.scale for q in quantizers]
        if scales:
            act_opt = torch.optim.Adam(scales, lr=config.act_lr)
            optimizers.append(act_opt)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=config.iters, eta_min=0.0)
    for layer in layers:
        layer.layer.weight.requires_grad_(False)
        if layer.layer.bias is not None:
            layer.layer.bias.requires_grad_(False)
    n = x_q.shape[0]
    try:
        for t in range(config.iters):
            idx = _sample(n, config.batch_size, config.method)
            x = x_q[idx]
            if joint and config.keep_prob < 1.0:
                x = torch.where(torch.rand_like(x) < config.keep_prob, x, x_fp[idx])
            rec = reconstruction_loss(group(x), y_fp[idx], grad[idx] if grad is not None else None, config.p)
            beta = beta_schedule(t, config.iters, config.warmup, config.beta_start, config.beta_end)
            loss = rec
            if beta is not None and config.reg_weight > 0:
                loss = rec + config.reg_weight * sum(r.regularizer(beta) for r in rounding)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            for opt in optimizers:
                opt.step()
            if scheduler is not None:
                scheduler.step()
            if update is not None:
                update(t + 1, rec.item())
    finally:
        for layer in layers:
            layer.finish_adaround()
        for q in quantizers:
            q.keep_prob = 1.0
            q.lsq_grad_scale = False
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


@torch.no_grad()
def _capture(group: _Group, layer: QuantLayer, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s input and output while ``group`` runs on ``x`` (in its current quantization state)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(out.detach())

    handle = layer.register_forward_hook(hook)
    try:
        for i in range(0, x.shape[0], batch_size):
            group(x[i : i + batch_size])
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


def _set_group_state(group: _Group, weight: bool, act: bool) -> None:
    for unit in group.units:
        if isinstance(unit, QuantUnit):
            unit.set_quant_state(weight, act)


def _optimise_layers(
    group: _Group,
    x_q: torch.Tensor,
    x_fp: torch.Tensor,
    config: ReconConfig,
    acts: bool,
    update: Callable[[int, float], None] | None,
) -> None:
    """AdaRound every layer of ``group`` on its own, in order (BRECQ's layer granularity)."""
    layers = [m for m in group.modules() if isinstance(m, QuantLayer)]
    batch = max(config.batch_size, 64)
    for index, layer in enumerate(layers):
        _set_group_state(group, weight=False, act=False)
        x_fp_layer, y_fp_layer = _capture(group, layer, x_fp, batch)  # FP input and target of this layer
        _set_group_state(group, weight=True, act=acts)
        x_q_layer, _ = _capture(group, layer, x_q, batch)  # earlier layers already hard-rounded
        offset = index * config.iters

        def shifted(t: int, loss: float, offset: int = offset) -> None:
            if update is not None:
                update(offset + t, loss)

        single = _Group([layer])
        _optimise_weights(single, x_q_layer, x_fp_layer, y_fp_layer, None, config, joint=acts, update=shifted)


def _optimise_acts(
    group: _Group,
    x_fp: torch.Tensor,
    y_fp: torch.Tensor,
    grad: torch.Tensor | None,
    config: ReconConfig,
    update: Callable[[int, float], None] | None,
) -> None:
    quantizers = _act_quantizers(group)
    scales = [q.scale for q in quantizers]
    if not scales:
        return
    for q in quantizers:
        q.lsq_grad_scale = config.lsq_grad_scale
    opt = torch.optim.Adam(scales, lr=config.brecq_act_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.act_iters, eta_min=0.0)
    params = [p for p in group.parameters() if p.requires_grad and all(p is not s for s in scales)]
    for p in params:
        p.requires_grad_(False)
    n = x_fp.shape[0]
    try:
        for t in range(config.act_iters):
            idx = _sample(n, config.batch_size, "brecq")
            loss = reconstruction_loss(group(x_fp[idx]), y_fp[idx], grad[idx] if grad is not None else None, 2.4)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            scheduler.step()
            if update is not None:
                update(t + 1, loss.item())
    finally:
        for q in quantizers:
            q.lsq_grad_scale = False
        for p in params:
            p.requires_grad_(True)
