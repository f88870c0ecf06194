"""First-fit-decreasing packing: the fast version equals the naive reference, bin for bin."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oqvl.pack import ffd
from oqvl.pack.ffd import fill_ratio, first_fit_decreasing, naive_first_fit_decreasing


@st.composite
def packing_inputs(draw, max_capacity: int = 64, max_n: int = 200) -> tuple[list[int], int]:
    """A capacity and lengths in 1..capacity, sometimes from a few values (long equal runs)."""
    capacity = draw(st.integers(1, max_capacity))
    if draw(st.booleans()):
        values = st.integers(1, capacity)
    else:
        values = st.sampled_from(draw(st.lists(st.integers(1, capacity), min_size=1, max_size=3)))
    return draw(st.lists(values, max_size=max_n)), capacity


def as_lists(bins: list[np.ndarray]) -> list[list[int]]:
    return [np.asarray(b).tolist() for b in bins]


def check_valid(lengths: list[int], bins: list, capacity: int) -> None:
    members = [i for b in bins for i in np.asarray(b).tolist()]
    assert sorted(members) == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in as_lists(bins))
    assert all(len(b) > 0 for b in bins)


@settings(max_examples=300, deadline=None)
@given(packing_inputs())
def test_fast_equals_naive(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    naive = naive_first_fit_decreasing(lengths, capacity)
    fast = first_fit_decreasing(np.array(lengths, dtype=np.int64), capacity)
    check_valid(lengths, naive, capacity)
    check_valid(lengths, fast, capacity)
    assert as_lists(fast) == naive


@pytest.mark.parametrize("short_run", [0, 10**9])
@settings(max_examples=100, deadline=None)
@given(case=packing_inputs())
def test_bulk_and_one_by_one_paths_each_exact(case: tuple[list[int], int], short_run: int) -> None:
    # Force every run through the bulk (numpy) path, then through the one-sample-at-a-time path.
    lengths, capacity = case
    old, ffd.SHORT_RUN = ffd.SHORT_RUN, short_run
    try:
        fast = first_fit_decreasing(lengths, capacity)
        assert as_lists(fast) == naive_first_fit_decreasing(lengths, capacity)
    finally:
        ffd.SHORT_RUN = old


@pytest.mark.parametrize("seed", range(3))
def test_caption_like_lengths_match_naive(seed: int) -> None:
    # Paper-like lengths: 144 image tokens + 2 + caption tokens; long equal runs, many bins.
    rng = np.random.default_rng(seed)
    lengths = 146 + np.clip(rng.lognormal(np.log(30), 0.5, 5000).round(), 5, 120).astype(np.int64)
    fast = first_fit_decreasing(lengths, 4096)
    assert as_lists(fast) == naive_first_fit_decreasing(lengths, 4096)
    assert fill_ratio(lengths, fast, 4096) > 0.95


@settings(max_examples=100, deadline=None)
@given(packing_inputs())
def test_fill_ratio(case: tuple[list[int], int]) -> None:
    lengths, capacity = case
    bins = first_fit_decreasing(lengths, capacity)
    if not lengths:
        assert fill_ratio(lengths, bins, capacity) == 0.0
        return
    expected = sum(lengths) / (len(bins) * capacity)
    assert fill_ratio(lengths, bins, capacity) == pytest.approx(expected)
    naive = naive_first_fit_decreasing(lengths, capacity)
    assert fill_ratio(lengths, naive, capacity) == pytest.approx(expected)
    assert 0.0 < expected <= 1.0


def test_fill_ratio_by_hand() -> None:
    assert fill_ratio([3, 5, 2], [[1], [0, 2]], 5) == pytest.approx(10 / 10)
    assert fill_ratio([3, 1], [[0], [1]], 4) == pytest.approx(4 / 8)


@pytest.mark.parametrize("pack", [first_fit_decreasing, naive_first_fit_decreasing])
@pytest.mark.parametrize(("lengths", "capacity"), [
    ([0], 10), ([-3, 2], 10), ([11], 10), ([5, 10, 11], 10), ([1], 0), ([], -1),
])
def test_bad_input_raises(pack, lengths: list[int], capacity: int) -> None:
    with pytest.raises(ValueError):
        pack(lengths, capacity)


def test_error_message_names_the_sample() -> None:
    with pytest.raises(ValueError, match=r"lengths\[2\] = 11"):
        first_fit_decreasing(np.array([5, 10, 11]), 10)


@pytest.mark.parametrize("pack", [first_fit_decreasing, naive_first_fit_decreasing])
def test_empty(pack) -> None:
    assert pack([], 10) == []
    assert pack(np.array([], dtype=np.int64), 10) == []


def test_all_equal_lengths() -> None:
    bins = as_lists(first_fit_decreasing([3] * 10, 10))
    assert bins == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert bins == naive_first_fit_decreasing([3] * 10, 10)


def test_lengths_equal_capacity() -> None:
    assert as_lists(first_fit_decreasing([7, 7, 7], 7)) == [[0], [1], [2]]
    # Full bins never take anything more; the short ones share a bin.
    assert as_lists(first_fit_decreasing([2, 7, 3, 7], 7)) == [[1], [3], [2, 0]]


def test_capacity_one() -> None:
    assert as_lists(first_fit_decreasing([1] * 5, 1)) == [[0], [1], [2], [3], [4]]
    assert naive_first_fit_decreasing([1] * 5, 1) == [[0], [1], [2], [3], [4]]


def test_first_fit_not_best_fit() -> None:
    # 6 opens bin 0 (room 4), 5 opens bin 1 (room 5); 4 goes to the FIRST bin with room, bin 0.
    assert as_lists(first_fit_decreasing([4, 6, 5], 10)) == [[1, 0], [2]]
