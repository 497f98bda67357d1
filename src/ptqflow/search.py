"""Mixed-precision search and budget selection (BRECQ section 3.4).

The search minimises, over one weight bit-width per searchable layer, the summed unit sensitivity
(:mod:`ptqflow.sensitivity`) against a hardware cost -- model size (weight bits) or BitOPs
(``sum_j MACs_j * b_w,j * b_a,j``). Rather than one run per budget, the whole Pareto front of
(sensitivity, cost) is found once; :func:`select` then picks the least-sensitive point under any budget
without searching again. Two algorithms compute the front:

* ``exact`` (:func:`exact_front`) -- dynamic programming over units. Both objectives are sums of
  per-unit terms (BRECQ's additivity assumption across units, eq. 10; costs are per layer), so the
  front of units ``1..k`` is built from the front of ``1..k-1`` and unit ``k``'s assignments, keeping
  only non-dominated partial sums: a Pareto-optimal configuration's restriction to any prefix of units
  is itself Pareto-optimal among prefixes, or replacing that prefix would dominate it. The result is the
  true front of the additive model, in a second for the embedded models.
* ``nsga2`` -- the genetic search of BRECQ, NSGA-II (Deb et al. 2002) via pymoo: integer genes (indices
  into the candidate bits), simulated binary crossover and polynomial mutation with rounding repair,
  non-dominated sorting with crowding. The stored front is the non-dominated set of *every*
  configuration evaluated during the run (not only the last population). On the embedded ResNet-20 it
  stops well short of the exact front (README, ``bench/search_quality.py``).

Both are deterministic (the GA under its seed); the front is sorted by cost, so equal inputs give equal
bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ptqflow.errors import ConfigError
from ptqflow.sensitivity import LayerInfo, UnitSensitivity

__all__ = ["BUDGET_KINDS", "BitSpace", "SearchConfig", "exact_front", "pareto_front", "select"]

Cost = Literal["size", "bitops"]
Algorithm = Literal["exact", "nsga2"]
#: Budget kinds :func:`select` accepts, and the front each one is read from.
BUDGET_KINDS: dict[str, Cost] = {"size_mb": "size", "avg_bits": "size", "bitops": "bitops"}


@dataclass(frozen=True)
class SearchConfig:
    """Search settings.

    Args:
        algorithm: ``exact`` (dynamic programming over units) or ``nsga2`` (pymoo's genetic search).
        pop_size: NSGA-II individuals per generation (the uniform configurations are always among the first).
        generations: NSGA-II generations to run.
        seed: seeds pymoo's generator and the initial population (NSGA-II).
        costs: the fronts to compute: ``size`` (weight bits) and/or ``bitops``.
    """

    algorithm: Algorithm = "exact"
    pop_size: int = 50
    generations: int = 100
    seed: int = 0
    costs: tuple[Cost, ...] = ("size", "bitops")

    def __post_init__(self) -> None:
        if self.algorithm not in ("exact", "nsga2"):
            raise ConfigError(f"algorithm must be 'exact' or 'nsga2', got {self.algorithm!r}")
        if self.pop_size < 4:
            raise ConfigError(f"pop_size must be >= 4, got {self.pop_size}")
        if self.generations < 1:
            raise ConfigError(f"generations must be >= 1, got {self.generations}")
        if not self.costs or len(set(self.costs)) != len(self.costs):
            raise ConfigError(f"costs must list size and/or bitops once each, got {list(self.costs)}")


class BitSpace:
    """Genes (one per searchable layer), the summed-sensitivity objective and the costs.

    Args:
        infos: every quantized layer of the model (pinned ones are fixed, not genes).
        units: the sensitivity tables of the units with searchable layers.
        act_bits: activation bits of every layer input the model does not fix (BitOPs only).
    """

    def __init__(self, infos: Sequence[LayerInfo], units: Sequence[UnitSensitivity], act_bits: int = 8) -> None:
        if not units:
            raise ConfigError("no unit has a searchable layer: every layer is pinned (first_last_weight_bits)")
        self.candidates = units[0].candidate_bits
        self.infos = list(infos)
        self.genes = [i for i in infos if i.pinned_bits is None]
        index = {info.name: g for g, info in enumerate(self.genes)}
        self.units = list(units)
        self.unit_genes = [np.array([index[n] for n in u.layers]) for u in units]
        if sorted(int(g) for genes in self.unit_genes for g in genes) != list(range(len(self.genes))):
            raise ConfigError("sensitivity tables do not cover the searchable layers exactly once")
        bits = np.array(self.candidates, dtype=np.float64)
        self._bits = bits
        params = np.array([g.params for g in self.genes], dtype=np.float64)
        self._params = params
        a_bits = {i.name: i.input_bits or act_bits for i in infos}
        self._macs_a = np.array([g.macs * a_bits[g.name] for g in self.genes], dtype=np.float64)
        fixed = [i for i in infos if i.pinned_bits is not None]
        overhead = sum(64 * i.out_channels + 32 * i.bias for i in infos)  # scale + zero point, fp32 bias
        self._fixed_size_bits = overhead + sum(i.params * (i.pinned_bits or 0) for i in fixed)
        self._fixed_bitops = sum(i.macs * (i.pinned_bits or 0) * a_bits[i.name] for i in fixed)

    @property
    def num_genes(self) -> int:
        """Searchable layers."""
        return len(self.genes)

    def sensitivity(self, x: np.ndarray) -> np.ndarray:
        """Summed unit sensitivity of each row of ``x`` ``(P, genes)`` (indices into the candidates)."""
        x = np.atleast_2d(x)
        return np.sum([u.losses(x[:, genes]) for u, genes in zip(self.units, self.unit_genes, strict=True)], axis=0)

    def size_mb(self, x: np.ndarray) -> np.ndarray:
        """Model size in MiB (same accounting as :meth:`ptqflow.quant.model.QuantModel.size_bytes`)."""
        x = np.atleast_2d(x)
        return (self._fixed_size_bits + (self._bits[x] * self._params).sum(axis=1)) / 8 / 2**20

    def avg_bits(self, x: np.ndarray) -> np.ndarray:
        """Parameter-weighted mean weight bits over the searchable layers."""
        x = np.atleast_2d(x)
        return (self._bits[x] * self._params).sum(axis=1) / self._params.sum()

    def bitops(self, x: np.ndarray) -> np.ndarray:
        """BitOPs per sample in units of 10^9 (``sum MACs * b_w * b_a``)."""
        x = np.atleast_2d(x)
        return (self._fixed_bitops + (self._bits[x] * self._macs_a).sum(axis=1)) / 1e9

    def cost(self, name: Cost) -> Callable[[np.ndarray], np.ndarray]:
        """The cost function called ``name``."""
        return self.size_mb if name == "size" else self.bitops

    def cost_weights(self, name: Cost) -> np.ndarray:
        """Per gene, what one weight bit adds to the cost ``name`` (monotone in it; offsets dropped)."""
        return self._params if name == "size" else self._macs_a

    def bits_of(self, x: np.ndarray) -> dict[str, int]:
        """Weight bits per layer name (pinned layers included) for one configuration."""
        genes = {g.name: self.candidates[int(c)] for g, c in zip(self.genes, x, strict=True)}
        return {i.name: genes.get(i.name, i.pinned_bits or 0) for i in self.infos}

    def describe(self, x: np.ndarray) -> dict[str, Any]:
        """A JSON-ready front point: genes, bits per layer and every metric."""
        row = np.asarray(x, dtype=np.int64)[None, :]
        return {
            "genes": [int(c) for c in row[0]],
            "sensitivity": float(f"{self.sensitivity(row)[0]:.12g}"),
            "size_mb": float(f"{self.size_mb(row)[0]:.12g}"),
            "avg_bits": float(f"{self.avg_bits(row)[0]:.12g}"),
            "bitops": float(f"{self.bitops(row)[0]:.12g}"),
            "bits": self.bits_of(row[0]),
        }


def _nondominated(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Indices of the 2-objective non-dominated rows, sorted by cost (f[:, 1]) then sensitivity; equal
    objectives keep the lexicographically smallest genes."""
    by_genes = np.lexsort(x.T[::-1])
    return by_genes[_front_of(f[by_genes, 1], f[by_genes, 0])]


def pareto_front(space: BitSpace, cost: Cost, config: SearchConfig) -> list[dict[str, Any]]:
    """The Pareto front of summed sensitivity against ``cost``, by ``config.algorithm``.

    Args:
        space: genes and objectives.
        cost: ``size`` or ``bitops``.
        config: algorithm; population, generations and seed for NSGA-II.

    Returns:
        Front points (:meth:`BitSpace.describe`), cost ascending, sensitivity strictly descending.
    """
    genes = exact_front(space, cost) if config.algorithm == "exact" else _nsga2(space, cost, config)
    objectives = np.column_stack([space.sensitivity(genes), space.cost(cost)(genes)])
    return [space.describe(genes[i]) for i in _nondominated(genes, objectives)]


def exact_front(space: BitSpace, cost: Cost) -> np.ndarray:
    """Genes ``(points, genes)`` of the exact Pareto front of the additive model, by dynamic programming.

    Units are added one at a time; after each, only the non-dominated partial configurations (cost,
    summed loss) are kept, with back-pointers to rebuild the genes. A unit's options are its
    assignments, except where its table makes some dominated: in ``lowest_subsets`` mode every bit-width
    above the second-lowest has the second-lowest's loss at a higher cost, so only ``2^L`` patterns are
    options; in ``additive`` mode each layer is an independent part with ``C`` options. So each step
    combines the partial front with at most ``max(max_assignments, C)`` options.
    """
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (gene indices, options, losses)
    for unit, genes in zip(space.units, space.unit_genes, strict=True):
        parts.extend(_unit_parts(unit, genes, len(space.candidates)))
    weights = space.cost_weights(cost)
    total_cost, total_loss = np.zeros(1), np.zeros(1)
    trail = []
    for genes, options, losses in parts:
        option_cost = (space._bits[options] * weights[genes][None, :]).sum(axis=1)
        cost_all = (total_cost[:, None] + option_cost[None, :]).ravel()
        loss_all = (total_loss[:, None] + losses[None, :]).ravel()
        keep = _front_of(cost_all, loss_all)
        state, option = np.divmod(keep, len(options))
        trail.append((genes, options, state, option))
        total_cost, total_loss = cost_all[keep], loss_all[keep]
    x = np.zeros((len(total_cost), space.num_genes), dtype=np.int64)
    index = np.arange(len(total_cost))
    for genes, options, state, option in reversed(trail):
        x[:, genes] = options[option[index]]
        index = state[index]
    return x


def _unit_parts(unit: UnitSensitivity, genes: np.ndarray, c: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A unit's independent parts: (its gene indices, option rows of candidate indices, their losses)."""
    n = len(genes)
    if unit.mode == "additive":
        top = np.full((c, n), c - 1, dtype=np.int64)
        base = float(unit.losses(top[:1])[0])
        parts = []
        for j in range(n):
            rows = top.copy()
            rows[:, j] = np.arange(c)
            losses = unit.losses(rows) - (0.0 if j == 0 else base)  # the base loss is counted once
            parts.append((genes[j : j + 1], np.arange(c, dtype=np.int64)[:, None], losses))
        return parts
    values = range(2) if unit.mode == "lowest_subsets" else range(c)
    options = np.array(list(itertools.product(values, repeat=n)), dtype=np.int64).reshape(-1, n)
    return [(genes, options, unit.losses(options))]


def _front_of(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated (cost, loss) pairs, cost ascending; ties keep the lowest index."""
    order = np.lexsort((np.arange(len(cost)), loss, cost))
    best = np.minimum.accumulate(loss[order])
    first = np.ones(len(order), dtype=bool)
    first[1:] = loss[order][1:] < best[:-1]
    return order[first]


def _nsga2(space: BitSpace, cost: Cost, config: SearchConfig) -> np.ndarray:
    """NSGA-II over ``space``: the genes of every configuration it evaluated (deduplicated)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.optimize import minimize

    n, c = space.num_genes, len(space.candidates)
    cost_of = space.cost(cost)
    evaluated: list[np.ndarray] = []

    class _Problem(Problem):  # type: ignore[misc]
        def __init__(self) -> None:
            # Bounds half a step beyond the first and last index: with rounding repair, every index then
            # owns an interval of the same width, so the extreme bit-widths are not half as likely.
            super().__init__(n_var=n, n_obj=2, xl=-0.49, xu=c - 0.51, vtype=int)

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            genes = np.rint(x).astype(np.int64)
            evaluated.append(genes)
            out["F"] = np.column_stack([space.sensitivity(genes), cost_of(genes)])

    rng = np.random.default_rng(config.seed)
    uniform = np.repeat(np.arange(c)[:, None], n, axis=1)
    initial = np.vstack([uniform, rng.integers(0, c, size=(max(config.pop_size - c, 0), n))])[: config.pop_size]
    algorithm = NSGA2(
        pop_size=config.pop_size,
        sampling=initial.astype(np.float64),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    minimize(_Problem(), algorithm, ("n_gen", config.generations), seed=config.seed, verbose=False)
    return np.unique(np.vstack(evaluated), axis=0)


def select(front: Sequence[dict[str, Any]], kind: str, value: float) -> dict[str, Any]:
    """The least-sensitive front point whose ``kind`` (``size_mb``, ``avg_bits``, ``bitops``) is <= ``value``.

    Raises:
        ConfigError: unknown kind, or no point within the budget (names the smallest feasible one).
    """
    if kind not in BUDGET_KINDS:
        raise ConfigError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {kind!r}")
    if not front:
        raise ConfigError("the Pareto front is empty; rerun the search stage")
    feasible = [p for p in front if p[kind] <= value * (1 + 1e-9)]  # stored values carry 12 significant digits
    if not feasible:
        smallest = min(p[kind] for p in front)
        raise ConfigError(f"budget {kind} = {value:g} is infeasible; the smallest feasible {kind} is {smallest:.6g}")
    return min(feasible, key=lambda p: (p["sensitivity"], p[kind]))
