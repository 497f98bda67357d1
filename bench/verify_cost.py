"""Cost of the feature store's per-shard sha256 checks, on a real store (the demo's, by default).

Readers check each shard the first time it is read (``FeatureStore.read``). This times, on one store,
three ways of reading every sample of every array once (what ``reconstruct`` does over its steps):

* ``raw``: zarr decode only, no check (what readers did before the checks existed);
* ``checked``: ``FeatureStore.read`` on a freshly opened store, so every shard is checked once;
* ``verify()``: the eager full check alone (the alternative of checking everything on open);

and the ``quantize`` access pattern (the first ``calib_size`` samples of every unit input, in batches),
raw and checked. Medians over ``--repeats`` runs, alternating the variants so machine load hits both.

    python bench/verify_cost.py [--store data/features/store.zarr] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ptqflow.features import FeatureStore


def _all_raw(store: FeatureStore) -> None:
    for key in store.meta["arrays"]:
        np.ascontiguousarray(store.group[key][:], dtype=np.float32)


def _all_checked(store: FeatureStore) -> None:
    for key in store.meta["arrays"]:
        store.read(key, slice(0, store.num_samples))


def _quantize_pattern(store: FeatureStore, raw: bool, calib: int = 256, batch: int = 64) -> None:
    for position, name in enumerate(store.units):
        key = "input" if position == 0 else f"units/{store.units[position - 1]}/output"
        for start in range(0, min(calib, store.num_samples), batch):
            stop = min(start + batch, calib, store.num_samples)
            if raw:
                np.ascontiguousarray(store.group[key][start:stop], dtype=np.float32)
            else:
                store.read(key, slice(start, stop))
        del name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("data/features/store.zarr"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    variants: dict[str, Callable[[FeatureStore], None]] = {
        "read all, raw": _all_raw,
        "read all, checked": _all_checked,
        "verify() alone": FeatureStore.verify,
        "quantize pattern, raw": lambda s: _quantize_pattern(s, raw=True),
        "quantize pattern, checked": lambda s: _quantize_pattern(s, raw=False),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, func in variants.items():
            store = FeatureStore.open(args.store)  # fresh: no shard checked yet
            began = time.perf_counter()
            func(store)
            times[name].append(time.perf_counter() - began)

    store = FeatureStore.open(args.store)
    decoded = sum(
        int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize for spec in store.meta["arrays"].values()
    )
    on_disk = sum(p.stat().st_size for p in args.store.rglob("*") if p.is_file())
    shards = sum(len(v) for v in store.meta["checksums"].values())
    print(f"store {args.store}: {store.num_samples} samples, {len(store.meta['arrays'])} arrays, {shards} shards, ")
    print(f"  {decoded / 2**20:.1f} MiB decoded, {on_disk / 2**20:.1f} MiB on disk; medians of {args.repeats} runs")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, value in med.items():
        print(f"  {name:28s} {value:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  checked / raw, read all:         {med['read all, checked'] / med['read all, raw']:.3f}")
    print(f"  checked / raw, quantize pattern: {med['quantize pattern, checked'] / med['quantize pattern, raw']:.3f}")


if __name__ == "__main__":
    main()
