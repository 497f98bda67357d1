"""The exact front against NSGA-II on a sensitivity tables file: time, front size, loss at budgets.

For each algorithm setting, the summed sensitivity of the point ``select`` would pick at a few
average-weight-bit budgets, and how much larger it is than the exact front's (the exact front is the
optimum of the additive model, so the ratio is >= 1). Medians of ``--repeats`` timings.

    python bench/search_quality.py [--tables data/sensitivity/tables.json] [--budgets 2.5 3.0 3.5]
        [--generations 60 200 1000] [--pop-size 50] [--seeds 0 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import ROOT

from ptqflow.search import SearchConfig, pareto_front, select
from stages.search import load_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=Path, default=ROOT / "data" / "sensitivity" / "tables.json")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    parser.add_argument("--generations", type=int, nargs="+", default=[60, 200, 1000])
    parser.add_argument("--pop-size", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    space, document = load_space(args.tables, act_bits=4)
    print(
        f"{document['model']}: {space.num_genes} searchable layers, candidates {list(space.candidates)}, "
        f"{len(space.candidates) ** space.num_genes:.2e} configurations\n"
    )

    def run(config: SearchConfig, repeats: int) -> tuple[list[dict], float]:
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            front = pareto_front(space, "size", config)
            seconds.append(time.perf_counter() - began)
        return front, statistics.median(seconds)

    exact, exact_s = run(SearchConfig(algorithm="exact"), args.repeats)
    best = {b: select(exact, "avg_bits", b)["sensitivity"] for b in args.budgets}
    header = ["algorithm", "seed", "seconds", "front points", *(f"loss at {b} bits (x exact)" for b in args.budgets)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    cells = [f"{best[b]:.5f}" for b in args.budgets]
    print(f"| exact | - | {exact_s:.2f} | {len(exact)} | " + " | ".join(cells) + " |", flush=True)
    for generations in args.generations:
        for seed in args.seeds:
            config = SearchConfig(algorithm="nsga2", pop_size=args.pop_size, generations=generations, seed=seed)
            front, seconds = run(config, 1)
            picks = [select(front, "avg_bits", b)["sensitivity"] for b in args.budgets]
            cells = [f"{p:.5f} ({p / best[b]:.2f})" for p, b in zip(picks, args.budgets, strict=True)]
            name = f"nsga2 {args.pop_size}x{generations}"
            print(f"| {name} | {seed} | {seconds:.2f} | {len(front)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
