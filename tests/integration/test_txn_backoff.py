"""Back-to-back transactions on the real broker: the engine's producer does not wait out
librdkafka's 100 ms retry backoff on every ``send_offsets_to_transaction``.

Until the broker has written the last commit's markers it answers the next transaction's
AddOffsetsToTxn with CONCURRENT_TRANSACTIONS; with librdkafka's default backoff that cost
~55-65 ms per transaction here, with the engine's ~5 ms. The two producers run side by side,
alternated, so the machine's load hits both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from app.config import load_settings
from app.engines.confluent import producer_config
from tests.integration.conftest import create_topics

pytestmark = pytest.mark.integration

ROUNDS = 12


def _offsets_ms(producer: Producer, consumer: Consumer, source: str, sink: str,
                start: int) -> list[float]:
    out = []
    for k in range(ROUNDS):
        producer.begin_transaction()
        for j in range(100):
            producer.produce(sink, b"x" * 200, str(j).encode())
        t = time.perf_counter()
        producer.send_offsets_to_transaction(
            [TopicPartition(source, p, start + k + 1) for p in range(3)],
            consumer.consumer_group_metadata(), 30)
        out.append((time.perf_counter() - t) * 1000)
        producer.commit_transaction(30)
    return out


def test_back_to_back_transactions_skip_the_default_retry_backoff(
        kafka_bootstrap: str, unique: Callable[[str], str]) -> None:
    source, sink = unique("txn-in"), unique("txn-out")
    create_topics(kafka_bootstrap, [source, sink])
    settings = load_settings(kafka_bootstrap_servers=kafka_bootstrap, group_id=unique("txn-g"))
    engine = producer_config(settings, worker_id=0)
    assert engine["retry.backoff.ms"] < 100  # else there is nothing to compare
    default = {k: v for k, v in engine.items() if k != "retry.backoff.ms"}
    default["transactional.id"] += "-default"
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": settings.group_id,
                         "enable.auto.commit": False})
    consumer.subscribe([source])
    for _ in range(30):  # join the group: its metadata goes with the offsets
        consumer.poll(0.1)
    producers: dict[str, Producer] = {}
    for name, config in (("engine", engine), ("default", default)):
        producers[name] = Producer(config)
        producers[name].init_transactions(30)
    times: dict[str, list[float]] = {"engine": [], "default": []}
    try:
        for turn in range(4):
            for name, producer in producers.items():
                times[name] += _offsets_ms(producer, consumer, source, sink, 100 * turn)
    finally:
        consumer.close()
    mean: dict[str, Any] = {k: float(np.mean(v)) for k, v in times.items()}
    assert mean["engine"] < 0.5 * mean["default"], mean
