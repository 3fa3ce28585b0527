"""The one update rule that turns (card state, event) into (features, new state).

Offline (training, replay) and online (Redis) both call :func:`apply_events`, so their
features are bit-identical on the same history. Events of the same card must be applied
in arrival order; the loop below runs over *ranks within a card* (the k-th event of every
card at once), so a batch costs a handful of vectorised steps, not one step per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.definitions import (
    DAY,
    FEATURE_NAMES,
    N_FEATURES,
    SECONDS_SINCE_CAP,
    STATE_FIELDS,
    STATE_SIZE,
    TAUS,
)

_S = {name: i for i, name in enumerate(STATE_FIELDS)}
_F = {name: i for i, name in enumerate(FEATURE_NAMES)}


@dataclass(frozen=True)
class Events:
    """Columnar events: event time (epoch seconds), amount and opaque equality keys."""

    t: np.ndarray  # float64 seconds since the epoch, UTC
    amount: np.ndarray  # float64
    device_key: np.ndarray  # float64, 0 = unknown
    country_key: np.ndarray  # float64, 0 = unknown

    def __len__(self) -> int:
        return len(self.t)

    def take(self, idx: np.ndarray) -> Events:
        return Events(self.t[idx], self.amount[idx], self.device_key[idx], self.country_key[idx])


def country_keys(codes: np.ndarray) -> np.ndarray:
    """ISO country codes as float keys (0 = unknown); countries are not personal data."""
    arr = np.where(pd.isna(codes), "", codes).astype("U2")
    if arr.size == 0:
        return np.zeros(0, dtype=np.float64)
    chars = arr.view(np.uint32).reshape(-1, 2).astype(np.float64)
    known = (chars[:, 0] > 0) & (chars[:, 1] > 0)
    return np.where(known, chars[:, 0] * 256.0 + chars[:, 1], 0.0)


def epoch_seconds(ts: pd.Series) -> np.ndarray:
    """UTC-aware timestamps as float64 seconds since the epoch, via whole microseconds.

    Going through an integer microsecond count makes the result independent of how the
    time was parsed, so offline (pandas) and online (JSON → datetime) agree bit for bit.
    """
    if ts.dt.tz is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    ns = ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return micros_to_seconds(ns.astype(np.int64) // 1000)


def micros_to_seconds(micros: np.ndarray) -> np.ndarray:
    return np.asarray(micros, dtype=np.int64) / 1e6


def empty_states(n: int) -> np.ndarray:
    return np.zeros((n, STATE_SIZE), dtype=np.float64)


def transaction_features(t: np.ndarray, amount: np.ndarray, out: np.ndarray) -> None:
    """Stateless features: amount and UTC calendar flags."""
    days = np.floor(t / DAY)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    hour = np.floor((t - days * DAY) / 3600.0)
    out[:, _F["amount"]] = amount
    out[:, _F["is_weekend"]] = weekday >= 5
    out[:, _F["is_night"]] = hour <= 6


def rank_order(card: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event indices ordered by (rank within card, arrival), and the slice bounds per rank."""
    n = len(card)
    by_card = np.argsort(card, kind="stable")
    sorted_card = card[by_card]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = sorted_card[1:] != sorted_card[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[by_card] = np.arange(n) - group_start
    order = np.argsort(rank, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(rank))] if n else np.zeros(1, dtype=np.int64)
    return order, bounds


def _step(state: np.ndarray, ev: Events, out: np.ndarray) -> None:
    """Apply one event per card (rows of `state` are distinct cards) and write features."""
    seen = state[:, _S["n_seen"]] > 0
    gap = np.maximum(ev.t - state[:, _S["last_t"]], 0.0)  # late events do not rewind time
    out[:, _F["card_secs_since_prev"]] = np.where(seen, np.minimum(gap, SECONDS_SINCE_CAP),
                                                  SECONDS_SINCE_CAP)
    for window, tau in TAUS.items():
        decay = np.exp(-gap / tau)
        count = state[:, _S[f"c_{window}"]] * decay + 1.0
        state[:, _S[f"c_{window}"]] = count
        out[:, _F[f"card_count_{window}"]] = count
        if f"s_{window}" in _S:
            total = state[:, _S[f"s_{window}"]] * decay + ev.amount
            state[:, _S[f"s_{window}"]] = total
            out[:, _F[f"card_mean_amount_{window}"]] = total / count
    out[:, _F["card_amount_ratio_30d"]] = ev.amount / out[:, _F["card_mean_amount_30d"]]

    dev1, dev2 = state[:, _S["dev_1"]], state[:, _S["dev_2"]]
    known_dev = ev.device_key != 0
    out[:, _F["card_new_device"]] = (
        known_dev & (dev1 != 0) & (ev.device_key != dev1) & (ev.device_key != dev2)
    )
    moved = known_dev & (ev.device_key != dev1)
    state[:, _S["dev_2"]] = np.where(moved, dev1, dev2)
    state[:, _S["dev_1"]] = np.where(moved, ev.device_key, dev1)

    country = state[:, _S["country"]]
    known_country = ev.country_key != 0
    out[:, _F["card_new_country"]] = known_country & (country != 0) & (ev.country_key != country)
    state[:, _S["country"]] = np.where(known_country, ev.country_key, country)

    state[:, _S["last_t"]] = np.where(seen, np.maximum(state[:, _S["last_t"]], ev.t), ev.t)
    state[:, _S["n_seen"]] += 1.0


def apply_events(states: np.ndarray, card: np.ndarray, events: Events) -> np.ndarray:
    """Update `states` in place (rows indexed by `card`) and return the feature matrix.

    ``card[i]`` is the row of ``states`` that event ``i`` belongs to; events of one card are
    applied in their order in the arrays.
    """
    n = len(events)
    out = np.empty((n, N_FEATURES), dtype=np.float64)
    transaction_features(events.t, events.amount, out)
    order, bounds = rank_order(card)
    for r in range(len(bounds) - 1):
        idx = order[bounds[r] : bounds[r + 1]]
        rows = card[idx]
        block = states[rows]
        feats = out[idx]
        _step(block, events.take(idx), feats)
        states[rows] = block
        out[idx] = feats
    return out
