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
from pathlib import Path
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
from ptqflow.recon.cache import Cached, Memory, peak_memory_mb, prefetch

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
        weight_scale_lr: Adam learning rate of the per-channel weight steps, learned with V (Genie-M,
            Jeon et al. CVPR 2023: 1e-4 in its public recipe); 0 keeps them frozen (BRECQ, QDrop).
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
        seed: seeds sampling and drop masks (each group reseeds, so a resumed run matches a full one);
            the mini-batch indices come from a generator of their own, drawn before the loop, so that
            ``memory="stream"`` can read ahead (:mod:`ptqflow.recon.cache`).
    """

    method: Literal["brecq", "qdrop"] = "qdrop"
    iters: int = 20000
    act_iters: int = 5000
    batch_size: int = 32
    weight_lr: float = 1e-3
    weight_scale_lr: float = 0.0
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
        if self.weight_scale_lr < 0:
            raise ConfigError(f"weight_scale_lr must be >= 0 (0: frozen weight steps), got {self.weight_scale_lr}")
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
def _forward_all(module: nn.Module, x: Cached, batch_size: int, memory: Memory) -> Cached:
    return memory.derive(x, module, batch_size)


@torch.no_grad()
def _eval_loss(group: _Group, x: Cached, y: Cached, batch_size: int) -> float:
    total = 0.0
    for i in range(0, x.n, batch_size):
        stop = min(i + batch_size, x.n)
        total += float(reconstruction_loss(group(x.rows(i, stop)), y.rows(i, stop), None, 2.0)) * (stop - i)
    return total / x.n


def _sampler_seed(seed: int, step: int) -> int:
    """Seed of a step's mini-batch sampler, apart from the global generator that draws the drop masks:
    the sampler's draws are known before the loop runs, so the ``stream`` mode can read ahead."""
    return (seed * 1_000_003 + step) * 2 + 1


def _close(*caches: Cached | None) -> None:
    for cache in caches:
        if cache is not None:
            cache.close()


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
    memory: str = "device",
    scratch: Path | None = None,
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
        memory: where the step's cached tensors live, ``device``, ``cpu`` or ``stream``
            (:mod:`ptqflow.recon.cache`); the result is the same bytes whichever is chosen.
        scratch: folder for ``stream``'s spill files (uncompressed float32; about four of the largest
            unit tensors at once).
        on_step_done: called after each step with its index, the step and its stats (write resume
            state there).
        progress: ``progress(total, label)`` returns ``update(iteration, loss)`` for a progress bar.

    Returns:
        One stats dict per step run: ``{"loss_before", "loss_after", "seconds", "iter_ms",
        "peak_rss_mb"}`` (losses: full-set MSE of the group output against the FP target, all quantizers
        on; ``iter_ms``: wall milliseconds per optimisation iteration; ``peak_rss_mb``: the process's peak
        resident memory so far, and ``peak_device_mb`` on CUDA).
    """
    flat = [i for g in groups for i in g]
    if flat != list(range(len(model.units))):
        raise ConfigError(f"reconstruction groups must cover units 0..{len(model.units) - 1} in order, got {groups}")
    steps = plan_steps(config.method, groups, layerwise)
    space = Memory(memory, device, scratch)
    n = store.num_samples
    eval_batch = max(config.batch_size, 64)
    # channels_last: about 2x faster convolutions on the CPU for these nets (measured in training).
    model.to(device).to(memory_format=torch.channels_last)

    def cached(unit: str, what: str) -> Cached:
        return space.load(getattr(store.unit(unit), what), n, eval_batch)

    x_q = cached(store.units[0], "inputs")  # quantized-prefix input
    stats: list[dict[str, float]] = []
    try:
        for index, step in enumerate(steps):
            first, last = step.group[0], step.group[-1]
            group = _Group([model.units[i] for i in step.group])
            acts_during = step.phase != "weights" and not (step.phase == "layers" and config.method == "brecq")
            if index < start or set(step.group) <= skip:
                if step.phase != "acts":
                    model.set_quant_state(weight=True, act=acts_during)
                    x_q, old = _forward_all(group, x_q, eval_batch, space), x_q
                    old.close()
                continue
            began = time.perf_counter()
            torch.manual_seed(config.seed * 1_000_003 + index)
            sampler = torch.Generator().manual_seed(_sampler_seed(config.seed, index))
            x_fp = cached(store.units[first], "inputs")
            y_fp = cached(store.units[last], "outputs")
            grad = cached(store.units[last], "grads") if config.loss == "fisher" else None
            try:
                x_in = x_fp if step.phase == "acts" else x_q
                model.set_quant_state(weight=True, act=True)
                before = _eval_loss(group, x_in, y_fp, eval_batch)
                label = f"{step.phase} {'+'.join(store.units[i] for i in step.group)}"
                total = config.act_iters if step.phase == "acts" else config.iters
                if step.phase == "layers":
                    total *= sum(1 for m in group.modules() if isinstance(m, QuantLayer))
                update = progress(total, label) if progress else None
                model.set_quant_state(weight=True, act=acts_during)
                looped = time.perf_counter()
                if step.phase == "acts":
                    _optimise_acts(group, x_fp, y_fp, grad, config, update, sampler)
                elif step.phase == "layers":
                    _optimise_layers(group, x_q, x_fp, config, acts_during, update, sampler, space)
                else:
                    joint = step.phase == "joint"
                    _optimise_weights(group, x_q, x_fp, y_fp, grad, config, joint, update, sampler)
                loop_ms = (time.perf_counter() - looped) * 1000 / total
                model.set_quant_state(weight=True, act=True)
                after = _eval_loss(group, x_in, y_fp, eval_batch)
                if step.phase != "acts":
                    model.set_quant_state(weight=True, act=acts_during)
                    x_q, old = _forward_all(group, x_q, eval_batch, space), x_q
                    old.close()
            finally:
                _close(x_fp, y_fp, grad)
            row = {
                "loss_before": before,
                "loss_after": after,
                "seconds": time.perf_counter() - began,
                "iter_ms": loop_ms,
                **peak_memory_mb(device),
            }
            log.info("%s: loss %.5g -> %.5g (%.1fs)", label, before, after, row["seconds"])
            stats.append(row)
            if on_step_done is not None:
                on_step_done(index, step, row)
    finally:
        x_q.close()
    model.set_quant_state(weight=True, act=True)
    model.to(memory_format=torch.contiguous_format)
    return stats


def _sample(n: int, batch: int, method: str, generator: torch.Generator) -> torch.Tensor:
    # BRECQ draws without replacement (randperm), QDrop with replacement (randint).
    if method == "brecq":
        return torch.randperm(n, generator=generator)[:batch]
    return torch.randint(0, n, (batch,), generator=generator)


def _optimise_weights(
    group: _Group,
    x_q: Cached,
    x_fp: Cached,
    y_fp: Cached,
    grad: Cached | None,
    config: ReconConfig,
    joint: bool,
    update: Callable[[int, float], None] | None,
    sampler: torch.Generator,
) -> None:
    layers = [m for m in group.modules() if isinstance(m, QuantLayer)]
    learn_scale = config.weight_scale_lr > 0
    rounding = [layer.start_adaround(learn_scale) for layer in layers]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam([r.v for r in rounding], lr=config.weight_lr)]
    if learn_scale and rounding:  # Genie-M's third Adam group: the weight steps, at a constant rate
        optimizers.append(torch.optim.Adam([r.scale for r in rounding], lr=config.weight_scale_lr))
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
    mix = joint and config.keep_prob < 1.0
    indices = [_sample(x_q.n, config.batch_size, config.method, sampler) for _ in range(config.iters)]
    try:
        batches = prefetch([x_q, x_fp if mix else None, y_fp, grad], indices)
        for t, (x, x_fp_batch, y, g) in enumerate(batches):
            assert x is not None and y is not None
            if mix:
                assert x_fp_batch is not None
                x = torch.where(torch.rand_like(x) < config.keep_prob, x, x_fp_batch)
            rec = reconstruction_loss(group(x), y, g, config.p)
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
def _capture(group: _Group, layer: QuantLayer, x: Cached, batch_size: int, memory: Memory) -> tuple[Cached, Cached]:
    """``layer``'s input and output while ``group`` runs on ``x`` (in its current quantization state)."""
    inputs, outputs = memory.sink(x.n), memory.sink(x.n)

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(out.detach())

    handle = layer.register_forward_hook(hook)
    try:
        for i in range(0, x.n, batch_size):
            group(x.rows(i, min(i + batch_size, x.n)))
    finally:
        handle.remove()
    return inputs.finish(), outputs.finish()


def _set_group_state(group: _Group, weight: bool, act: bool) -> None:
    for unit in group.units:
        if isinstance(unit, QuantUnit):
            unit.set_quant_state(weight, act)


def _optimise_layers(
    group: _Group,
    x_q: Cached,
    x_fp: Cached,
    config: ReconConfig,
    acts: bool,
    update: Callable[[int, float], None] | None,
    sampler: torch.Generator,
    memory: Memory,
) -> None:
    """AdaRound every layer of ``group`` on its own, in order (BRECQ's layer granularity)."""
    layers = [m for m in group.modules() if isinstance(m, QuantLayer)]
    batch = max(config.batch_size, 64)
    for index, layer in enumerate(layers):
        _set_group_state(group, weight=False, act=False)
        x_fp_layer, y_fp_layer = _capture(group, layer, x_fp, batch, memory)  # FP input and target of this layer
        _set_group_state(group, weight=True, act=acts)
        x_q_layer, unused = _capture(group, layer, x_q, batch, memory)  # earlier layers already hard-rounded
        unused.close()
        offset = index * config.iters

        def shifted(t: int, loss: float, offset: int = offset) -> None:
            if update is not None:
                update(offset + t, loss)

        single = _Group([layer])
        try:
            _optimise_weights(single, x_q_layer, x_fp_layer, y_fp_layer, None, config, acts, shifted, sampler)
        finally:
            _close(x_fp_layer, y_fp_layer, x_q_layer)


def _optimise_acts(
    group: _Group,
    x_fp: Cached,
    y_fp: Cached,
    grad: Cached | None,
    config: ReconConfig,
    update: Callable[[int, float], None] | None,
    sampler: torch.Generator,
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
    indices = [_sample(x_fp.n, config.batch_size, "brecq", sampler) for _ in range(config.act_iters)]
    try:
        for t, (x, y, g) in enumerate(prefetch([x_fp, y_fp, grad], indices)):
            assert x is not None and y is not None
            loss = reconstruction_loss(group(x), y, g, 2.4)
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
