from __future__ import annotations

import pytest
import torch

from ptqflow.quant.quantizer import ActQuantizer, WeightQuantizer, check_bits, fake_quantize, lp_range_search


def test_hand_computed_grid() -> None:
    # 2 bits, scale 0.5, zero point 1: grid {-0.5, 0, 0.5, 1.0}
    x = torch.tensor([-2.0, -0.5, -0.2, 0.0, 0.26, 0.74, 1.0, 3.0])
    out = fake_quantize(x, torch.tensor(0.5), torch.tensor(1.0), 2)
    assert out.tolist() == [-0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_at_most_half_step_inside_range(bits: int) -> None:
    w = torch.randn(6, 3, 3, 3)
    q = WeightQuantizer(bits, 6)
    q.init_range(w)
    scale = q.scale.view(-1, 1, 1, 1)
    zero = q.zero_point.view(-1, 1, 1, 1)
    lo, hi = -zero * scale, (2**bits - 1 - zero) * scale
    out = q(w)
    inside = (w >= lo) & (w <= hi)
    assert inside.any()
    assert bool(((w - out).abs() <= scale / 2 + 1e-6)[inside].all())
    assert torch.allclose(((out / scale) + zero), ((out / scale) + zero).round(), atol=1e-4)  # on the grid


def test_inference_and_ste_paths_agree() -> None:
    x = torch.randn(1000) * 3
    scale, zero = torch.tensor(0.1), torch.tensor(7.0)
    with torch.no_grad():
        fast = fake_quantize(x, scale, zero, 4)
    slow = fake_quantize(x.clone().requires_grad_(), scale, zero, 4)
    assert torch.equal(fast, slow.detach())


def test_ste_gradient_passes_inside_range() -> None:
    x = torch.tensor([0.3, 100.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), 4).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 0.0]


def test_lp_search_beats_min_max() -> None:
    x = torch.cat([torch.randn(1, 5000), torch.tensor([[40.0]])], dim=1)  # one outlier
    scale, zero = lp_range_search(x, 4)
    minmax_scale = (x.max() - x.min()) / 15
    assert scale.item() < minmax_scale.item()
    err = (x - fake_quantize(x, scale[:, None], zero[:, None], 4)).abs().pow(2.4).mean()
    mm_zero = (-x.min() / minmax_scale).round()
    err_mm = (x - fake_quantize(x, minmax_scale, mm_zero, 4)).abs().pow(2.4).mean()
    assert err < err_mm


def test_relu_activations_get_zero_point_zero() -> None:
    q = ActQuantizer(4)
    q.observing = True
    q(torch.relu(torch.randn(64, 8)))
    q.init_range()
    assert q.zero_point.item() == 0 and q.scale.item() > 0 and not q.observing


def test_init_without_observation_names_the_missing_step() -> None:
    with pytest.raises(RuntimeError, match="no activations observed"):
        ActQuantizer(4).init_range()


@pytest.mark.parametrize("bits", [0, 1, 9, 3.5, True])
def test_bits_out_of_range(bits: object) -> None:
    with pytest.raises(ValueError, match="2..8"):
        check_bits(bits)  # type: ignore[arg-type]
