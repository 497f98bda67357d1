"""The exact and NSGA-II fronts against brute force on synthetic additive problems; budget selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ptqflow.errors import ConfigError
from ptqflow.search import BitSpace, SearchConfig, pareto_front, select
from ptqflow.sensitivity import LayerInfo, UnitSensitivity, _assignments

CANDS = (2, 4, 8)


def _ga(pop_size: int, generations: int, seed: int) -> SearchConfig:
    return SearchConfig(algorithm="nsga2", pop_size=pop_size, generations=generations, seed=seed)


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


def test_nsga2_front_contains_the_true_optimum_at_every_budget() -> None:
    space = _synthetic()
    front = pareto_front(space, "size", _ga(24, 40, 1))
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
    fronts = {c: pareto_front(space, c, _ga(24, 30, 0)) for c in ("size", "bitops")}
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


def test_nsga2_is_deterministic_under_the_seed() -> None:
    space = _synthetic()
    config = _ga(16, 10, 7)
    assert pareto_front(space, "size", config) == pareto_front(space, "size", config)


def test_infeasible_budget_names_the_smallest_feasible() -> None:
    front = pareto_front(_synthetic(), "size", _ga(12, 5, 0))
    smallest = min(p["avg_bits"] for p in front)
    assert smallest == pytest.approx(2.0)  # the all-2-bit configuration is always in the first population
    with pytest.raises(ConfigError, match="smallest feasible avg_bits is 2"):
        select(front, "avg_bits", 1.5)
    with pytest.raises(ConfigError, match="budget kind must be one of"):
        select(front, "latency", 1.0)


def _pruned(seed: int, cands: tuple[int, ...], layers: tuple[int, ...], max_assignments: int) -> BitSpace:
    """Units of ``layers`` searchable layers each, measured the way the sensitivity stage would at
    ``max_assignments`` (exhaustive, lowest-subsets or additive tables), with random interacting losses."""
    rng = np.random.default_rng(seed)
    infos, tables = [], []
    for u, n in enumerate(layers):
        names = [f"u{u}.l{j}" for j in range(n)]
        for j, name in enumerate(names):
            params = int(rng.integers(20, 400))
            infos.append(LayerInfo(name, u, params, 4, 0, params * int(rng.integers(4, 64)), 1 + j % 2, None, None))
        mode, assignments = _assignments(n, cands, max_assignments)
        scale = rng.uniform(0.5, 2, size=n)
        measured = []
        for bits in assignments:
            loss = sum(s * 2.0 ** (-1.5 * b) for s, b in zip(scale, bits, strict=True))
            loss += rng.uniform(0, 0.05) * sum(b == cands[0] for b in bits) ** 2  # in-unit interaction
            measured.append((bits, float(loss)))
        tables.append(UnitSensitivity(f"u{u}", names, mode, cands, measured))
    return BitSpace(infos, tables, act_bits=4)


def _true_front(space: BitSpace, cost: str) -> list[tuple[float, float]]:
    """(cost, sensitivity) of the brute-force front, cost ascending."""
    everything = np.array(list(itertools.product(range(len(space.candidates)), repeat=space.num_genes)))
    f = np.column_stack([space.sensitivity(everything), space.cost(cost)(everything)])  # type: ignore[arg-type]
    front, best = [], np.inf
    for i in np.lexsort((f[:, 0], f[:, 1])):
        if f[i, 0] < best:
            front.append((float(f[i, 1]), float(f[i, 0])))
            best = f[i, 0]
    return front


@pytest.mark.parametrize(
    ("cands", "layers", "max_assignments", "modes"),
    [
        (CANDS, (2, 2, 2), 81, {"exhaustive"}),
        ((2, 3, 4, 8), (1, 3, 2, 1), 16, {"exhaustive", "lowest_subsets"}),  # 4^3 > 16 >= 2^3
        ((2, 4, 8), (2, 3, 1, 2), 6, {"exhaustive", "lowest_subsets", "additive"}),  # 2^3 > 6
    ],
)
@pytest.mark.parametrize("cost", ["size", "bitops"])
def test_exact_front_is_the_brute_force_front(
    cands: tuple[int, ...], layers: tuple[int, ...], max_assignments: int, modes: set[str], cost: str
) -> None:
    space = _pruned(1, cands, layers, max_assignments)
    assert {t.mode for t in space.units} == modes
    front = pareto_front(space, cost, SearchConfig(algorithm="exact"))  # type: ignore[arg-type]
    key = "size_mb" if cost == "size" else "bitops"
    got = [(p[key], p["sensitivity"]) for p in front]
    want = _true_front(space, cost)
    assert len(got) == len(want)
    for (gc, gs), (wc, ws) in zip(got, want, strict=True):
        assert gc == pytest.approx(wc, rel=1e-10) and gs == pytest.approx(ws, rel=1e-10)
    # every point's stored values are those of its genes
    for p in front:
        genes = np.array(p["genes"])[None]
        assert p["sensitivity"] == pytest.approx(float(space.sensitivity(genes)[0]), rel=1e-11)


def test_exact_front_is_never_beaten_by_nsga2() -> None:
    """Nine units, 20 genes, four candidates (4^20 configurations, the embedded ResNet-20's shape): at the
    cost of every point NSGA-II finds, the exact front is at least as good."""
    space = _pruned(4, (2, 3, 4, 8), (2, 2, 2, 3, 2, 2, 3, 2, 2), 81)
    exact = pareto_front(space, "size", SearchConfig())
    ga = pareto_front(space, "size", _ga(20, 20, 0))
    for point in ga:
        assert select(exact, "size_mb", point["size_mb"])["sensitivity"] <= point["sensitivity"] * (1 + 1e-9)
    assert pareto_front(space, "size", SearchConfig()) == exact  # deterministic
    assert exact[0]["avg_bits"] == pytest.approx(2.0) and exact[-1]["avg_bits"] == pytest.approx(8.0)


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ConfigError, match="algorithm must be 'exact' or 'nsga2', got 'ga'"):
        SearchConfig(algorithm="ga")  # type: ignore[arg-type]
