"""Handbook parity on real Redis: a sample of cards, June–July 2018, labels 7 days late.

Streams the sample's transactions and labels through the online store in micro-batches and
compares every feature of every July transaction with the offline computation over the same
history: 0 values may differ by more than 1e-6 relative (in practice they are identical).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
import redis

from app.sources import HANDBOOK_PATH, read_transactions
from features.definitions import FEATURE_NAMES
from features.offline import compute_features
from features.online import RedisFeatureStore
from features.stream import replay

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not HANDBOOK_PATH.exists(), reason="handbook data not at ../shared"),
]


def test_july_2018_sample_online_equals_offline(redis_url: str) -> None:
    tx, labels = read_transactions(HANDBOOK_PATH, "handbook",
                                   start=datetime(2018, 6, 1, tzinfo=UTC),
                                   end=datetime(2018, 8, 1, tzinfo=UTC))
    assert labels is not None
    rng = np.random.default_rng(3)
    sample = rng.choice(tx["customer_id"].unique(), size=150, replace=False)
    tx = tx[tx["customer_id"].isin(sample)].reset_index(drop=True)
    labels = labels[labels["transaction_id"].isin(set(tx["transaction_id"]))]

    store = RedisFeatureStore(redis.Redis.from_url(redis_url),
                              namespace=f"hb-{uuid.uuid4().hex[:8]}")
    run = replay(store, tx, labels, batch_size=500)
    offline = compute_features(tx, labels, label_clock=(run.tx_clock, run.label_clock))

    july = (tx["timestamp"] >= datetime(2018, 7, 1, tzinfo=UTC)).to_numpy()
    online, expected = run.features[july], offline.to_numpy()[july]
    rel = np.abs(online - expected) / np.maximum(np.abs(expected), 1e-12)
    off = {FEATURE_NAMES[j]: int((rel[:, j] > 1e-6).sum()) for j in range(rel.shape[1])}
    assert sum(off.values()) == 0, off
    assert july.sum() > 3000
    assert (expected[:, FEATURE_NAMES.index("terminal_risk_30d")] > 0).any()
