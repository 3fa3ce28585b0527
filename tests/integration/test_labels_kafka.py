"""Fraud labels consumed by the scorer from Kafka update feature state exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import redis

from app.sources import labels_to_json, transactions_to_json
from models.registry import ModelRef
from tests.integration.conftest import consume_all, create_topics, produce

pytestmark = pytest.mark.integration


def _label_totals(r: redis.Redis, namespace: str) -> tuple[int, int]:
    """Labels and frauds over every card counter (a field holds labels + frauds << 32)."""
    n = f = 0
    for key in r.scan_iter(match=f"{namespace}:cl:*"):
        for value in r.hgetall(key).values():
            n += int(value) & 0xFFFFFFFF
            f += int(value) >> 32
    return n, f


def test_labels_topic_feeds_the_store_once(
    kafka_bootstrap: str, redis_url: str, model: ModelRef,
    simulated: tuple[pd.DataFrame, pd.DataFrame], unique, keys_env: dict[str, str],
) -> None:
    tx, labels = simulated
    tx, labels = tx.iloc[:300], labels.iloc[:300]
    names = {k: unique(k) for k in ("transactions", "labels", "alerts", "scores", "dlq", "audit")}
    create_topics(kafka_bootstrap, list(names.values()))
    namespace = unique("fs")
    env = {**os.environ, **keys_env,
           "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "FRAUDSCORE_REDIS_URL": redis_url, "FRAUDSCORE_REDIS_NAMESPACE": namespace,
           "FRAUDSCORE_GROUP_ID": unique("scorer"), "FRAUDSCORE_MODEL_DIR": str(model.path),
           **{f"FRAUDSCORE_TOPIC_{k.upper()}": v for k, v in names.items()}}
    produce(kafka_bootstrap, names["transactions"],
            [(c.encode(), v) for c, v in zip(tx["customer_id"], transactions_to_json(tx),
                                              strict=True)])
    label_values = labels_to_json(labels)
    # every label twice (a producer retry), and one that is not a label at all
    produce(kafka_bootstrap, names["labels"],
            [(b"k", v) for v in label_values + label_values] + [(b"k", b"{not a label")])
    proc = subprocess.Popen([sys.executable, "-m", "app", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = consume_all(kafka_bootstrap, [names["scores"], names["dlq"]],
                           until=lambda s: len(s[names["scores"]]) >= 300
                           and len(s[names["dlq"]]) >= 1)
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        while _label_totals(r, namespace)[0] < 300 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert len(seen[names["scores"]]) == 300
    assert [m.value() for m in seen[names["dlq"]]] == [b"{not a label"]
    headers = dict(seen[names["dlq"]][0].headers() or [])
    assert headers["source.topic"] == names["labels"].encode()
    n, f = _label_totals(r, namespace)
    assert n == 300 and f == int(labels["is_fraud"].sum())
