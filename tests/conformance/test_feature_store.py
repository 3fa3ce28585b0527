"""One contract for every feature store: fakeredis (embedded default) and real Redis.

Streams simulated transactions and their labels (in reported order) through the store and
checks the result against the offline computation, bit for bit, plus redelivery, duplicates
and label idempotence.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import fakeredis
import numpy as np
import pandas as pd
import pytest
import redis

from app.simulator import simulate
from features.card_arena import CARD_KIND
from features.definitions import FEATURE_NAMES, INDEX
from features.offline import compute_features, events_from_frame, labels_from_frame
from features.online import (
    CARD_RECORD,
    REDELIVERY_US,
    EventBatch,
    FeatureStoreUnavailable,
    InvalidEvent,
    LabelBatch,
    RedisFeatureStore,
    StaleEvents,
)
from features.stream import take_events, take_labels
from features.windows import CARD_COLUMNS

StoreFactory = Callable[..., RedisFeatureStore]


@pytest.fixture(params=["fakeredis", "fakeredis-3-shards",
                        pytest.param("redis", marks=pytest.mark.integration),
                        pytest.param("cluster-5-shards", marks=pytest.mark.integration)])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Every implementation: the embedded default, real Redis, a real Redis Cluster (three
    primaries), with one shard and with several (cards spread over hash slots)."""
    shards = int(request.param.split("-")[1]) if "shards" in request.param else 1
    if request.param.startswith("fakeredis"):
        server = fakeredis.FakeServer()
        return lambda **kw: RedisFeatureStore(fakeredis.FakeRedis(server=server),
                                              **{"shards": shards, **kw})
    client = (redis.RedisCluster.from_url(request.getfixturevalue("redis_cluster_url"))
              if request.param.startswith("cluster")
              else redis.Redis.from_url(request.getfixturevalue("redis_url")))
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    return lambda **kw: RedisFeatureStore(client, **{"namespace": namespace,
                                                     "shards": shards, **kw})


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate(customers=80, terminals=160, days=40, seed=21)


def stream(store: RedisFeatureStore, tx: pd.DataFrame, labels: pd.DataFrame | None,
           batch: int) -> np.ndarray:
    """Events and labels in time order (a label first on ties), in runs of ≤ `batch`."""
    ev = events_from_frame(tx)
    lb = labels_from_frame(labels) if labels is not None else None
    n_l = 0 if lb is None else len(lb.t_us)
    when = np.concatenate([lb.reported_us if lb is not None else [], ev.t_us]).astype(np.int64)
    kind = np.r_[np.zeros(n_l, dtype=int), np.ones(len(ev), dtype=int)]
    order = np.lexsort((np.arange(len(when)), kind, when))
    out = np.zeros((len(ev), len(FEATURE_NAMES)))
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and kind[order[j]] == kind[order[i]] and j - i < batch:
            j += 1
        idx = order[i:j]
        if kind[idx[0]] == 0 and lb is not None:
            store.apply_labels(take_labels(lb, idx))
        else:
            out[idx - n_l] = store.update_many(take_events(ev, idx - n_l))
        i = j
    return out


@pytest.mark.parametrize("batch", [40, 500])
def test_online_equals_offline_with_labels(make_store: StoreFactory, data, batch: int) -> None:
    tx, labels = data
    online = stream(make_store(), tx, labels, batch)
    offline = compute_features(tx, labels).to_numpy()
    diff = np.abs(online - offline)
    worst = {FEATURE_NAMES[j]: float(diff[:, j].max()) for j in range(diff.shape[1])
             if diff[:, j].max() > 0}
    assert not worst, worst
    # the data exercises every family of features
    for name in ("terminal_risk_7d", "card_label_fraud_rate", "card_new_device",
                 "card_small_count_10m"):
        assert (offline[:, INDEX[name]] > 0).any(), name


def test_redelivery_gets_first_features_and_changes_nothing(make_store: StoreFactory,
                                                             data) -> None:
    """A crash redelivers the last uncommitted batches: events up to REDELIVERY_US older
    than their card's newest get their first features back exactly; older redeliveries
    (beyond what the card keeps) still change nothing."""
    tx, _ = data
    store = make_store()
    first = stream(store, tx, None, 300)
    recent = np.flatnonzero((tx["timestamp"] > tx["timestamp"].max()
                             - pd.Timedelta(microseconds=REDELIVERY_US)).to_numpy())
    assert len(recent) > 100
    again = stream(store, tx.iloc[recent], None, 33)  # other batch boundaries
    assert np.array_equal(again, first[recent])
    old = take_events(events_from_frame(tx), np.arange(1000, 2500))  # weeks old
    with pytest.raises(StaleEvents) as stale:
        store.update_many(old)
    assert 0 < len(stale.value.rows) < len(old)
    store.update_many(take_events(old, np.setdiff1d(np.arange(len(old)), stale.value.rows)))
    late = tx.iloc[[5]].assign(transaction_id="brand-new",
                               timestamp=tx["timestamp"].max() + pd.Timedelta(seconds=1))
    expected = compute_features(pd.concat([tx, late], ignore_index=True)).to_numpy()[-1]
    assert np.array_equal(stream(store, late.reset_index(drop=True), None, 1)[0], expected)


def test_duplicate_in_one_batch_is_applied_once(make_store: StoreFactory, data) -> None:
    tx, _ = data
    part = tx.iloc[:200]
    dup = pd.concat([part, part.iloc[[10]]], ignore_index=True)
    out = stream(make_store(), dup, None, 500)
    assert np.array_equal(out[-1], out[10])
    assert np.array_equal(out[:200], compute_features(part).to_numpy())


def test_labels_are_counted_once(make_store: StoreFactory, data) -> None:
    labels = data[1]
    store = make_store()
    lb = labels_from_frame(labels.iloc[:300])
    assert store.apply_labels(lb) == 300
    assert store.apply_labels(lb) == 0  # redelivered batch
    twice = take_labels(lb, np.r_[np.arange(10), np.arange(10)])
    assert store.apply_labels(twice) == 0
    unknown = LabelBatch(["never-seen"], ["some-card"], ["T-x"], np.array([0]), np.array([1]),
                         np.array([True]))
    assert store.apply_labels(unknown) == 1


def test_corrupt_state_is_treated_as_empty(make_store: StoreFactory, data) -> None:
    tx, _ = data
    store = make_store()
    card = tx["customer_id"].iloc[0]
    store._r.set(store._card_key(card), b"not whole records")
    out = stream(store, tx.iloc[[0]].reset_index(drop=True), None, 1)
    assert out[0, INDEX["card_count_1d"]] == 1.0


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("amount", np.nan, "amount"), ("amount", np.inf, "amount"), ("amount", -3.0, "amount"),
    ("cards", "", "missing card"), ("transaction_ids", "", "missing transaction_id"),
])
def test_bad_events_never_reach_state(make_store: StoreFactory, data, field: str, value,
                                      reason: str) -> None:
    tx, _ = data
    store = make_store()
    batch = take_events(events_from_frame(tx), np.arange(5))
    if field == "amount":
        amount = batch.amount.copy()
        amount[3] = value
        batch = EventBatch(batch.transaction_ids, batch.cards, batch.terminals,
                           batch.terminal_keys, batch.t_us, amount, batch.device, batch.country)
    else:
        column = list(getattr(batch, field))
        column[3] = value
        batch = EventBatch(**{**batch.__dict__, field: column})
    with pytest.raises(InvalidEvent, match=f"row 3: {reason}"):
        store.update_many(batch)
    assert not list(store._r.scan_iter(match=f"{store._ns}:*"))


def test_parity_holds_when_terminal_buckets_are_reread_every_batch(data) -> None:
    """The refresh path (other workers' labels) reads the same truth back from Redis."""
    tx, _ = data
    store = RedisFeatureStore(fakeredis.FakeRedis(), terminal_refresh_s=0.0)
    online = stream(store, tx, None, 2500)
    offline = compute_features(tx).to_numpy()
    assert np.array_equal(online, offline)
    assert (offline[:, INDEX["terminal_count_30d"]] > 0).any()


class _Forgetful:
    """A worker whose card cache is dropped before every batch, as after a rebalance: each
    card is read back from Redis, so the appends and trims written there must be exact."""

    def __init__(self, store: RedisFeatureStore) -> None:
        self.store = store

    def apply_labels(self, labels: LabelBatch) -> int:
        return self.store.apply_labels(labels)

    def update_many(self, batch: EventBatch) -> np.ndarray:
        self.store.invalidate()
        return self.store.update_many(batch)


def test_parity_holds_when_cards_are_reread_every_batch(make_store: StoreFactory,
                                                        data) -> None:
    tx, labels = data
    store = make_store()
    online = stream(_Forgetful(store), tx, labels, 300)  # type: ignore[arg-type]
    assert np.array_equal(online, compute_features(tx, labels).to_numpy())
    card = tx["customer_id"].iloc[-1]
    cached = bytes(store._arena.records_of(card))
    assert store._r.get(store._card_key(card)) == cached
    # 40 days streamed: the oldest days were trimmed away, in Redis too
    first = np.frombuffer(cached, dtype=CARD_RECORD)["t_us"][0]
    assert first > int(events_from_frame(tx).t_us.min())


def test_terminal_ids_with_separators_read_back_exactly(data) -> None:
    """Terminal ids are any non-empty string: tabs, newlines and Unicode line separators
    must survive the hour buckets' round trip through Redis (no crash, exact counts)."""
    tx, _ = data
    tx = tx.copy()
    odd = {t: f"{t}{sep}x" for t, sep in zip(tx["terminal_id"].unique()[:40],
                                              ["\t", "\n", "\u2028", "\r\n", " \t1"] * 8,
                                              strict=False)}
    tx["terminal_id"] = tx["terminal_id"].map(lambda t: odd.get(t, t))
    store = RedisFeatureStore(fakeredis.FakeRedis(), terminal_refresh_s=0.0)
    online = stream(store, tx, None, 2500)
    assert np.array_equal(online, compute_features(tx).to_numpy())


@pytest.mark.parametrize("shards", [1, 3])
def test_lost_write_reply_then_redelivery_is_exact(data, monkeypatch: pytest.MonkeyPatch,
                                                    shards: int) -> None:
    """A deferred write applied but whose reply is lost: flush reports the store unavailable
    and drops what the write touched; the batch sent again gets its first features back."""
    tx, _ = data
    store = RedisFeatureStore(fakeredis.FakeRedis(), shards=shards)
    ev = events_from_frame(tx)
    head, batch = take_events(ev, np.arange(2000)), take_events(ev, np.arange(2000, 2400))
    store.update_many(head)
    first = store.update_many(batch, defer_write=True)
    assert store._pending is not None

    def lost() -> None:
        raise redis.ConnectionError("connection reset")

    assert sum(len(calls) for _, _, calls in store._pending.sends) == shards
    monkeypatch.setattr(store._pending.sends[0][1], "read_response", lost)
    with pytest.raises(FeatureStoreUnavailable, match="connection reset"):
        store.flush()
    monkeypatch.undo()  # the pooled connection reconnects
    assert not set(batch.cards) & set(store._arena.slot)
    again = store.update_many(batch)
    assert np.array_equal(again, first)
    offline = compute_features(tx.iloc[:2400]).to_numpy()
    assert np.array_equal(again, offline[2000:2400])
    assert np.array_equal(store.update_many(take_events(ev, np.arange(2400, 2600))),
                          compute_features(tx.iloc[:2600]).to_numpy()[2400:])


def test_events_centuries_apart_in_one_batch(make_store: StoreFactory, data) -> None:
    """A new card's event stamped in 1700 (valid RFC 3339, applied: the card has no later
    history) next to this year's events of 1,500 cards: no int64 overflow, exact."""
    tx, _ = data
    tx = tx.iloc[:1500].copy()
    tx["customer_id"] = [f"C{i}" for i in range(len(tx))]  # 1,500 cards in one batch
    tx.loc[tx.index[700], "timestamp"] = pd.Timestamp("1700-01-01T00:00:00", tz="UTC")
    online = stream(make_store(), tx, None, 1500)
    assert np.array_equal(online, compute_features(tx).to_numpy())


class _TwoWorkers:
    """Labels applied by one worker, events scored by another (sharing one Redis)."""

    def __init__(self, labeller: RedisFeatureStore, scorer: RedisFeatureStore) -> None:
        self.labeller, self.scorer = labeller, scorer

    def apply_labels(self, labels: LabelBatch) -> int:
        return self.labeller.apply_labels(labels)

    def update_many(self, batch: EventBatch) -> np.ndarray:
        return self.scorer.update_many(batch)


@pytest.mark.parametrize("log_read", [1024, 2])
def test_labels_applied_by_another_worker_are_seen_exactly(
        make_store: StoreFactory, data, monkeypatch: pytest.MonkeyPatch, log_read: int) -> None:
    """The scorer's cached label counts follow the label log; when it falls behind (here:
    more than `log_read` entries between batches) it reloads, and stays exact."""
    monkeypatch.setattr("features.online._LOG_READ", log_read)
    tx, labels = data
    workers = _TwoWorkers(make_store(), make_store())
    online = stream(workers, tx, labels, 200)  # type: ignore[arg-type]
    assert np.array_equal(online, compute_features(tx, labels).to_numpy())


def test_every_state_key_expires(make_store: StoreFactory, data) -> None:
    """Card, bucket and label keys all carry a TTL (APPEND alone would create immortal keys);
    only the capped label log and its sequence live on."""
    tx, labels = data
    store = make_store()
    stream(store, tx.iloc[:3000], labels.iloc[:1000], 250)
    kinds: dict[str, int] = {}
    for key in store._r.scan_iter(match=f"{store._ns}:*"):
        kind = key.decode().split(":")[1]
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind not in ("lablog", "labseq", "cl", "tl", "shards"):
            assert store._r.ttl(key) > 0, key
    assert {CARD_KIND, "tb", "lab"} <= set(kinds), kinds


def test_parity_holds_with_a_small_card_cache(make_store: StoreFactory, data) -> None:
    """A cache of 12 cards (the data has 80): least recently used cards are evicted after
    each batch, never the batch's own, and read back from Redis when they come again."""
    tx, labels = data
    store = make_store(cache_cards=12)
    online = stream(store, tx, labels, 60)
    assert np.array_equal(online, compute_features(tx, labels).to_numpy())
    assert len(store._arena) <= 60


def test_late_events_are_inserted_in_time_order(make_store: StoreFactory, data) -> None:
    """Events arriving up to 20 hours late join their card's history in time order: each
    sees exactly the earlier events that arrived before it, and the card's Redis value,
    replaced whole, reads back the same (a worker that rereads every card agrees)."""
    tx, _ = data
    tx = tx.iloc[:2500].reset_index(drop=True)
    ev = events_from_frame(tx)
    rng = np.random.default_rng(5)
    delay = np.where(rng.random(len(tx)) < 0.1, rng.integers(1, 20 * 3_600_000_000, len(tx)), 0)
    arrival = np.lexsort((np.arange(len(tx)), ev.t_us + delay))
    outputs = []
    for forgetful in (False, True):
        store = make_store(namespace=f"late-{forgetful}-{uuid.uuid4().hex[:6]}")
        out = np.zeros((len(tx), len(FEATURE_NAMES)))
        for a in range(0, len(tx), 97):
            idx = arrival[a:a + 97]
            if forgetful:
                store.invalidate()
            out[idx] = store.update_many(take_events(ev, idx))
        outputs.append(out)
        late = np.flatnonzero(delay > 0)
        cards = tx["customer_id"].to_numpy()
        cached = [c for c in np.unique(cards[late]) if store._arena.records_of(c) is not None]
        assert cached
        for card in cached:
            assert store._r.get(store._card_key(card)) == store._arena.records_of(card)
    assert np.array_equal(outputs[0], outputs[1])
    # each late event against the offline computation over what had arrived before it
    columns = [INDEX[c] for c in CARD_COLUMNS]
    rank = np.empty(len(tx), dtype=np.int64)
    rank[arrival] = np.arange(len(tx))
    for i in np.flatnonzero(delay > 0)[:40]:
        card = tx["customer_id"].iloc[i]
        seen = np.flatnonzero((rank < rank[i]) & (tx["customer_id"] == card).to_numpy()
                              & (ev.t_us <= ev.t_us[i]))
        # ties in time: the one that arrived first comes first
        rows = np.r_[seen[np.lexsort((rank[seen], ev.t_us[seen]))], i]
        part = tx.iloc[rows].reset_index(drop=True)
        expected = compute_features(part).to_numpy()[-1]
        assert np.array_equal(outputs[0][i, columns], expected[columns]), i
