"""The worker's consumer fetches per batch, not per produce request, on the real broker.

With librdkafka's defaults (fetch.min.bytes 1) the broker answers a fetch as soon as any
byte arrives, so a steady trickle of small produce requests (linger 1 ms) was answered up
to ~1,000 times a second; the engine's settings let it accumulate for up to
``FETCH_WAIT_MS``. Both consumers read the same trickle at the same time, so the machine's
load hits both, and each must still get every message.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer

from app.config import load_settings
from app.engines.confluent import FETCH_MIN_BYTES, FETCH_WAIT_MS, consumer_config
from tests.integration.conftest import create_topics

pytestmark = pytest.mark.integration

RATE, SECONDS = 2000, 3.0


class _Reader(threading.Thread):
    """Counts messages and, from librdkafka's statistics, the Fetch requests it sent."""

    def __init__(self, config: dict[str, Any], topic: str) -> None:
        super().__init__(daemon=True)
        self.fetches = 0
        self.got = 0
        self.stop = threading.Event()
        self.consumer = Consumer({**config, "statistics.interval.ms": 200,
                                  "stats_cb": self._stats})
        self.consumer.subscribe([topic])

    def _stats(self, raw: str) -> None:
        brokers = json.loads(raw).get("brokers", {}).values()
        self.fetches = sum(b.get("req", {}).get("Fetch", 0) for b in brokers)

    def run(self) -> None:
        while not self.stop.is_set():
            self.got += sum(1 for m in self.consumer.consume(1000, 0.05) if m.error() is None)
        self.consumer.close()


def test_the_worker_fetches_per_batch_not_per_produce_request(
        kafka_bootstrap: str, unique: Callable[[str], str]) -> None:
    topic = unique("fetch")
    create_topics(kafka_bootstrap, [topic])
    settings = load_settings(kafka_bootstrap_servers=kafka_bootstrap)
    engine = {**consumer_config(settings, worker_id=0), "group.id": unique("fetch-engine")}
    default = {k: v for k, v in engine.items()
               if k not in ("fetch.wait.max.ms", "fetch.min.bytes", "group.instance.id")}
    default["group.id"] = unique("fetch-default")
    readers = {"engine": _Reader(engine, topic), "default": _Reader(default, topic)}
    for reader in readers.values():
        reader.start()
    time.sleep(3)  # both joined their groups (a rebalance, then the first fetches)
    before = {name: r.fetches for name, r in readers.items()}
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 1})
    sent, t0 = 0, time.perf_counter()
    while (now := time.perf_counter()) < t0 + SECONDS:
        while sent < int((now - t0) * RATE):
            producer.produce(topic, b"x" * 200, str(sent).encode())
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    assert producer.flush(10) == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(r.got < sent for r in readers.values()):
        time.sleep(0.1)
    time.sleep(0.5)  # one more statistics report
    for reader in readers.values():
        reader.stop.set()
        reader.join(timeout=10)
    fetches = {name: r.fetches - before[name] for name, r in readers.items()}
    assert all(r.got == sent for r in readers.values()), {n: r.got for n, r in readers.items()}
    # the engine: about one fetch per FETCH_WAIT_MS over the window and the drain (165 on a
    # warm broker; 280 once on a broker just started, its first answers coming back early)
    assert fetches["engine"] <= 2 * (SECONDS + 1.5) * 1000 / FETCH_WAIT_MS, fetches
    assert fetches["engine"] < 0.5 * fetches["default"], fetches


def test_fetch_settings_can_be_overridden_but_exactly_once_keys_cannot() -> None:
    settings = load_settings(kafka_config={"fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
    config = consumer_config(settings, worker_id=3)
    assert config["fetch.wait.max.ms"] == 5 and config["fetch.min.bytes"] == 1
    assert config["isolation.level"] == "read_committed"
    assert config["enable.auto.commit"] is False
    assert config["group.instance.id"].endswith("-worker-3")
    # a smaller per-partition limit caps the minimum, so a backlog is still fetched at once
    small = consumer_config(load_settings(kafka_config={"max.partition.fetch.bytes": 65536}),
                            worker_id=0)
    assert small["fetch.min.bytes"] == 65536
    # a value that is not a number is left for librdkafka to refuse, naming the property
    bad = load_settings(kafka_config={"max.partition.fetch.bytes": "lots"})
    assert consumer_config(bad, worker_id=0)["fetch.min.bytes"] == FETCH_MIN_BYTES
    with pytest.raises(KafkaException, match="Invalid value for configuration property"):
        Consumer(consumer_config(bad, worker_id=0))
