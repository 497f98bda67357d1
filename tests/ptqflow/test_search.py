"""The NSGA-II front against brute force on a synthetic additive problem; budget selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ptqflow.errors import ConfigError
from ptqflow.search import BitSpace, SearchConfig, pareto_front, select
from ptqflow.sensitivity import LayerInfo, UnitSensitivity

CANDS = (2, 4, 8)


def _synthetic(seed: int = 0) -> BitSpace:
    """Three units of two searchable layers (3^6 = 729 configurations) plus a pinned first layer.

    Each unit's loss is additive over its layers plus an interaction term when both layers take 2 bits,
    so the in-unit joint table matters.
    """
    rng = np.random.default_rng(seed)
    infos = [LayerInfo("stem.conv", 0, 100, 4, 0, 1000, 1, 8, 8)]
    tables = []
    for u in range(3):
        names = [f"u{u}.a", f"u{u}.b"]
        for j, name in enumerate(names):
            params = int(rng.integers(50, 500))
            infos.append(LayerInfo(name, u + 1, params, 8, 8, params * 10, 1 + j, None, None))
        per_layer = {n: {2: rng.uniform(1, 5), 4: rng.uniform(0.1, 0.5), 8: rng.uniform(0, 0.01)} for n in names}
        measured = []
        for bits in itertools.product(CANDS, repeat=2):
            loss = sum(per_layer[n][b] for n, b in zip(names, bits, strict=True))
            if bits == (2, 2):
                loss += rng.uniform(0, 3)
            measured.append((bits, float(loss)))
        tables.append(UnitSensitivity(f"u{u}", names, "exhaustive", CANDS, measured))
    return BitSpace(infos, tables, act_bits=4)


def _brute_force(space: BitSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    everything = np.array(list(itertools.product(range(3), repeat=space.num_genes)))
    return everything, space.sensitivity(everything), space.size_mb(everything)


def test_front_contains_the_true_optimum_at_every_budget() -> None:
    space = _synthetic()
    front = pareto_front(space, "size", SearchConfig(pop_size=24, generations=40, seed=1))
    _, sens, size = _brute_force(space)
    budgets = np.unique(size)
    for budget in budgets:
        best = sens[size <= budget].min()
        chosen = select(front, "size_mb", float(budget))
        assert chosen["size_mb"] <= budget * (1 + 1e-9)  # front values are stored with 12 significant digits
        assert chosen["sensitivity"] == pytest.approx(best, rel=1e-7), f"budget {budget}"
    # the front is a front: cost ascending, sensitivity strictly descending
    costs = [p["size_mb"] for p in front]
    losses = [p["sensitivity"] for p in front]
    assert costs == sorted(costs) and all(a > b for a, b in zip(losses[:-1], losses[1:], strict=True))


def test_bitops_front_and_budget_kinds_are_respected() -> None:
    space = _synthetic(seed=3)
    fronts = {c: pareto_front(space, c, SearchConfig(pop_size=24, generations=30, seed=0)) for c in ("size", "bitops")}
    rng = np.random.default_rng(0)
    for kind, cost in (("size_mb", "size"), ("avg_bits", "size"), ("bitops", "bitops")):
        lo, hi = min(p[kind] for p in fronts[cost]), max(p[kind] for p in fronts[cost])
        for budget in rng.uniform(lo, hi, size=20):
            assert select(fronts[cost], kind, float(budget))[kind] <= budget
    point = fronts["bitops"][0]
    genes = np.array(point["genes"])
    assert point["bitops"] == pytest.approx(float(space.bitops(genes[None])[0]))
    # BitOPs by hand: sum MACs * weight bits * activation bits (the pinned first layer reads the 8-bit image)
    macs = {i.name: (i.macs, i.input_bits or 4) for i in space.infos}
    by_hand = sum(macs[n][0] * b * macs[n][1] for n, b in point["bits"].items()) / 1e9
    assert point["bitops"] == pytest.approx(by_hand)


def test_search_is_deterministic_under_the_seed() -> None:
    space = _synthetic()
    config = SearchConfig(pop_size=16, generations=10, seed=7)
    assert pareto_front(space, "size", config) == pareto_front(space, "size", config)


def test_infeasible_budget_names_the_smallest_feasible() -> None:
    front = pareto_front(_synthetic(), "size", SearchConfig(pop_size=12, generations=5, seed=0))
    smallest = min(p["avg_bits"] for p in front)
    assert smallest == pytest.approx(2.0)  # the all-2-bit configuration is always in the first population
    with pytest.raises(ConfigError, match="smallest feasible avg_bits is 2"):
        select(front, "avg_bits", 1.5)
    with pytest.raises(ConfigError, match="budget kind must be one of"):
        select(front, "latency", 1.0)
