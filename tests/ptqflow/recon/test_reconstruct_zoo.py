"""Reconstruction smoke runs on the papers' six ImageNet models: random weights, 64x64 inputs, 2 iterations."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import feature_store, randomize_bn

from ptqflow.fold import fold_bn
from ptqflow.models import build_model
from ptqflow.quant.model import QuantConfig, build_quant_model, calibrate_activations
from ptqflow.quant.quantizer import fake_quantize, lp_range_search
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units

CPU = torch.device("cpu")
#: Seconds on 2 shared CPU cores decide the marks: the heavier nets run only with -m slow.
LIGHT = {"resnet18", "mobilenet_v2", "mnasnet1_0"}
MODELS = ["resnet18", "resnet50", "mobilenet_v2", "regnet_x_600mf", "regnet_x_3_2gf", "mnasnet1_0"]


@pytest.mark.parametrize("name", [pytest.param(m, marks=[] if m in LIGHT else [pytest.mark.slow]) for m in MODELS])
@pytest.mark.parametrize("method", ["qdrop", "brecq"])
def test_reconstruction_smoke(name: str, method: str, tmp_path: Path) -> None:
    began = time.perf_counter()
    n = 8
    fp = randomize_bn(build_model(f"torchvision.{name}"))
    units = extract_units(fold_bn(fp))
    x = torch.randn(n, 3, 64, 64)
    store = feature_store(units, x, torch.arange(n) % 1000, tmp_path / "s.zarr", chunk_size=4, shard_size=8)
    convention = "qdrop" if method == "qdrop" else "brecq"
    model = build_quant_model(
        fp, QuantConfig(weight_bits=2, act_bits=4, convention=convention, calib_size=n), init_weights=False
    )
    for _, layer in model.quant_layers():
        # min/max ranges (one candidate of the Lp search): the 80-candidate search over every weight of
        # these nets would take most of the run, and the smoke test is about the reconstruction loop.
        q, w = layer.weight_quantizer, layer.layer.weight
        scale, zero = lp_range_search(w.detach().reshape(w.shape[0], -1), q.bits, steps=1)
        q.scale.copy_(scale)
        q.zero_point.copy_(zero)
    calibrate_activations(model, lambda i: store.iter_inputs(i, n), 2.4, CPU)
    config = ReconConfig(
        method=method, iters=2, act_iters=1, batch_size=4, keep_prob=0.5 if method == "qdrop" else 1.0
    )
    groups = [[i] for i in range(len(units))]
    skip = frozenset([0]) if convention == "brecq" else frozenset()
    stats = reconstruct(model, store, groups, config, CPU, skip=skip)

    steps = len(units) - len(skip)
    assert len(stats) == (steps if method == "qdrop" else 2 * steps)
    assert all(torch.isfinite(torch.tensor([s["loss_before"], s["loss_after"]])).all() for s in stats)
    for layer_name, layer in model.quant_layers():
        if convention == "brecq" and layer_name.startswith("stem."):
            continue  # BRECQ's stem is never reconstructed: it keeps FP weights, rounded to nearest on the fly
        q = layer.weight_quantizer
        w = layer.layer.weight
        on_grid = fake_quantize(
            w, q.scale.view(-1, *[1] * (w.dim() - 1)), q.zero_point.view(-1, *[1] * (w.dim() - 1)), q.bits
        )
        torch.testing.assert_close(w, on_grid, atol=1e-5, rtol=1e-5, msg=layer_name)  # hard-rounded onto its grid
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    print(f"{name} {method}: {len(units)} units, {time.perf_counter() - began:.1f} s")
