"""Feature kernel: offline = online bit for bit, redelivery-safe, sane values."""

from __future__ import annotations

import fakeredis
import numpy as np
import pandas as pd
import pytest

from features.definitions import FEATURE_NAMES, FEATURES, SECONDS_SINCE_CAP
from features.kernel import Events, apply_events, country_keys, empty_states, epoch_seconds
from features.offline import compute_features
from features.online import RedisFeatureStore

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def history(n: int = 6000, cards: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t0 = 1_767_225_600  # 2026-01-01
    return pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(n)],
        "customer_id": rng.integers(0, cards, n).astype(str),
        "timestamp": pd.to_datetime(np.sort(rng.integers(t0, t0 + 20 * 86400, n)), unit="s",
                                    utc=True),
        "amount": rng.lognormal(3, 1, n).round(2),
        "device_id": np.where(rng.random(n) < 0.3, None, rng.integers(0, 3, n).astype(str)),
        "country": np.where(rng.random(n) < 0.9, "BE", "FR"),
    })


def events_of(df: pd.DataFrame) -> Events:
    codes, _ = pd.factorize(df["device_id"])
    return Events(epoch_seconds(df["timestamp"]), df["amount"].to_numpy(np.float64),
                  (codes + 1).astype(np.float64), country_keys(df["country"].to_numpy(object)))


def stream(store: RedisFeatureStore, df: pd.DataFrame, batch: int) -> np.ndarray:
    ev = events_of(df)
    out = []
    for s in range(0, len(df), batch):
        idx = np.arange(s, min(len(df), s + batch))
        out.append(store.update_many(df["customer_id"].to_numpy()[idx].tolist(),
                                     df["transaction_id"].to_numpy()[idx].tolist(), ev.take(idx)))
    return np.vstack(out)


def test_definitions_are_unique_and_documented() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURES)
    assert all(f.description for f in FEATURES)


@pytest.mark.parametrize(("batch", "n"), [(1, 600), (37, 6000), (500, 6000), (6000, 6000)])
def test_online_equals_offline_bit_for_bit(batch: int, n: int) -> None:
    df = history(n)
    offline = compute_features(df).features.to_numpy()
    online = stream(RedisFeatureStore(fakeredis.FakeRedis()), df, batch)
    assert np.array_equal(online, offline)


def test_redelivered_batch_gets_the_same_features_and_is_not_applied_twice() -> None:
    df = history(2000, 50)
    store = RedisFeatureStore(fakeredis.FakeRedis())
    first = stream(store, df, 250)
    again = stream(store, df.iloc[500:1500].reset_index(drop=True), 333)  # other boundaries
    assert np.array_equal(again, first[500:1500])
    # state unchanged by the replay: the next new event sees the original history
    fresh = df.iloc[[0]].assign(transaction_id="new-1",
                                timestamp=df["timestamp"].max() + pd.Timedelta(seconds=1))
    combined = pd.concat([df, fresh], ignore_index=True)
    expected = compute_features(combined).features.to_numpy()[-1]
    got = stream(store, fresh.reset_index(drop=True), 1)[0]
    assert np.array_equal(got, expected)


def test_duplicate_transaction_in_one_batch_is_applied_once() -> None:
    df = history(10, 1)
    dup = pd.concat([df, df.iloc[[3]]], ignore_index=True)
    out = stream(RedisFeatureStore(fakeredis.FakeRedis()), dup, 100)
    assert np.array_equal(out[-1], out[3])
    assert np.array_equal(out[:10], compute_features(df).features.to_numpy())


def test_first_event_defaults_and_counts() -> None:
    df = history(1, 1)
    f = compute_features(df).features.iloc[0]
    assert f["card_secs_since_prev"] == SECONDS_SINCE_CAP
    assert f["card_count_1d"] == 1.0 and f["card_amount_ratio_30d"] == 1.0
    assert f["card_new_device"] == 0.0 and f["card_new_country"] == 0.0


def test_decay_counts_and_flags() -> None:
    t0 = pd.Timestamp("2026-01-03T05:00:00Z")  # a Saturday, 05:00 UTC
    df = pd.DataFrame({
        "customer_id": ["c"] * 3,
        "timestamp": [t0, t0 + pd.Timedelta(hours=1), t0 + pd.Timedelta(days=1, hours=5)],
        "amount": [10.0, 30.0, 100.0],
        "device_id": ["a", "a", "b"],
        "country": ["BE", "BE", "FR"],
    })
    f = compute_features(df).features
    assert f["is_weekend"].tolist() == [1.0, 1.0, 1.0]
    assert f["is_night"].tolist() == [1.0, 1.0, 0.0]
    assert f["card_secs_since_prev"].iloc[1] == 3600.0
    assert f["card_count_1h"].iloc[1] == pytest.approx(1 + np.exp(-1))
    assert f["card_mean_amount_1d"].iloc[1] == pytest.approx(
        (10 * np.exp(-1 / 24) + 30) / (np.exp(-1 / 24) + 1))
    assert f["card_new_device"].tolist() == [0.0, 0.0, 1.0]
    assert f["card_new_country"].tolist() == [0.0, 0.0, 1.0]


def test_late_event_does_not_rewind_time() -> None:
    states = empty_states(1)
    ev = Events(np.array([1000.0, 500.0]), np.array([1.0, 1.0]), np.zeros(2), np.zeros(2))
    out = apply_events(states, np.array([0, 0]), ev)
    assert out[1, F["card_secs_since_prev"]] == 0.0
    assert states[0, 0] == 1000.0


def test_corrupt_state_in_redis_starts_fresh() -> None:
    client = fakeredis.FakeRedis()
    store = RedisFeatureStore(client)
    client.set("fs:card:{c}", b"garbage")
    df = history(1, 1).assign(customer_id="c")
    out = stream(store, df, 1)
    assert out[0, F["card_count_1d"]] == 1.0
