"""Shared pieces for the integration tests: a trained model, Kafka helpers."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from confluent_kafka import Consumer, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from app.simulator import simulate
from features.offline import compute_features
from models.ensemble import train_ensemble
from models.registry import ModelRef, save
from models.train import TrainConfig


@pytest.fixture(scope="session")
def simulated() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate(customers=600, terminals=1200, days=45, seed=11)


@pytest.fixture(scope="session")
def model(simulated: tuple[pd.DataFrame, pd.DataFrame],
          tmp_path_factory: pytest.TempPathFactory) -> ModelRef:
    """A small real model, trained the way `fraudscore train` does."""
    tx, labels = simulated
    features = compute_features(tx, labels)
    ens = train_ensemble(features, labels["is_fraud"].to_numpy(), tx["timestamp"],
                         tx["customer_id"].to_numpy(), TrainConfig(n_estimators=60))
    registry: Path = tmp_path_factory.mktemp("registry")
    return save(ens, registry, {"test": True}, features.to_numpy()[:1000])


def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions) for n in names])
    for f in futures.values():
        f.result(timeout=30)


def produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    for key, value in items:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(60) != 0:
        raise RuntimeError("messages left undelivered")


def consume_all(
    bootstrap: str, topics: list[str], until: Callable[[dict[str, list[Message]]], bool],
    timeout_s: float = 120.0,
) -> dict[str, list[Message]]:
    """Read committed messages from the start of `topics` until `until(seen)` or timeout."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}",
        "auto.offset.reset": "earliest", "isolation.level": "read_committed",
        "enable.auto.commit": False,
    })
    consumer.subscribe(topics)
    seen: dict[str, list[Message]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(seen):
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    seen[msg.topic()].append(msg)
        # a short drain so duplicates arriving late would be caught too
        drain_end = time.monotonic() + 3.0
        while time.monotonic() < drain_end:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is None:
                    seen[msg.topic()].append(msg)
    finally:
        consumer.close()
    return seen


def values(messages: list[Message]) -> list[dict[str, object]]:
    return [json.loads(m.value()) for m in messages]


def scorer_run(kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str],
               model: ModelRef, keys_env: dict[str, str]
               ) -> tuple[dict[str, str], dict[str, str], str]:
    """One `fraudscore run`'s fresh topics (created), Redis namespace and group: its
    environment, the topics by role, and the namespace."""
    topics = {name: unique(name) for name in
              ("transactions", "labels", "alerts", "scores", "dlq", "audit")}
    create_topics(kafka_bootstrap, list(topics.values()))
    namespace = unique("fs")
    env = {
        **os.environ, **keys_env,
        "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "FRAUDSCORE_REDIS_URL": redis_url,
        "FRAUDSCORE_REDIS_NAMESPACE": namespace,
        "FRAUDSCORE_GROUP_ID": unique("scorer"),
        "FRAUDSCORE_MODEL_DIR": str(model.path),
        "FRAUDSCORE_METRICS_PORT": "0",
        **{f"FRAUDSCORE_TOPIC_{role.upper()}": topic for role, topic in topics.items()},
    }
    return env, topics, namespace
