"""base.memory: the three places a reconstruction step keeps its cached tensors give the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TinyResNet, randomize_bn

from ptqflow.errors import ConfigError
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features
from ptqflow.fold import bn_statistics, fold_bn
from ptqflow.quant.model import QuantConfig, QuantModel, build_quant_model, calibrate_activations
from ptqflow.recon.cache import Memory, layout, prefetch
from ptqflow.recon.reconstruct import ReconConfig, reconstruct
from ptqflow.units import extract_units

CPU = torch.device("cpu")


def _setup(tmp_path: Path, n: int = 48) -> tuple[QuantModel, FeatureStore]:
    torch.manual_seed(0)
    fp = randomize_bn(TinyResNet())
    units = extract_units(fold_bn(fp))
    x = TinyResNet.example_inputs(n)
    labels = torch.arange(n) % 10
    shapes = [(8, 8, 8), (8, 8, 8), (16, 4, 4), (10,)]
    path = tmp_path / "s.zarr"
    if not path.exists():
        writer = FeatureStoreWriter(path, [u.name for u in units], (3, 8, 8), shapes, n, chunk_size=8, shard_size=16)
        extract_features([u.module for u in units], iter([(x, labels)]), writer, CPU)
    store = FeatureStore.open(path)
    model = build_quant_model(
        fp, QuantConfig(weight_bits=2, act_bits=4, first_last_weight_bits=None, convention="qdrop")
    )
    calibrate_activations(model, lambda i: store.iter_inputs(i, 16), 2.4, CPU)
    return model, store


def _run(tmp_path: Path, memory: str, config: ReconConfig, layerwise: bool = False) -> tuple[dict, list]:
    model, store = _setup(tmp_path)
    scratch = tmp_path / f"scratch-{memory}"
    scratch.mkdir(exist_ok=True)
    torch.manual_seed(0)
    bn_stats = bn_statistics(randomize_bn(TinyResNet()))  # randomize_bn's seed alone sets them
    stats = reconstruct(
        model,
        store,
        [[0], [1, 2], [3]],
        config,
        CPU,
        layerwise=layerwise,
        memory=memory,
        scratch=scratch,
        bn_stats=bn_stats,
    )
    assert not list(scratch.iterdir()), "stream left spill files behind"
    return {k: v.clone() for k, v in model.state_dict().items()}, stats


@pytest.mark.parametrize(
    ("method", "loss", "layerwise"),
    [
        ("qdrop", "mse", False),
        ("qdrop", "fisher", False),
        ("brecq", "mse", False),
        ("brecq", "mse", True),
        ("pdquant", "mse", False),
    ],
)
def test_every_memory_mode_gives_the_same_model(tmp_path: Path, method: str, loss: str, layerwise: bool) -> None:
    """device, cpu and stream: bit-identical state and losses (QDrop's mix, BRECQ's activation phase,
    the Fisher loss's gradients, the layer-wise captures, PD-Quant's logits and corrected inputs all go
    through the caches)."""
    pd = {"pd_weight": 5.0, "dc_iters": 4} if method == "pdquant" else {}
    config = ReconConfig(
        method="brecq" if method == "brecq" else "qdrop",
        iters=12,
        act_iters=6,
        batch_size=8,
        loss=loss,
        keep_prob=0.5,
        seed=2,
        **pd,  # type: ignore[arg-type]
    )
    reference, ref_stats = _run(tmp_path, "device", config, layerwise)
    for memory in ("cpu", "stream"):
        state, stats = _run(tmp_path, memory, config, layerwise)
        for key, value in reference.items():
            assert torch.equal(value, state[key]), (memory, key)
        assert [(s["loss_before"], s["loss_after"]) for s in stats] == [
            (s["loss_before"], s["loss_after"]) for s in ref_stats
        ], memory
    assert all(s["iter_ms"] > 0 and s["peak_rss_mb"] > 0 for s in ref_stats)


def test_stream_reads_the_rows_asked_for_in_order(tmp_path: Path) -> None:
    memory = Memory("stream", CPU, tmp_path)
    values = torch.randn(37, 3, 5, 4)
    cached = memory.load(lambda s: values[s], 37, chunk=8)
    plain = Memory("device", CPU).load(lambda s: values[s], 37, chunk=10)
    indices = [torch.randint(0, 37, (6,)) for _ in range(9)]
    got = list(prefetch([cached, None, plain], indices, depth=3))
    assert len(got) == 9
    for idx, (a, none, b) in zip(indices, got, strict=True):
        assert none is None and a is not None and b is not None
        assert torch.equal(a, values[idx]) and torch.equal(b, values[idx])
        assert a.is_contiguous(memory_format=torch.channels_last) and b.stride() == a.stride()
    assert torch.equal(cached.rows(30, 37), layout(values[30:37]))
    spill = list(tmp_path.iterdir())
    assert len(spill) == 1 and spill[0].stat().st_size == values.numel() * 4
    cached.close()
    assert not list(tmp_path.iterdir())


def test_bad_memory_mode() -> None:
    with pytest.raises(ConfigError, match="device, cpu, stream"):
        Memory("disk", CPU)
    with pytest.raises(ConfigError, match="scratch"):
        Memory("stream", CPU)
