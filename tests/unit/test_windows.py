"""The card baseline features: the range maximum behind card_max_ratio_14d (both of its
methods against a plain loop), and both ratios and their defaults by hand."""

from __future__ import annotations

import numpy as np
import pytest

from features.definitions import DAY_US, INDEX, N_FEATURES
from features.windows import CardEvents, card_features, slice_max


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


def _card_rows(rows: list[tuple[int, float, float]]) -> np.ndarray:
    """Features of (card, day, amount) rows, offline."""
    card, day, amount = (np.array(c) for c in zip(*rows, strict=True))
    n = len(rows)
    ev = CardEvents(card=card.astype(np.int64), t_us=(day * DAY_US).astype(np.int64),
                    amount=amount.astype(np.float64), terminal=np.zeros(n, np.uint32),
                    device=np.zeros(n, np.uint32), country=np.zeros(n, np.uint32))
    out = np.zeros((n, N_FEATURES))
    card_features(ev, out)
    return out


def test_baseline_ratios_by_hand_and_their_defaults() -> None:
    out = _card_rows([
        (0, 0, 10.0), (0, 1, 20.0), (0, 20, 50.0), (0, 21, 200.0),  # baseline days 0-1
        (1, 5, 30.0),  # a card's first event: no baseline, nothing recent
        (2, 0, 0.001), (2, 20, 1e9),  # a baseline under half a cent sums to 0 cents
    ])
    ratio, peak = INDEX["card_amount_ratio_baseline"], INDEX["card_max_ratio_14d"]
    assert out[3, ratio] == 200.0 / 15.0  # day 21: (day -9, day 7] holds days 0 and 1
    assert out[3, peak] == 50.0 / 15.0  # the largest of days 7..21, itself excluded
    assert out[2, peak] == 0.0  # day 20: nothing in the 14 days before it
    assert (out[4, ratio], out[4, peak]) == (1.0, 0.0)
    assert (out[6, ratio], out[6, peak]) == (1.0, 0.0)  # the largest amount, no baseline
    assert np.isfinite(out).all()
