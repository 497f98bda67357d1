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


def _reference_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The autograd composition fake_quantize replaced (torch.clamp's own gradient)."""
    q = torch.clamp((x / scale).round().detach() - (x / scale).detach() + x / scale + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def test_masked_clamp_gradient_is_torch_clamps_bit_for_bit() -> None:
    """The where-free backward gives the same values and the same x and step gradients as torch.clamp,
    values on the grid's bounds included (torch passes no gradient at a bound)."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000) * 3, torch.tensor([0.0, 0.9, 4.5, -0.9, 3.0])])  # 3.0 / 0.3 + 3 = 13
    grad = torch.randn_like(x)
    results = []
    for fn in (_reference_fake_quantize, fake_quantize):
        xx, s = x.clone().requires_grad_(True), torch.tensor(0.3, requires_grad=True)
        y = fn(xx, s, torch.tensor(3.0), 4)
        y.backward(grad)
        results.append((y.detach(), xx.grad, s.grad))
    (y0, gx0, gs0), (y1, gx1, gs1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1) and torch.equal(gs0, gs1)


def test_qdrop_mix_is_where_bit_for_bit() -> None:
    """QDrop's drop as products with the 0/1 mask: the values and gradients torch.where gives."""
    q = ActQuantizer(4)
    q.observing = False
    q.zero_point.fill_(2.0)
    q.keep_prob = 0.5
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch.manual_seed(5)
    out = q(x)
    torch.manual_seed(5)
    keep = torch.rand_like(x) < 0.5
    ref = torch.where(keep, q.fake_quantize(x, q.scale.abs().clamp_min(1e-8)), x)
    assert torch.equal(out, ref)
    g_out, g_ref = torch.autograd.grad(out.sum(), x), torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g_out[0], g_ref[0])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_search_keeps_zero_point_half_range(bits: int) -> None:
    x = torch.randn(5, 300)
    scale, zero = lp_range_search(x, bits, symmetric=True)
    assert torch.all(zero == 2 ** (bits - 1))
    # every candidate maps max|x| (shrunk by 1 % steps) to the largest positive integer 2^(b-1) - 1
    ratio = (x.abs().amax(dim=1) / (2 ** (bits - 1) - 1)) / scale
    assert torch.all((ratio >= 1 - 1e-5) & (ratio <= 1 / (1 - 0.79) + 1e-5))
    q = fake_quantize(x, scale[:, None], zero[:, None], bits)
    centred = q / scale[:, None]
    assert torch.allclose(centred, centred.round(), atol=1e-4)  # signed integers on a grid holding 0
    assert centred.round().min() >= -(2 ** (bits - 1)) and centred.round().max() <= 2 ** (bits - 1) - 1
    assert torch.equal(fake_quantize(torch.zeros(5, 1), scale[:, None], zero[:, None], bits), torch.zeros(5, 1))


def test_symmetric_relu_output_uses_the_positive_half() -> None:
    q = ActQuantizer(4, symmetric=True)
    q.observing = True
    q(torch.relu(torch.randn(64, 8)))
    q.init_range()
    assert q.zero_point.item() == 8  # ONNX zero point 0 in a signed container
    out = q(torch.relu(torch.randn(64, 8)))
    assert (out / q.scale.detach()).round().max() <= 7  # TensorRT's INT grid: 8 non-negative levels at 4 bits
