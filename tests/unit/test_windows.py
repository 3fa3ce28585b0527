"""The card baseline features: the range maximum behind card_max_ratio_14d (both of its
methods against a plain loop), and both ratios and their defaults by hand; the delayed
terminal windows against their definition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.definitions import (
    DAY_US,
    INDEX,
    N_FEATURES,
    TERMINAL_DELAY_HOURS,
    TERMINAL_WINDOWS_DAYS,
)
from features.offline import compute_features
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


def test_terminal_windows_match_a_plain_loop() -> None:
    """Every delayed terminal window (the handbook's 1/7/30 days and fraudscore's 3/21) by
    its definition: the terminal's transactions in hours [H - 168 - 24·d, H - 168), and the
    share of them reported as fraud within 7 days of their time."""
    rng = np.random.default_rng(5)
    n = 600
    hours = np.sort(rng.integers(0, 60 * 24, n))
    t = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(
        hours * 3600 + rng.integers(0, 3600, n), unit="s")
    terminal = rng.choice(["T1", "T2", "T3"], n)
    tx = pd.DataFrame({"transaction_id": [f"x{i}" for i in range(n)],
                       "customer_id": rng.choice(["C1", "C2", "C3", "C4"], n),
                       "terminal_id": terminal, "timestamp": t,
                       "amount": np.round(rng.random(n) * 100 + 1, 2),
                       "device_id": None, "country": "BE"})
    fraud = rng.random(n) < 0.3
    delay_h = rng.choice([1, 100, 167, 169, 400], n)  # some frauds are reported too late
    labels = pd.DataFrame({"transaction_id": tx["transaction_id"],
                           "customer_id": tx["customer_id"], "terminal_id": terminal,
                           "timestamp": t, "is_fraud": fraud,
                           "reported_at": t + pd.to_timedelta(delay_h, unit="h")})
    out = compute_features(tx, labels)
    counted_fraud = fraud & (delay_h <= TERMINAL_DELAY_HOURS)
    for i in range(n):
        end = hours[i] - TERMINAL_DELAY_HOURS
        for d in TERMINAL_WINDOWS_DAYS:
            inside = (terminal == terminal[i]) & (hours >= end - 24 * d) & (hours < end)
            count = int(inside.sum())
            risk = counted_fraud[inside].sum() / count if count else 0.0
            assert out[f"terminal_count_{d}d"].iat[i] == count, (i, d)
            assert out[f"terminal_risk_{d}d"].iat[i] == pytest.approx(risk, rel=1e-12), (i, d)
    assert (out["terminal_risk_3d"] > 0).any() and (out["terminal_count_21d"] > 0).any()
