from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyResNet, randomize_bn

from ptqflow.errors import StoreError
from ptqflow.features import FeatureStore, FeatureStoreWriter, extract_features, store_bytes
from ptqflow.fold import fold_bn
from ptqflow.units import extract_units


def _write(
    path: Path, n: int = 20, dtype: str = "float32", grads: bool = True
) -> tuple[list[torch.nn.Module], torch.Tensor, torch.Tensor]:
    units = [u.module for u in extract_units(fold_bn(randomize_bn(TinyResNet())))]
    names = ["stem", "layer1.0", "layer1.1", "head"]
    x = torch.randn(n, 3, 8, 8)
    labels = torch.arange(n) % 10
    shapes = [(8, 8, 8), (8, 8, 8), (16, 4, 4), (10,)]
    writer = FeatureStoreWriter(path, names, (3, 8, 8), shapes, n, dtype, chunk_size=4, shard_size=8, grads=grads)
    batches = iter([(x[i : i + 6], labels[i : i + 6]) for i in range(0, n, 6)])  # batches straddle shards
    extract_features(units, batches, writer, torch.device("cpu"))
    return units, x, labels


def test_round_trip_inputs_outputs(tmp_path: Path) -> None:
    units, x, _ = _write(tmp_path / "s.zarr")
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.units == ["stem", "layer1.0", "layer1.1", "head"] and store.num_samples == 20
    with torch.no_grad():
        h = x
        for i, unit in enumerate(units):
            feats = store.unit(store.units[i])
            torch.testing.assert_close(feats.inputs(slice(0, 20)), h)
            h = unit(h)
            torch.testing.assert_close(feats.outputs(slice(0, 20)), h, atol=1e-5, rtol=1e-5)
    picked = store.unit("layer1.0").outputs(torch.tensor([3, 9, 17]))
    torch.testing.assert_close(picked, store.unit("layer1.0").outputs(slice(0, 20))[[3, 9, 17]])
    store.verify()


def test_gradients_match_autograd_reference(tmp_path: Path) -> None:
    units, x, labels = _write(tmp_path / "s.zarr")
    store = FeatureStore.open(tmp_path / "s.zarr")
    # Naive reference: one backward through the whole model, retain_grad on each unit output.
    h = x
    outs = []
    for unit in units:
        h = unit(h)
        h.retain_grad()
        outs.append(h)
    torch.nn.functional.cross_entropy(h, labels, reduction="sum").backward()
    for name, out in zip(store.units, outs, strict=True):
        torch.testing.assert_close(store.unit(name).grads(slice(0, 20)), out.grad, atol=1e-5, rtol=1e-4)


def test_store_without_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """grads=False: no gradient arrays (half the bytes here), a forward pass only, the same outputs, and
    reading a gradient names the switch."""
    backward_calls: list[int] = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backward_calls.append(1) or real_grad(*a, **k))
    torch.manual_seed(0)
    _write(tmp_path / "none.zarr", grads=False)
    assert not backward_calls
    torch.manual_seed(0)
    _write(tmp_path / "all.zarr", grads=True)
    assert backward_calls
    without, with_ = FeatureStore.open(tmp_path / "none.zarr"), FeatureStore.open(tmp_path / "all.zarr")
    assert not without.has_grads and with_.has_grads
    assert not any("grad" in key for key in without.meta["arrays"]) and without.meta["grads"] is False
    for name in without.units:
        assert torch.equal(without.unit(name).outputs(slice(0, 20)), with_.unit(name).outputs(slice(0, 20)))
    with pytest.raises(StoreError, match="features.grads: true"):
        without.unit("head").grads(slice(0, 2))
    size = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        for p in (tmp_path / "none.zarr", tmp_path / "all.zarr")
    }
    assert size["none.zarr"] < 0.65 * size["all.zarr"], size


def test_store_bytes_is_the_uncompressed_size() -> None:
    assert store_bytes((3, 8, 8), [(8, 8, 8), (10,)], 20, "float16", grads=False) == 20 * (192 + 512 + 10) * 2
    assert store_bytes((3, 8, 8), [(8, 8, 8), (10,)], 20, "float32", grads=True) == 20 * (192 + 2 * 522) * 4


def test_few_files_thanks_to_sharding(tmp_path: Path) -> None:
    _write(tmp_path / "s.zarr", n=20)
    chunk_files = [p for p in (tmp_path / "s.zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    # 9 arrays x 3 shards (8 + 8 + 4 samples), each shard one file holding 2 chunks.
    assert len(chunk_files) == 9 * 3


def test_identical_inputs_give_identical_bytes(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    torch.manual_seed(0)
    _write(tmp_path / "a.zarr")
    torch.manual_seed(0)
    _write(tmp_path / "b.zarr")
    assert digest(tmp_path / "a.zarr") == digest(tmp_path / "b.zarr")
    text = (tmp_path / "a.zarr" / "zarr.json").read_text()
    assert str(tmp_path) not in text


def test_float16_store(tmp_path: Path) -> None:
    _write(tmp_path / "h.zarr", dtype="float16")
    store = FeatureStore.open(tmp_path / "h.zarr")
    assert store.dtype == "float16" and store.unit("stem").outputs(slice(0, 2)).dtype == torch.float32


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    _write(tmp_path / "s.zarr")
    shard = sorted((tmp_path / "s.zarr" / "units" / "layer1.0" / "output").rglob("c/*/*/*/0"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"array units/layer1.0/output shard 0 .*dvc repro features"):
        FeatureStore.open(tmp_path / "s.zarr").verify()


def test_all_zero_shards_are_written_and_checked(tmp_path: Path) -> None:
    """zarr skips chunks equal to the fill value by default; the store writes them so each has a hash."""
    writer = FeatureStoreWriter(tmp_path / "z.zarr", ["u"], (2,), [(2,)], 4, chunk_size=2, shard_size=2)
    writer.append(torch.zeros(4, 2), [torch.ones(4, 2)], [torch.zeros(4, 2)])
    writer.close()
    store = FeatureStore.open(tmp_path / "z.zarr")
    store.verify()
    assert torch.equal(store.unit("u").grads(slice(0, 4)), torch.zeros(4, 2))


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not found or incomplete.*dvc repro features"):
        FeatureStore.open(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(store=str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["format"] = "x"
    with pytest.raises(StoreError, match="not a ptqflow feature store"):
        FeatureStore.open(tmp_path / "other.zarr")
    g = zarr.open_group(store=str(tmp_path / "v9.zarr"), mode="w", zarr_format=3)
    g.attrs.update({"format": "ptqflow-features", "version": 9})
    with pytest.raises(StoreError, match="format version 9"):
        FeatureStore.open(tmp_path / "v9.zarr")


def test_writer_rejects_excess_samples(tmp_path: Path) -> None:
    writer = FeatureStoreWriter(tmp_path / "w.zarr", ["u"], (2,), [(2,)], 4, chunk_size=2, shard_size=2)
    with pytest.raises(StoreError, match="more samples"):
        writer.append(torch.zeros(5, 2), [torch.zeros(5, 2)], [torch.zeros(5, 2)])
    assert np.asarray(writer.arrays["input"][:]).shape == (4, 2)


def _damage(store: Path, array: str, shard: int, how: str) -> None:
    """``flip``: one bit mid-file (the codec may or may not notice); ``header``: the first chunk's blosc
    header overwritten, so the codec itself fails on every build."""
    (path,) = [p for p in (store / array / "c" / str(shard)).rglob("*") if p.is_file()]
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data[:16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_header_damage_makes_the_codec_fail(tmp_path: Path) -> None:
    """The premise of the ``header`` cases below: unchecked, zarr's own read raises inside blosc."""
    import zarr

    _write(tmp_path / "s.zarr")
    _damage(tmp_path / "s.zarr", "units/layer1.0/output", 1, "header")
    array = zarr.open_group(store=str(tmp_path / "s.zarr"), mode="r")["units/layer1.0/output"]
    with pytest.raises(Exception, match="blosc"):
        array[8:16]


@pytest.mark.parametrize("how", ["flip", "header"])
@pytest.mark.parametrize(
    "index", [slice(0, 20), slice(9, 12), [10, 3], torch.tensor([15]), np.array([-5])], ids=lambda i: repr(i)[:12]
)
def test_corrupt_shard_is_never_returned(tmp_path: Path, index: object, how: str) -> None:
    """Readers check each shard file's sha256 before decoding it: any read touching shard 1 fails with the
    checksum error naming shard 1, whatever the damage does to the codec (a read spanning shards included)."""
    _write(tmp_path / "s.zarr")
    _damage(tmp_path / "s.zarr", "units/layer1.0/output", 1, how)
    store = FeatureStore.open(tmp_path / "s.zarr")
    store.unit("layer1.0").outputs(slice(0, 8))  # shard 0 is intact
    store.unit("stem").outputs(slice(0, 20))  # other arrays are intact
    with pytest.raises(StoreError, match=r"units/layer1.0/output shard 1 fails its checksum; .*dvc repro features"):
        store.unit("layer1.0").outputs(index)  # type: ignore[arg-type]


def test_checked_shards_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "s.zarr")
    store = FeatureStore.open(tmp_path / "s.zarr")
    first = store.unit("head").outputs(slice(2, 19))
    calls: list[str] = []
    original = FeatureStore._check_shard
    monkeypatch.setattr(FeatureStore, "_check_shard", lambda self, *a: calls.append(a[0]) or original(self, *a))
    torch.testing.assert_close(store.unit("head").outputs(slice(2, 19)), first)
    assert calls == []
    assert store.unit("layer1.0").inputs([4]).shape == (1, 8, 8, 8) and calls == ["units/stem/output"]


def test_manifest_holds_shape_and_dtype_per_array(tmp_path: Path) -> None:
    _write(tmp_path / "s.zarr", dtype="float16")
    arrays = FeatureStore.open(tmp_path / "s.zarr").meta["arrays"]
    assert arrays["input"] == {"shape": [20, 3, 8, 8], "dtype": "float16"}
    assert arrays["units/layer1.1/grad"] == {"shape": [20, 16, 4, 4], "dtype": "float16"}
    assert len(arrays) == 9
