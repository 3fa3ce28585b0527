"""The range maximum behind card_max_ratio_14d: both of its methods against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from features.windows import slice_max


def _naive(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([values[a:b].max() if b > a else 0.0 for a, b in zip(lo, hi, strict=True)])


@pytest.mark.parametrize("n_slices", [5, 300, 3000])  # direct reads, then the sparse table
def test_slice_max_matches_a_plain_loop(n_slices: int) -> None:
    rng = np.random.default_rng(n_slices)
    values = np.round(rng.random(2000) * 500, 2)
    lo = rng.integers(0, 2000, n_slices)
    hi = np.minimum(lo + rng.integers(-5, 200, n_slices), 2000)  # some empty, some reversed
    assert np.array_equal(slice_max(values, lo, hi), _naive(values, lo, hi))


def test_slice_max_of_no_rows_is_zero() -> None:
    values = np.array([3.0, 1.0])
    assert slice_max(values, np.array([1, 2]), np.array([1, 0])).tolist() == [0.0, 0.0]
