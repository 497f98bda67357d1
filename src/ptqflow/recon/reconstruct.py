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

PD-Quant (Liu et al., CVPR 2023, "PD-Quant: Post-Training Quantization based on Prediction Difference
Metric") changes QDrop's joint phase in two ways, each a switch here (off by default):

* ``pd_weight > 0`` -- the *prediction difference*: the group's output on the quantized-prefix input (no
  drop) is pushed through the rest of the network in FP and compared with the FP network's prediction,
  ``KL(softmax(z_fp / T) || softmax(z_q / T))`` averaged over the batch (the paper's PD metric; ``T`` is
  ``pd_temperature``); it is added, weighted by ``pd_weight`` (the released code's ``1 / lambda_r``), to
  the reconstruction loss and the rounding regulariser, so the rounding variables and the activation steps
  both see it (:func:`prediction_difference`).
* ``dc_iters > 0`` -- *distribution correction*: before the group is optimised, its cached FP input is
  moved toward inputs whose pre-BN conv outputs have the FP model's BatchNorm running statistics, anchored
  to the original input (:func:`correct_inputs`); the corrected input replaces the FP input in QDrop's
  mixing and the FP group's output on it becomes the target.

``layerwise=True`` is BRECQ's layer granularity (its table 1 baseline, AdaRound layer by layer): inside
each unit every conv/linear is reconstructed on its own, in order, against its FP output (before the
activation) computed from the unit's cached FP input; its input is the quantized-prefix input pushed
through the unit's already reconstructed layers (QDrop mixes it with the FP input element-wise). The
loss is always ``mse`` there: the cached Fisher weights belong to unit outputs, not layer outputs.
Activation step sizes are learned per unit by BRECQ's activation phase; with ``qdrop`` they keep their
initial (RTN) values, since no activation quantizer lies inside a single layer.

An optional *stopping rule* (``stop_patience > 0``, off by default; :class:`_Stopper`) ends a weight or
joint phase early once the loss of the *hard-rounded* group on ``holdout`` calibration samples kept out of
the mini-batches stops improving (optionally after a short finishing anneal), and keeps the best state it
saw. The papers run a fixed schedule (AdaRound's beta annealing and the activation steps' cosine decay span
it), so an early stop ends with soft variables still far from 0/1; the rule therefore judges the
hard-rounded state, the one that is deployed, and ``stop_finish`` > 0 completes the annealing in a short
tail before the last judgement (the hard-rounded loss rises and falls while beta is still high). What it
saves and costs is measured in the README ("How many iterations a user needs").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore
from ptqflow.fold import BNStatistics
from ptqflow.kernels import fixed_sum
from ptqflow.quant.adaround import AdaRound, beta_schedule
from ptqflow.quant.model import QuantModel
from ptqflow.quant.quantizer import ActQuantizer, qdrop_mix
from ptqflow.quant.units import QuantLayer, QuantUnit
from ptqflow.recon.cache import Cached, Memory, peak_memory_mb, prefetch

__all__ = [
    "ReconConfig",
    "Step",
    "correct_inputs",
    "distribution_loss",
    "plan_steps",
    "prediction_difference",
    "reconstruct",
    "reconstruction_loss",
]

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
        pd_weight: PD-Quant's prediction-difference term in the joint phase, the weight of
            ``KL(softmax(z_fp / T) || softmax(z_q / T))`` (the released code divides by ``lambda_r = 0.2``,
            i.e. 5); 0: off (QDrop).
        pd_temperature: ``T`` of the prediction difference (the released scripts: 4 for ResNets and
            RegNets, 1 for MobileNetV2 and MNasNet).
        dc_iters: PD-Quant's distribution correction: Adam iterations per mini-batch of the group's FP
            input (the released code: 500); 0: off.
        dc_lr: its Adam learning rate (1e-3, reduced tenfold on a 100-iteration plateau, down to 1e-5).
        dc_anchor: weight of ``||x~ - x||^2`` that keeps the corrected input near the cached one (the
            released code's ``1 / lambda_c``: 50 for ResNets, 200 for MobileNetV2).
        holdout: calibration samples (the last ones of the store) kept out of the mini-batches for the
            stopping rule; 0 with the rule off.
        stop_every: iterations between two held-out evaluations of the stopping rule.
        stop_patience: the stopping rule: a weight or joint phase ends once this many held-out evaluations
            in a row improve the best held-out loss by less than ``stop_tol`` (relative), and the group
            keeps its best evaluated state; evaluations start when the rounding regulariser does (after
            ``warmup``). 0: off, the fixed schedule of the papers.
        stop_tol: the relative improvement of the held-out loss that counts as progress.
        stop_finish: what the rule does at the plateau, as a fraction of ``iters``: 0 ends the phase there;
            > 0 first finishes the rounding's annealing in that many iterations (beta falls in a straight
            line from its value at the plateau to ``beta_end``), so that the soft variables settle before
            the hard rounding.
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
    pd_weight: float = 0.0
    pd_temperature: float = 4.0
    dc_iters: int = 0
    dc_lr: float = 1e-3
    dc_anchor: float = 50.0
    holdout: int = 0
    stop_every: int = 100
    stop_patience: int = 0
    stop_tol: float = 0.01
    stop_finish: float = 0.0
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
        if self.pd_weight < 0:
            raise ConfigError(f"pd_weight must be >= 0 (0: no prediction difference), got {self.pd_weight}")
        if self.pd_temperature <= 0:
            raise ConfigError(f"pd_temperature must be > 0, got {self.pd_temperature}")
        if self.dc_iters < 0:
            raise ConfigError(f"dc_iters must be >= 0 (0: no distribution correction), got {self.dc_iters}")
        if self.dc_lr <= 0:
            raise ConfigError(f"dc_lr must be > 0, got {self.dc_lr}")
        if self.dc_anchor < 0:
            raise ConfigError(f"dc_anchor must be >= 0, got {self.dc_anchor}")
        if self.stop_every < 1:
            raise ConfigError(f"stop_every must be >= 1, got {self.stop_every}")
        if self.stop_patience < 0:
            raise ConfigError(f"stop_patience must be >= 0 (0: no stopping rule), got {self.stop_patience}")
        if not 0 <= self.stop_tol < 1:
            raise ConfigError(f"stop_tol must be in [0, 1), got {self.stop_tol}")
        if not 0 <= self.stop_finish <= 1:
            raise ConfigError(f"stop_finish must be in [0, 1], got {self.stop_finish}")
        if self.holdout < 0:
            raise ConfigError(f"holdout must be >= 0, got {self.holdout}")
        if (self.stop_patience > 0) != (self.holdout > 0):
            raise ConfigError(
                "the stopping rule needs both stop_patience > 0 and holdout > 0 (held-out calibration "
                f"samples), or neither; got stop_patience {self.stop_patience}, holdout {self.holdout}"
            )
        if (self.pd_weight > 0 or self.dc_iters > 0) and self.method != "qdrop":
            raise ConfigError(
                "pd_weight and dc_iters change QDrop's joint phase (PD-Quant): they need method qdrop, "
                f"got {self.method}"
            )


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


def prediction_difference(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """PD-Quant's prediction-difference metric (Liu et al., CVPR 2023): the KL divergence of the
    quantized prediction from the FP one at temperature ``T``,
    ``mean_n sum_k p_k (log p_k - log q_k)`` with ``p = softmax(target / T)``, ``q = softmax(logits / T)``.
    """
    log_q = F.log_softmax(logits / temperature, dim=1)
    log_p = F.log_softmax(target / temperature, dim=1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return fixed_sum(per_sample) / per_sample.numel()


def distribution_loss(outputs: Sequence[tuple[torch.Tensor, BNStatistics]]) -> torch.Tensor:
    """PD-Quant's distribution-correction statistic (Liu et al., CVPR 2023): for every folded conv output ``y`` and
    its BN's running statistics, the per-sample, per-channel mean ``m`` and standard deviation ``s`` of the
    pre-BN output ``z`` (over the spatial positions) against the running ``mu`` and ``sigma``:
    ``sum_layers (1/N) sum_{n,c} [(m_nc - mu_c)^2 + (s_nc - sigma_c)^2]`` (channels whose BN scale is 0
    carry no statistics and are left out)."""
    total = torch.zeros(())
    for y, stats in outputs:
        z = stats.pre_bn(y).flatten(2)
        live = stats.live().to(z.device)
        mean = z.mean(dim=2)[:, live]
        std = torch.sqrt(z.var(dim=2) + stats.eps)[:, live]
        err = (mean - stats.mean.to(z)[live]).pow(2) + (std - stats.std.to(z)[live]).pow(2)
        total = total.to(z) + fixed_sum(err) / z.shape[0]
    return total


def correct_inputs(
    group: nn.Module,
    x: Cached,
    targets: Sequence[tuple[QuantLayer, BNStatistics]],
    config: ReconConfig,
    memory: Memory,
) -> Cached:
    """PD-Quant's distribution correction (Liu et al., CVPR 2023) of a group's FP input.

    Mini-batch by mini-batch (``config.batch_size`` samples, in order), the input ``x`` is a variable
    ``x~`` (starting at ``x``) optimised by Adam (``dc_lr``, reduced tenfold when the loss has not improved
    for 100 iterations, down to 1e-5; ``dc_iters`` iterations) on
    ``distribution_loss(pre-BN outputs of the group's layers on x~) + dc_anchor * mean_{n,h,w} sum_c (x~ - x)^2``,
    with ``group`` in FP (every quantizer off, as the caller leaves it). The first term pulls the
    calibration images' statistics toward those the BN layers saw over the whole training set, the second
    keeps ``x~`` near the real input. Deterministic (fixed order, no randomness).
    """
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
        for i, (layer, _) in enumerate(targets)
    ]

    def correct(batch: torch.Tensor) -> torch.Tensor:
        original = batch.detach()
        with torch.enable_grad():
            x_var = original.clone().requires_grad_(True)
            opt = torch.optim.Adam([x_var], lr=config.dc_lr)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=100, min_lr=1e-5)
            for _ in range(config.dc_iters):
                captured.clear()
                group(x_var)
                stats = distribution_loss([(captured[i], st) for i, (_, st) in enumerate(targets)])
                loss = stats + config.dc_anchor * reconstruction_loss(x_var, original, None, 2.0)
                (x_var.grad,) = torch.autograd.grad(loss, [x_var])
                opt.step()
                plateau.step(float(loss.detach()))
        captured.clear()
        return x_var.detach()

    try:
        return memory.derive(x, correct, config.batch_size)
    finally:
        for handle in handles:
            handle.remove()


def _bn_targets(group: nn.Module, bn_stats: Mapping[str, BNStatistics]) -> list[tuple[QuantLayer, BNStatistics]]:
    layers = [m for m in group.modules() if isinstance(m, QuantLayer)]
    return [(layer, bn_stats[layer.source]) for layer in layers if layer.source in bn_stats]


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
def _eval_loss(
    group: nn.Module, x: Cached, y: Cached, batch_size: int, first: int = 0, grad: Cached | None = None, p: float = 2.0
) -> float:
    """The sample-weighted mean :func:`reconstruction_loss` of ``group`` over rows ``first:`` of ``x``."""
    total = 0.0
    for i in range(first, x.n, batch_size):
        stop = min(i + batch_size, x.n)
        g = grad.rows(i, stop) if grad is not None else None
        total += float(reconstruction_loss(group(x.rows(i, stop)), y.rows(i, stop), g, p)) * (stop - i)
    return total / (x.n - first)


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
    bn_stats: Mapping[str, BNStatistics] | None = None,
    corrections: dict[tuple[int, ...], tuple[Cached, Cached]] | None = None,
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
        bn_stats: the FP model's BatchNorm statistics per folded conv (:func:`ptqflow.fold.bn_statistics`),
            needed by the distribution correction (``config.dc_iters > 0``).
        corrections: a memo of the distribution correction per group (corrected FP input, FP output on it),
            filled and read here and closed by the caller. The correction depends only on the FP model, the
            store, the group and the ``dc_*`` keys -- not on the bits or the seed -- so calls that share
            those can share the memo and correct once (``bench/method_table.py`` does).

    Returns:
        One stats dict per step run: ``{"loss_before", "loss_after", "seconds", "iter_ms", "iters",
        "peak_rss_mb"}`` (losses: full-set MSE of the group output against the FP target, all quantizers
        on; ``iter_ms``: wall milliseconds per optimisation iteration; ``iters``: the iterations run, fewer
        than the schedule's when the stopping rule ended the step; ``peak_rss_mb``: the process's peak
        resident memory so far, and ``peak_device_mb`` on CUDA).
    """
    flat = [i for g in groups for i in g]
    if flat != list(range(len(model.units))):
        raise ConfigError(f"reconstruction groups must cover units 0..{len(model.units) - 1} in order, got {groups}")
    steps = plan_steps(config.method, groups, layerwise)
    if layerwise and (config.pd_weight > 0 or config.dc_iters > 0):
        raise ConfigError("pd_weight and dc_iters (PD-Quant) act on blocks, not with layer granularity")
    if config.dc_iters > 0 and bn_stats is None:
        raise ConfigError("dc_iters > 0 (distribution correction) needs the FP model's BatchNorm statistics")
    space = Memory(memory, device, scratch)
    n = store.num_samples
    if config.holdout and n - config.holdout < config.batch_size:
        raise ConfigError(
            f"holdout {config.holdout} leaves {n - config.holdout} of the store's {n} calibration samples to "
            f"train on, fewer than batch_size {config.batch_size}"
        )
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
            x_dc = y_dc = logits = None
            rest = _Group([model.units[i] for i in range(last + 1, len(model.units))])
            try:
                if step.phase == "joint" and config.dc_iters > 0:
                    assert bn_stats is not None
                    targets = _bn_targets(group, bn_stats)
                    if corrections is not None and step.group in corrections:
                        x_dc, y_dc = corrections[step.group]
                    elif targets:  # PD-Quant's corrected FP input, and the FP group's output on it as the target
                        _set_group_state(group, weight=False, act=False)
                        x_dc = correct_inputs(group, x_fp, targets, config, space)
                        y_dc = _forward_all(group, x_dc, eval_batch, space)
                        if corrections is not None:
                            corrections[step.group] = (x_dc, y_dc)
                if step.phase == "joint" and config.pd_weight > 0:
                    logits = cached(store.units[-1], "outputs")
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
                run = total
                if step.phase == "acts":
                    _optimise_acts(group, x_fp, y_fp, grad, config, update, sampler)
                elif step.phase == "layers":
                    run = _optimise_layers(group, x_q, x_fp, config, acts_during, update, sampler, space)
                else:
                    joint = step.phase == "joint"
                    x_mix, target = (x_dc, y_dc) if x_dc is not None and y_dc is not None else (x_fp, y_fp)
                    if logits is not None:
                        _set_group_state(rest, weight=False, act=False)  # the rest of the network in FP
                    pd = (rest, logits) if logits is not None else None
                    run = _optimise_weights(group, x_q, x_mix, target, grad, config, joint, update, sampler, pd)
                loop_ms = (time.perf_counter() - looped) * 1000 / max(1, run)
                model.set_quant_state(weight=True, act=True)
                after = _eval_loss(group, x_in, y_fp, eval_batch)
                if step.phase != "acts":
                    model.set_quant_state(weight=True, act=acts_during)
                    x_q, old = _forward_all(group, x_q, eval_batch, space), x_q
                    old.close()
            finally:
                _close(x_fp, y_fp, grad, logits, *((x_dc, y_dc) if corrections is None else ()))
            row = {
                "loss_before": before,
                "loss_after": after,
                "seconds": time.perf_counter() - began,
                "iter_ms": loop_ms,
                "iters": float(run),
                **peak_memory_mb(device),
            }
            stopped = f", stopped at {run} of {total} iterations (held-out plateau)" if run < total else ""
            log.info("%s: loss %.5g -> %.5g (%.1fs%s)", label, before, after, row["seconds"], stopped)
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


class _Stopper:
    """The held-out stopping rule of one weight or joint phase (``ReconConfig.stop_patience`` > 0).

    From the end of warm-up (when the rounding regulariser starts) every ``stop_every`` iterations, and at
    the last one, the group's loss on the held-out samples (the last ``holdout`` rows, never in a
    mini-batch) is measured in the state that is deployed: AdaRound's hard rounding ``1[V >= 0]`` (Nagel
    et al. 2020, applied before the annealing ends) and no drop, with the phase's reconstruction loss (its
    ``p``, and BRECQ's Fisher weights, eq. 10, when cached). The lowest loss's state (rounding variables,
    learned weight and activation steps) is copied; a loss below ``(1 - stop_tol)`` times the loss at the
    last progress is progress, and ``stop_patience`` evaluations in a row without it mark the plateau. With
    ``stop_finish`` = 0 the phase ends there; with ``stop_finish`` > 0 it first finishes the annealing in
    ``stop_finish * iters`` iterations (beta from its value at the plateau to ``beta_end``) and evaluates
    once more. Either way the phase ends in its best evaluated state (:meth:`restore`), the usual
    early-stopping checkpoint.
    """

    def __init__(
        self,
        group: nn.Module,
        rounding: Sequence[AdaRound],
        quantizers: Sequence[ActQuantizer],
        learned: Sequence[torch.Tensor],
        held: tuple[Cached, Cached, Cached | None],
        config: ReconConfig,
    ) -> None:
        self.group, self.rounding, self.quantizers, self.learned = group, rounding, quantizers, learned
        self.x, self.y, self.grad = held
        self.config = config
        self.begin = math.ceil(config.warmup * config.iters)
        self.best = self.mark = math.inf  # the lowest loss seen; the loss at the last progress
        self.state: list[torch.Tensor] | None = None
        self.stale = 0
        self.finish: tuple[int, float, int] | None = None  # (from iteration, beta there, end iteration)

    def beta(self, t: int) -> float | None:
        """Beta of 0-based iteration ``t``: the schedule's, or, while finishing, a straight line from the
        beta at the plateau to ``beta_end`` at the finish's last iteration."""
        c = self.config
        if self.finish is None:
            return beta_schedule(t, c.iters, c.warmup, c.beta_start, c.beta_end)
        start, beta, end = self.finish
        return beta + (c.beta_end - beta) * min(1.0, (t + 1 - start) / (end - start))

    def after(self, run: int) -> bool:
        """Called after every iteration (``run`` done); True when the phase ends there."""
        c = self.config
        if self.finish is not None:
            if run < self.finish[2]:
                return False
            self.stop(run)  # the finished state joins the candidates
            return True
        if not (self.due(run) and self.stop(run)):
            return False
        length = round(c.stop_finish * c.iters)
        if length == 0:
            return True
        beta = self.beta(run)
        assert beta is not None  # evaluations start after warm-up
        self.finish = (run, beta, min(run + length, c.iters))
        return False

    def due(self, t: int) -> bool:
        """Whether iteration ``t`` (1-based, done) is an evaluation point."""
        every = self.config.stop_every
        return t == self.config.iters or (t >= self.begin and (t - self.begin) % every == 0)

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """The hard-rounded, no-drop group's loss on the held-out samples."""
        keep = [q.keep_prob for q in self.quantizers]
        for r in self.rounding:
            r.soft = False
        for q in self.quantizers:
            q.keep_prob = 1.0
        try:
            c = self.config
            first = self.x.n - c.holdout
            return _eval_loss(self.group, self.x, self.y, max(c.batch_size, 64), first, self.grad, c.p)
        finally:
            for r in self.rounding:
                r.soft = True
            for q, k in zip(self.quantizers, keep, strict=True):
                q.keep_prob = k

    def stop(self, t: int) -> bool:
        """Evaluate after iteration ``t``; True when the phase should end."""
        loss = self.held_out_loss()
        if self.state is None or loss < self.best:  # the state restored at the end is the lowest seen
            self.best = loss
            self.state = [p.detach().clone() for p in self.learned]
        if loss < self.mark * (1 - self.config.stop_tol):
            self.mark = loss
            self.stale = 0
        else:
            self.stale += 1
        log.debug("iteration %d: held-out loss %.5g (best %.5g, %d checks stale)", t, loss, self.best, self.stale)
        return self.stale >= self.config.stop_patience

    @torch.no_grad()
    def restore(self) -> None:
        """Put the best evaluated state back."""
        if self.state is not None:
            for p, saved in zip(self.learned, self.state, strict=True):
                p.copy_(saved)


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
    pd: tuple[nn.Module, Cached] | None = None,
) -> int:
    """AdaRound (and, ``joint``, the activation steps with QDrop's mixing) of ``group``; with ``pd`` =
    ``(rest of the network in FP, cached FP logits)``, PD-Quant's prediction difference joins the loss.

    Returns the iterations run (fewer than ``config.iters`` when the stopping rule ended the phase)."""
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
    indices = [_sample(x_q.n - config.holdout, config.batch_size, config.method, sampler) for _ in range(config.iters)]
    rest, logits = pd if pd is not None else (None, None)
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    stopper = None
    if config.stop_patience > 0:
        stopper = _Stopper(group, rounding, quantizers if joint else [], params, (x_q, y_fp, grad), config)
    run = 0
    batches = prefetch([x_q, x_fp if mix else None, y_fp, grad, logits], indices)
    try:
        for t, (x, x_fp_batch, y, g, z_fp) in enumerate(batches):
            assert x is not None and y is not None
            x_plain = x
            if mix:
                assert x_fp_batch is not None
                x = qdrop_mix(x, x_fp_batch, config.keep_prob)
            if rest is not None and z_fp is not None:
                # PD-Quant: one forward of the mixed and the plain quantized input; the latter's output goes
                # through the FP rest of the network to the prediction.
                both = group(torch.cat([x, x_plain])) if mix else group(x)
                out, out_plain = (both[: x.shape[0]], both[x.shape[0] :]) if mix else (both, both)
                rec = reconstruction_loss(out, y, g, config.p)
                pd_loss = prediction_difference(rest(out_plain), z_fp, config.pd_temperature)
                loss = rec + config.pd_weight * pd_loss
            else:
                rec = reconstruction_loss(group(x), y, g, config.p)
                loss = rec
            if stopper is None:
                beta = beta_schedule(t, config.iters, config.warmup, config.beta_start, config.beta_end)
            else:
                beta = stopper.beta(t)
            if beta is not None and config.reg_weight > 0:
                loss = loss + config.reg_weight * sum(r.regularizer(beta) for r in rounding)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if rest is not None:  # no gradient for the rest of the network's own parameters
                torch.autograd.backward(loss, inputs=params)
            else:
                torch.autograd.backward(loss)
            for opt in optimizers:
                opt.step()
            if scheduler is not None:
                scheduler.step()
            if update is not None:
                update(t + 1, rec.item())
            run = t + 1
            if stopper is not None and stopper.after(run):
                break
        if stopper is not None:
            stopper.restore()
    finally:
        batches.close()
        for layer in layers:
            layer.finish_adaround()
        for q in quantizers:
            q.keep_prob = 1.0
            q.lsq_grad_scale = False
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    return run


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
) -> int:
    """AdaRound every layer of ``group`` on its own, in order (BRECQ's layer granularity); returns the
    iterations run over all of them."""
    layers = [m for m in group.modules() if isinstance(m, QuantLayer)]
    run = 0
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
            run += _optimise_weights(single, x_q_layer, x_fp_layer, y_fp_layer, None, config, acts, shifted, sampler)
        finally:
            _close(x_fp_layer, y_fp_layer, x_q_layer)
    return run


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
    indices = [_sample(x_fp.n - config.holdout, config.batch_size, "brecq", sampler) for _ in range(config.act_iters)]
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
