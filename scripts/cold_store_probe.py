"""A fresh worker's feature store on existing Redis history: nearly every card of its
first batches is read from Redis on first sight (a restart, a rebalance). Loads the
features bench's history (`app.bench.BenchConfig`), then times `update_many` over 55
batches of 90 events after 5 warm-up batches; prints the median ms per batch.

    eval "$(scripts/stack.sh up)"; .venv/bin/python scripts/cold_store_probe.py
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.bench import BenchConfig, _drop, _slice
from app.simulator import simulate
from features.offline import events_from_frame, labels_from_frame, micros
from features.online import RedisFeatureStore

BATCH, WARM, MEASURED = 90, 5, 55


def main() -> None:
    cfg = BenchConfig()
    tx, labels = simulate(cfg.customers, cfg.terminals, cfg.days, cfg.seed)
    split = tx["timestamp"].min().normalize() + pd.Timedelta(days=cfg.days - cfg.stream_days)
    history = (tx["timestamp"] < split).to_numpy()
    until = int(micros(pd.Series([split]))[0])
    events = events_from_frame(tx[~history])
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    namespace = f"cold-probe-{uuid.uuid4().hex[:8]}"
    try:
        RedisFeatureStore(client, namespace=namespace).load_history(
            events_from_frame(tx[history]), labels_from_frame(labels), until)
        store = RedisFeatureStore(client, namespace=namespace)  # the fresh worker
        batches = [_slice(events, a, a + BATCH)
                   for a in range(0, BATCH * (WARM + MEASURED), BATCH)]
        for batch in batches[:WARM]:
            store.update_many(batch)
        ms = []
        for batch in batches[WARM:]:
            t = time.perf_counter()
            store.update_many(batch)
            ms.append((time.perf_counter() - t) * 1000)
    finally:
        _drop(client, f"{namespace}*")
    print(json.dumps({"batch_events": BATCH, "batches": len(ms),
                      "median_ms_per_batch": round(float(np.median(ms)), 2),
                      "mean_ms_per_batch": round(float(np.mean(ms)), 2)}))


if __name__ == "__main__":
    main()
