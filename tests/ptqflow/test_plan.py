"""MRECG merge plans from capacity differentials."""

from __future__ import annotations

import pytest

from ptqflow.errors import ConfigError
from ptqflow.plan import mrecg_groups

KINDS = ["stem", "block", "block", "block", "block", "block", "head"]


def test_top_k_pairs_merge_and_chain_into_threes() -> None:
    # pairs: (0,1) (1,2) (2,3) (3,4) (4,5) (5,6)
    diffs = [9.0, 5.0, 4.0, 1.0, 3.0, 8.0]
    groups, choices = mrecg_groups(KINDS, diffs, k=1)
    assert groups == [[0], [1, 2], [3], [4], [5], [6]]  # (0,1) is stem/block: skipped, (1,2) taken
    assert [c.merged for c in choices] == [False, False, True] and "not mergeable" in choices[0].reason
    groups, _ = mrecg_groups(KINDS, diffs, k=2)
    assert groups == [[0], [1, 2, 3], [4], [5], [6]]  # (1,2) and (2,3) chain into three units
    groups, choices = mrecg_groups(KINDS, diffs, k=3)
    assert groups == [[0], [1, 2, 3], [4, 5], [6]]  # (4,5) next; (3,4) would make four
    groups, choices = mrecg_groups(KINDS, diffs, k=4)
    assert groups == [[0], [1, 2, 3], [4, 5], [6]]
    assert any(c.reason == "group would exceed 3 units" for c in choices)


def test_no_capacity_drop_is_never_merged_and_k0_is_blockwise() -> None:
    diffs = [1.0, -2.0, 0.0, -1.0, -3.0, 1.0]
    groups, choices = mrecg_groups(KINDS, diffs, k=5)
    assert groups == [[i] for i in range(7)]
    assert {c.reason for c in choices} == {"stem/block not mergeable", "block/head not mergeable", "no capacity drop"}
    assert mrecg_groups(KINDS, [5.0] * 6, k=0)[0] == [[i] for i in range(7)]


def test_max_group_two_and_errors() -> None:
    groups, _ = mrecg_groups(KINDS, [0, 5.0, 4.0, 3.0, 2.0, 0], k=4, max_group=2)
    assert groups == [[0], [1, 2], [3, 4], [5], [6]]
    with pytest.raises(ConfigError, match="differentials"):
        mrecg_groups(KINDS, [1.0], k=1)
    with pytest.raises(ConfigError, match="k must be >= 0"):
        mrecg_groups(KINDS, [1.0] * 6, k=-1)
