from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import TinyResNet, randomize_bn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import bn_statistics, fold_bn
from ptqflow.quant.adaround import AdaRound, beta_schedule
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations
from ptqflow.recon.cache import Memory
from ptqflow.recon.reconstruct import (
    ReconConfig,
    _Group,
    _set_group_state,
    correct_inputs,
    distribution_loss,
    plan_steps,
    prediction_difference,
    reconstruct,
    reconstruction_loss,
)
from ptqflow.units import extract_units

CPU = torch.device("cpu")


def _setup(
    tmp_path: Path, bits: tuple[int, int] = (2, 4), n: int = 64, fp: torch.nn.Module | None = None
) -> tuple[QuantModel, FeatureStore]:
    fp = randomize_bn(TinyResNet()) if fp is None else fp
    units = extract_units(fold_bn(fp))
    x = TinyResNet.example_inputs(n)
    labels = torch.arange(n) % 10
    shapes = [(8, 8, 8), (8, 8, 8), (16, 4, 4), (10,)]
    writer = FeatureStoreWriter(
        tmp_path / "s.zarr", [u.name for u in units], (3, 8, 8), shapes, n, chunk_size=16, shard_size=32
    )
    extract_features([u.module for u in units], iter([(x, labels)]), writer, CPU)
    store = FeatureStore.open(tmp_path / "s.zarr")
    model = build_quant_model(
        fp, QuantConfig(weight_bits=bits[0], act_bits=bits[1], first_last_weight_bits=None, convention="qdrop")
    )
    calibrate_activations(model, lambda i: store.iter_inputs(i, 32), 2.4, CPU)
    return model, store


def _state(model: QuantModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_adaround_starts_at_fp_weight_and_ends_on_grid() -> None:
    w = torch.randn(4, 3, 3, 3)
    scale = w.abs().amax(dim=(1, 2, 3)) / 3
    zero = torch.full((4,), 4.0)
    rounding = AdaRound(w, scale, zero, bits=3)
    torch.testing.assert_close(
        rounding(), w.clamp(-4 * scale.view(-1, 1, 1, 1), 3 * scale.view(-1, 1, 1, 1)), atol=1e-5, rtol=1e-5
    )
    rounding.soft = False
    hard = rounding() / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(hard, hard.round(), atol=1e-5, rtol=0)
    down_or_up = (hard - (w / scale.view(-1, 1, 1, 1)).floor()).round()
    assert set(down_or_up[(hard > -4) & (hard < 3)].unique().tolist()) <= {0.0, 1.0}


def test_beta_schedule() -> None:
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None
    assert beta_schedule(20, 100) == pytest.approx(20.0)
    assert beta_schedule(100, 100) == pytest.approx(2.0)


def test_fisher_loss_matches_naive_reference() -> None:
    pred, target, grad = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    naive = 0.0
    for n in range(3):
        for h in range(2):
            for w in range(2):
                naive += sum(
                    float((pred[n, c, h, w] - target[n, c, h, w]) ** 2 * (abs(grad[n, c, h, w]) + 1) ** 2)
                    for c in range(4)
                )
    assert float(reconstruction_loss(pred, target, grad, 2.0)) == pytest.approx(naive / 12, rel=1e-5)


def test_brecq_steps_do_weights_first() -> None:
    steps = plan_steps("brecq", [[0], [1, 2]])
    assert [s.phase for s in steps] == ["weights", "weights", "acts", "acts"]
    assert [s.phase for s in plan_steps("qdrop", [[0], [1]])] == ["joint", "joint"]


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_reconstruction_beats_round_to_nearest(tmp_path: Path, method: str) -> None:
    model, store = _setup(tmp_path)
    config = ReconConfig(method=method, iters=150, act_iters=50, batch_size=16, reg_weight=0.01, seed=1)
    stats = reconstruct(model, store, [[0], [1], [2], [3]], config, CPU)
    weight_steps = [s for s in stats[:4]]
    assert sum(s["loss_after"] for s in weight_steps) < sum(s["loss_before"] for s in weight_steps)
    for _, layer in model.quant_layers():
        q = layer.weight_quantizer
        w = layer.layer.weight / q.scale.view(-1, 1, 1, 1)[: layer.layer.weight.shape[0]].reshape(
            -1, *([1] * (layer.layer.weight.dim() - 1))
        )
        torch.testing.assert_close(w, w.round(), atol=1e-4, rtol=0)  # hard-rounded weights on the grid


def test_qdrop_keep_fraction() -> None:
    from ptqflow.quant.quantizer import ActQuantizer

    q = ActQuantizer(2)
    q.scale.data.fill_(1.0)
    q.keep_prob = 0.3
    x = torch.full((200_000,), 0.4)  # quantizes to 0.0, so kept elements are exactly the zeros
    kept = (q(x) == 0).float().mean().item()
    assert kept == pytest.approx(0.3, abs=0.01)


def test_same_seed_same_result(tmp_path: Path) -> None:
    config = ReconConfig(method="qdrop", iters=30, batch_size=8, seed=3)
    results = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        model, store = _setup(tmp_path / run)
        reconstruct(model, store, [[0], [1], [2], [3]], config, CPU)
        results.append(_state(model))
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    config = ReconConfig(method="brecq", iters=30, act_iters=10, batch_size=8, seed=5)
    groups = [[0], [1, 2], [3]]
    torch.manual_seed(0)
    full, store = _setup(tmp_path / "full")
    reconstruct(full, store, groups, config, CPU)

    torch.manual_seed(0)
    part, store2 = _setup(tmp_path / "part")
    saved: dict[int, dict[str, torch.Tensor]] = {}

    class Killed(Exception):
        pass

    def stop_after_two(index: int, step: object, row: object) -> None:
        saved[index] = _state(part)
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        reconstruct(part, store2, groups, config, CPU, on_step_done=stop_after_two)
    torch.manual_seed(0)
    resumed, store3 = _setup(tmp_path / "resumed")
    resumed.load_state_dict(saved[1])
    reconstruct(resumed, store3, groups, config, CPU, start=2)
    for key, value in _state(full).items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_groups_must_cover_units(tmp_path: Path) -> None:
    model, store = _setup(tmp_path)
    with pytest.raises(ConfigError, match="cover units"):
        reconstruct(model, store, [[0], [2]], ReconConfig(iters=1), CPU)
    with pytest.raises(ConfigError, match="keep_prob must be in"):
        ReconConfig(keep_prob=1.5)


def test_skipped_stem_keeps_round_to_nearest(tmp_path: Path) -> None:
    model, store = _setup(tmp_path)
    stem_before = {k: v.clone() for k, v in model.units[0].state_dict().items()}
    stats = reconstruct(
        model, store, [[0], [1], [2], [3]], ReconConfig(iters=5, batch_size=8), CPU, skip=frozenset({0})
    )
    assert len(stats) == 3
    for key, value in model.units[0].state_dict().items():
        assert torch.equal(value, stem_before[key]), key


@pytest.mark.parametrize("method", ["brecq", "qdrop"])
def test_layerwise_reconstructs_each_layer_against_its_fp_output(tmp_path: Path, method: str) -> None:
    model, store = _setup(tmp_path)
    steps = plan_steps(method, [[0], [1]], layerwise=True)
    assert steps[0].phase == "layers" and (method == "qdrop") == (len(steps) == 2)
    unit = model.units[2]  # layer1.1: conv1, conv2 and the projection shortcut
    layers = [layer for _, layer in unit.quant_layers()]
    x_fp = store.unit("layer1.1").inputs(slice(0, 64))

    def layer_mse() -> list[float]:
        """Each layer on its FP input vs its FP output (the quantity layer-wise AdaRound minimises)."""
        errors = []
        for layer in layers:
            seen: list[torch.Tensor] = []
            handle = layer.register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0]))
            unit.set_quant_state(weight=False, act=False)
            with torch.no_grad():
                unit(x_fp)
                y_fp = layer(seen[0])
                unit.set_quant_state(weight=True, act=False)
                errors.append(float(((layer(seen[0]) - y_fp) ** 2).sum(1).mean()))
            handle.remove()
        unit.set_quant_state(weight=True, act=True)
        return errors

    before = layer_mse()
    config = ReconConfig(method=method, iters=200, act_iters=20, batch_size=16, reg_weight=0.01, seed=1)
    stats = reconstruct(model, store, [[0], [1], [2], [3]], config, CPU, layerwise=True)
    assert len(stats) == (8 if method == "brecq" else 4)
    after = layer_mse()
    assert sum(after) < sum(before), (before, after)
    for layer in layers:  # hard-rounded onto the grid
        w = layer.layer.weight / layer.weight_quantizer.scale.view(-1, 1, 1, 1)
        torch.testing.assert_close(w, w.round(), atol=1e-4, rtol=0)


def test_learned_weight_scale_gets_its_gradient_and_lands_on_its_own_grid() -> None:
    """Genie-M's weight step: a parameter of the soft weight, with the integer grid value as its gradient;
    frozen (a buffer) without ``learn_scale``."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    scale, zero = w.abs().amax(dim=(1, 2, 3)) / 3, torch.full((4,), 4.0)
    assert "scale" not in dict(AdaRound(w, scale, zero, bits=3).named_parameters())
    rounding = AdaRound(w, scale, zero, bits=3, learn_scale=True)
    assert set(dict(rounding.named_parameters())) == {"v", "scale"}
    torch.testing.assert_close(rounding(), AdaRound(w, scale, zero, bits=3)(), atol=0, rtol=0)  # same start
    rounding().sum().backward()
    grid = torch.clamp(rounding.floor + rounding.h() + rounding.zero_point, 0, 7) - rounding.zero_point
    torch.testing.assert_close(rounding.scale.grad, grid.sum(dim=(1, 2, 3), keepdim=True).detach())


def test_learned_weight_scales_move_and_the_model_keeps_its_grid(tmp_path: Path) -> None:
    model, store = _setup(tmp_path)
    before = {n: layer.weight_quantizer.scale.clone() for n, layer in model.quant_layers()}
    config = ReconConfig(method="qdrop", iters=60, batch_size=16, reg_weight=0.01, seed=1, weight_scale_lr=1e-3)
    stats = reconstruct(model, store, [[0], [1], [2], [3]], config, CPU)
    assert sum(s["loss_after"] for s in stats) < sum(s["loss_before"] for s in stats)
    moved = 0
    for name, layer in model.quant_layers():
        q = layer.weight_quantizer
        moved += int(not torch.equal(q.scale, before[name]))
        assert bool((q.scale > 0).all())
        # the written weight lies on the learned grid: the quantizer reproduces it exactly
        torch.testing.assert_close(q(layer.layer.weight), layer.layer.weight, atol=1e-6, rtol=0)
    assert moved == len(before)


def test_weight_scale_lr_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="weight_scale_lr must be >= 0"):
        ReconConfig(weight_scale_lr=-1e-4)


def test_prediction_difference_is_the_kl_of_the_tempered_predictions() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    for t in (1.0, 4.0):
        expected = torch.nn.KLDivLoss(reduction="batchmean")(
            torch.log_softmax(logits / t, dim=1), torch.softmax(target / t, dim=1)
        )
        torch.testing.assert_close(prediction_difference(logits, target, t), expected)
    assert float(prediction_difference(target, target, 4.0)) == pytest.approx(0.0, abs=1e-7)
    prediction_difference(logits, target, 4.0).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


@torch.no_grad()
def _pd_objective(model: QuantModel, store: FeatureStore, unit: int, temperature: float) -> float:
    """The prediction difference over the calibration set with units ``0..unit`` quantized, the rest FP."""
    model.set_quant_state(weight=True, act=True)
    for later in model.units[unit + 1 :]:
        later.set_quant_state(weight=False, act=False)
    logits = model(store.unit(store.units[0]).inputs(slice(0, store.num_samples)))
    target = store.unit(store.units[-1]).outputs(slice(0, store.num_samples))
    model.set_quant_state(weight=True, act=True)
    return float(prediction_difference(logits, target, temperature))


def test_prediction_difference_objective_decreases(tmp_path: Path) -> None:
    """PD-Quant's objective for the first block (quantized, the rest of the network FP) falls when the
    block is reconstructed with it, and falls further than with the local loss alone."""
    torch.manual_seed(0)
    fp = randomize_bn(TinyResNet())
    with torch.no_grad():
        fp.fc.weight.mul_(30.0)  # confident predictions, as a trained model makes (random init: near uniform)
    model, store = _setup(tmp_path, bits=(2, 2), fp=fp)
    before = _pd_objective(model, store, 0, 1.0)
    after = {}
    for weight in (0.0, 100.0):
        trial = copy.deepcopy(model)
        config = ReconConfig(method="qdrop", iters=80, batch_size=16, seed=0, pd_weight=weight, pd_temperature=1.0)
        # only the first block: the others keep their FP weights (a reconstructed unit holds rounded ones)
        reconstruct(trial, store, [[0], [1], [2], [3]], config, CPU, skip=frozenset({1, 2, 3}))
        after[weight] = _pd_objective(trial, store, 0, 1.0)
    assert after[100.0] < after[0.0] < before
    assert after[100.0] < 0.97 * before


def test_distribution_correction_moves_the_statistics_toward_the_bn_ones(tmp_path: Path) -> None:
    """The corrected block input gives pre-BN outputs whose per-channel mean and std lie nearer the BN's
    running statistics, and stays near the cached input (the anchor); a huge anchor keeps it in place."""
    model, store = _setup(tmp_path)
    stats = bn_statistics(randomize_bn(TinyResNet()))  # BN statistics: randomize_bn's seed alone sets them
    group = _Group([model.units[1]])
    _set_group_state(group, weight=False, act=False)
    targets = [(layer, stats[layer.source]) for _, layer in model.units[1].quant_layers() if layer.source in stats]
    assert [layer.source for layer, _ in targets] == ["layer1.0.conv1", "layer1.0.conv2"]
    memory = Memory("device", CPU)
    x = memory.load(store.unit(store.units[1]).inputs, store.num_samples, 32)

    def outputs(inputs: torch.Tensor) -> list[tuple[torch.Tensor, object]]:
        seen: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) for layer, _ in targets]
        with torch.no_grad():
            group(inputs)
        for handle in handles:
            handle.remove()
        return list(zip(seen, [st for _, st in targets], strict=True))

    original = x.rows(0, x.n)
    loss0 = float(distribution_loss(outputs(original)))
    moved, loss = {}, {}
    for anchor in (1.0, 50.0, 1e6):
        config = ReconConfig(dc_iters=60, dc_lr=1e-2, dc_anchor=anchor, batch_size=16)
        corrected = correct_inputs(group, x, targets, config, memory).rows(0, x.n)
        moved[anchor] = float((corrected - original).abs().mean())
        loss[anchor] = float(distribution_loss(outputs(corrected)))
        if anchor == 1.0:
            gaps = []  # per layer: |per-channel mean - running mean| + |per-channel std - running std|
            for y, st in outputs(original) + outputs(corrected):
                z = st.pre_bn(y).transpose(0, 1).flatten(1)
                gaps.append(float((z.mean(1) - st.mean).abs().mean() + (z.std(1) - st.std).abs().mean()))
            assert gaps[2] < gaps[0] and sum(gaps[2:]) < sum(gaps[:2])  # the first layer's, and all layers'
    assert loss[1.0] < 0.8 * loss0 and loss[1.0] < loss[50.0] < loss0
    assert moved[1.0] > moved[50.0] > 0 and moved[1e6] < 0.01 * moved[1.0]  # the anchor holds the input


def test_pd_quant_runs_end_to_end_and_its_memo_changes_nothing(tmp_path: Path) -> None:
    """Both PD-Quant switches on: the loss falls, and a memo of the corrections shared by two runs gives
    the same model as recomputing them."""
    fp = randomize_bn(TinyResNet())  # the BN statistics _setup's model was folded from (randomize_bn's seed)
    model, store = _setup(tmp_path)
    config = ReconConfig(method="qdrop", iters=30, batch_size=16, seed=0, pd_weight=5.0, dc_iters=10, dc_lr=1e-2)
    plain = copy.deepcopy(model)
    stats = reconstruct(plain, store, [[0], [1], [2], [3]], config, CPU, bn_stats=bn_statistics(fp))
    assert sum(s["loss_after"] for s in stats) < sum(s["loss_before"] for s in stats)
    memo: dict = {}
    for _ in range(2):
        trial = copy.deepcopy(model)
        reconstruct(trial, store, [[0], [1], [2], [3]], config, CPU, bn_stats=bn_statistics(fp), corrections=memo)
        for key, value in plain.state_dict().items():
            assert torch.equal(value, trial.state_dict()[key]), key
    assert set(memo) == {(0,), (1,), (2,)}  # the head has no BN to correct toward
    for pair in memo.values():
        for cache in pair:
            cache.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pd_weight": -1.0}, "pd_weight must be >= 0"),
        ({"pd_temperature": 0.0}, "pd_temperature must be > 0"),
        ({"dc_iters": -1}, "dc_iters must be >= 0"),
        ({"dc_lr": 0.0}, "dc_lr must be > 0"),
        ({"dc_anchor": -1.0}, "dc_anchor must be >= 0"),
        ({"method": "brecq", "pd_weight": 5.0}, "they need method qdrop, got brecq"),
        ({"method": "brecq", "dc_iters": 5}, "they need method qdrop, got brecq"),
    ],
)
def test_pd_quant_keys_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReconConfig(**kwargs)


def test_pd_quant_refuses_layer_granularity_and_missing_statistics(tmp_path: Path) -> None:
    model, store = _setup(tmp_path)
    with pytest.raises(ConfigError, match="not with layer granularity"):
        reconstruct(model, store, [[0], [1], [2], [3]], ReconConfig(pd_weight=1.0, iters=2), CPU, layerwise=True)
    with pytest.raises(ConfigError, match="needs the FP model's BatchNorm statistics"):
        reconstruct(model, store, [[0], [1], [2], [3]], ReconConfig(dc_iters=2, iters=2), CPU)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stop_patience": 2}, "needs both stop_patience > 0 and holdout > 0"),
        ({"holdout": 16}, "needs both stop_patience > 0 and holdout > 0"),
        ({"stop_patience": -1}, "stop_patience must be >= 0"),
        ({"stop_every": 0}, "stop_every must be >= 1"),
        ({"stop_tol": 1.0}, r"stop_tol must be in \[0, 1\)"),
    ],
)
def test_stopping_rule_keys_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReconConfig(**kwargs)


def test_holdout_must_leave_a_batch_to_train_on(tmp_path: Path) -> None:
    model, store = _setup(tmp_path)  # 64 samples
    config = ReconConfig(iters=4, batch_size=16, holdout=56, stop_patience=1)
    with pytest.raises(ConfigError, match="holdout 56 leaves 8 of the store's 64 calibration samples"):
        reconstruct(model, store, [[0], [1], [2], [3]], config, CPU)


@pytest.mark.parametrize(("method", "finish"), [("qdrop", 0.0), ("brecq", 0.0), ("qdrop", 0.2)])
def test_stopping_rule_never_trains_on_the_held_out_samples_and_keeps_the_best_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, finish: float
) -> None:
    """Every mini-batch index lies before the held-out rows; each step stops at an evaluation point (or
    after its finishing anneal, which ends at beta_end) and ends with the hard-rounded weights of its
    lowest held-out loss."""
    import ptqflow.recon.reconstruct as rec

    drawn: list[torch.Tensor] = []
    original_prefetch = rec.prefetch

    def recording_prefetch(caches, indices, depth=2):  # type: ignore[no-untyped-def]
        drawn.extend(indices)
        return original_prefetch(caches, indices, depth)

    seen: dict[int, list[tuple[float, list[torch.Tensor]]]] = {}
    original_loss = rec._Stopper.held_out_loss

    def recording_loss(self: rec._Stopper) -> float:
        loss = original_loss(self)
        for r in self.rounding:
            r.soft = False
        seen.setdefault(id(self.group), []).append((loss, [r().detach().clone() for r in self.rounding]))
        for r in self.rounding:
            r.soft = True
        return loss

    monkeypatch.setattr(rec, "prefetch", recording_prefetch)
    monkeypatch.setattr(rec._Stopper, "held_out_loss", recording_loss)
    model, store = _setup(tmp_path)
    iters, every, holdout = 60, 8, 16
    # a tolerance no step can meet: every step stops after 1 + patience evaluations
    config = ReconConfig(
        method=method, iters=iters, act_iters=5, batch_size=8, warmup=0.2, holdout=holdout, stop_every=every,
        stop_patience=2, stop_tol=0.9, stop_finish=finish, weight_scale_lr=1e-3, seed=2,
    )  # fmt: skip
    betas: list[float | None] = []
    original_beta = rec._Stopper.beta
    monkeypatch.setattr(rec._Stopper, "beta", lambda self, t: betas.append(original_beta(self, t)) or betas[-1])
    stats = reconstruct(model, store, [[0], [1], [2], [3]], config, CPU)
    assert drawn and max(int(idx.max()) for idx in drawn) < store.num_samples - holdout
    optimised = [s for s in stats if s["iters"] != config.act_iters] if method == "brecq" else stats
    begin = 12  # ceil(0.2 * 60)
    finishing = round(finish * iters)  # 12 iterations of annealing after the plateau, or none
    assert [s["iters"] for s in optimised] == [begin + 2 * every + finishing] * len(optimised)
    assert betas[-1] == pytest.approx(config.beta_end if finish else 20.0 - 18.0 * (27 - begin) / (iters - begin))
    assert len(seen) == len(optimised)
    layers = [layer for _, layer in model.quant_layers()]
    finals = {id(layer): layer.layer.weight.detach() for layer in layers}
    for evaluations in seen.values():
        assert len(evaluations) == 3 + (finish > 0)
        best = min(range(len(evaluations)), key=lambda i: evaluations[i][0])
        weights = evaluations[best][1]
        matched = [any(torch.equal(w, final) for final in finals.values()) for w in weights]
        assert all(matched), "a step did not end in its best evaluated state"


def test_stopping_rule_off_by_default_runs_the_whole_schedule(tmp_path: Path) -> None:
    model, store = _setup(tmp_path)
    stats = reconstruct(model, store, [[0], [1], [2], [3]], ReconConfig(iters=20, batch_size=8), CPU)
    assert [s["iters"] for s in stats] == [20, 20, 20, 20]
