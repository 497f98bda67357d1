"""MRECG reconstruction plans: which adjacent units to reconstruct jointly.

Ma et al., "Solving Oscillation Problem in Post-Training Quantization Through a Theoretical
Perspective" (CVPR 2023), section 4: when a later module has a smaller capacity than its predecessor,
block-wise reconstruction loss jumps up (oscillates); reconstructing such adjacent modules jointly
removes the jump. The plan takes the ``k`` largest capacity differentials between adjacent units
(:func:`ptqflow.sensitivity.capacity_differentials`) and merges each selected pair into one
reconstruction unit; consecutive selected pairs chain into groups of up to ``max_group`` units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ptqflow.errors import ConfigError

__all__ = ["MergeChoice", "mrecg_groups"]


@dataclass(frozen=True)
class MergeChoice:
    """One adjacent pair ``(left, left + 1)`` considered for merging, with its differential."""

    left: int
    differential: float
    merged: bool
    reason: str


def mrecg_groups(
    kinds: Sequence[str],
    differentials: Sequence[float],
    k: int,
    max_group: int = 3,
    mergeable: frozenset[str] = frozenset({"block"}),
) -> tuple[list[list[int]], list[MergeChoice]]:
    """Merge the top-``k`` adjacent pairs by differential into joint reconstruction groups.

    Pairs are visited from the largest differential down (ties: the earlier pair first). A pair is
    merged if both units are of a ``mergeable`` kind, its differential is positive (the later unit has
    the smaller capacity; a non-positive differential is no oscillation to fix) and the merged group
    stays within ``max_group`` units; otherwise the next pair is tried, until ``k`` pairs are merged.

    Args:
        kinds: unit kinds in forward order (``stem``, ``block``, ``glue``, ``head``).
        differentials: ``len(kinds) - 1`` values, one per adjacent pair.
        k: pairs to merge (fewer if not enough pairs qualify).
        max_group: most units in one group (MRECG chains at most three).
        mergeable: unit kinds that may be merged.

    Returns:
        ``(groups, choices)``: groups of consecutive unit indices covering every unit in order, and the
        decision taken for every pair visited.
    """
    if len(differentials) != max(len(kinds) - 1, 0):
        raise ConfigError(f"need {len(kinds) - 1} differentials for {len(kinds)} units, got {len(differentials)}")
    if k < 0:
        raise ConfigError(f"k must be >= 0, got {k}")
    if max_group < 2:
        raise ConfigError(f"max_group must be >= 2, got {max_group}")
    group_of = list(range(len(kinds)))  # each unit's group id = the index of its group's first unit
    choices: list[MergeChoice] = []
    merged = 0
    for left in sorted(range(len(differentials)), key=lambda i: (-differentials[i], i)):
        if merged >= k:
            break
        d = float(differentials[left])
        if kinds[left] not in mergeable or kinds[left + 1] not in mergeable:
            choices.append(MergeChoice(left, d, False, f"{kinds[left]}/{kinds[left + 1]} not mergeable"))
            continue
        if d <= 0:
            choices.append(MergeChoice(left, d, False, "no capacity drop"))
            continue
        first, second = group_of[left], group_of[left + 1]
        size = sum(1 for g in group_of if g in (first, second))
        if size > max_group:
            choices.append(MergeChoice(left, d, False, f"group would exceed {max_group} units"))
            continue
        group_of = [first if g == second else g for g in group_of]
        merged += 1
        choices.append(MergeChoice(left, d, True, "merged"))
    groups: list[list[int]] = []
    for index, g in enumerate(group_of):
        if groups and group_of[groups[-1][0]] == g:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups, choices
