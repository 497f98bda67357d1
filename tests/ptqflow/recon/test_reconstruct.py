from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TinyResNet, randomize_bn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import fold_bn
from ptqflow.quant.adaround import AdaRound, beta_schedule
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations
from ptqflow.recon.reconstruct import ReconConfig, plan_steps, reconstruct, reconstruction_loss
from ptqflow.units import extract_units

CPU = torch.device("cpu")


def _setup(tmp_path: Path, bits: tuple[int, int] = (2, 4), n: int = 64) -> tuple[QuantModel, FeatureStore]:
    fp = randomize_bn(TinyResNet())
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
