"""Handbook parity, whole data set: stream 2018-04-01..07-31 (labels 7 days late) through the
online store on Redis and compare every July feature value with the offline computation.

    eval "$(scripts/stack.sh up)" && .venv/bin/python scripts/handbook_parity.py
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import redis

from app.sources import HANDBOOK_PATH, read_transactions
from features.definitions import FEATURE_NAMES
from features.offline import compute_features
from features.online import RedisFeatureStore
from features.stream import replay


def main() -> None:
    tx, labels = read_transactions(HANDBOOK_PATH, "handbook",
                                   end=datetime(2018, 8, 1, tzinfo=UTC))
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    namespace = f"parity-{uuid.uuid4().hex[:8]}"
    store = RedisFeatureStore(client, namespace=namespace)
    started = time.perf_counter()
    run = replay(store, tx, labels, batch_size=500)
    streamed_s = time.perf_counter() - started
    started = time.perf_counter()
    offline = compute_features(tx, labels, label_clock=(run.tx_clock, run.label_clock))
    offline_s = time.perf_counter() - started
    july = (tx["timestamp"] >= datetime(2018, 7, 1, tzinfo=UTC)).to_numpy()
    online, expected = run.features[july], offline.to_numpy()[july]
    rel = np.abs(online - expected) / np.maximum(np.abs(expected), 1e-12)
    for key in client.scan_iter(match=f"{namespace}:*", count=5000):
        client.delete(key)
    print(json.dumps({
        "events_streamed": len(tx), "july_events": int(july.sum()),
        "july_values": int(rel.size), "values_off_by_more_than_1e-6_rel": int((rel > 1e-6).sum()),
        "values_not_bit_identical": int((online != expected).sum()),
        "per_feature_off": {FEATURE_NAMES[j]: int((rel[:, j] > 1e-6).sum())
                            for j in range(rel.shape[1]) if (rel[:, j] > 1e-6).any()},
        "stream_seconds": round(streamed_s, 1), "offline_seconds": round(offline_s, 1),
    }))


if __name__ == "__main__":
    main()
