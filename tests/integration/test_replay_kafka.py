"""Replay equals live, on the real stack.

The live confluent engine (`fraudscore run`, as a subprocess) scores simulated events that
arrive on a fresh 3-partition transactions topic one day at a time, as live traffic does.
Replaying the last days of that topic from Kafka with the same model version and token key
must give every event exactly the live score and decision, while leaving the live Redis
state and the live consumer group's offsets as they were.

(Why a day at a time: terminal windows end 7 days before each event, and the worker reads
partitions at its own pace. Given a backlog of many days at once, it may score one
partition's late events before another partition's early ones are in the shared terminal
state, and then those scores differ from the point-in-time ones.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from app.cli import app
from app.schemas import ScoreRecord
from app.sources import transactions_to_json
from models.registry import ModelRef
from tests.integration.conftest import create_topics, produce

pytestmark = pytest.mark.integration

DAYS = 12  # events of the first 12 simulated days; the replay covers the last 4


def _redis_digest(url: str, namespace: str) -> str:
    """A fingerprint of every key (and value) under the live namespace."""
    r = redis.Redis.from_url(url)
    h = hashlib.sha256()
    for key in sorted(r.scan_iter(match=f"{namespace}:*", count=1000)):
        h.update(key + b"\0" + (r.dump(key) or b"") + b"\0")
    return h.hexdigest()


def _committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                   timeout=20)
        return [tp.offset for tp in found]
    finally:
        consumer.close()


class ScoresReader:
    """Reads the live scores topic as it grows (read_committed, like any downstream)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[ScoreRecord] = []
        self._consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}",
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "enable.auto.commit": False})
        self._consumer.subscribe([topic])

    def read_until(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.records) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.records)} of {n} scores after "
                                     f"{timeout_s:g} s")
            for msg in self._consumer.consume(1000, 0.5):
                if msg.error() is None:
                    self.records.append(ScoreRecord.model_validate_json(msg.value()))

    def close(self) -> None:
        self._consumer.close()


def test_replay_from_kafka_equals_the_live_scores(
    kafka_bootstrap: str, redis_url: str, model: ModelRef,
    simulated: tuple[pd.DataFrame, pd.DataFrame], unique, keys_env: dict[str, str],
    tmp_path: Path,
) -> None:
    tx, _ = simulated
    first_day = tx["timestamp"].min().normalize()
    tx = tx[tx["timestamp"] < first_day + timedelta(days=DAYS)]
    topics = {name: unique(name) for name in
              ("transactions", "labels", "alerts", "scores", "dlq", "audit")}
    create_topics(kafka_bootstrap, list(topics.values()))
    namespace, group = unique("fs"), unique("scorer")
    env = {
        **keys_env,
        "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "FRAUDSCORE_REDIS_URL": redis_url,
        "FRAUDSCORE_REDIS_NAMESPACE": namespace,
        "FRAUDSCORE_GROUP_ID": group,
        "FRAUDSCORE_METRICS_PORT": "0",
        **{f"FRAUDSCORE_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
    }

    # live: the confluent engine scores each day's events as they arrive
    log_path = tmp_path / "scorer.log"
    values = transactions_to_json(tx)
    day = ((tx["timestamp"] - first_day) // timedelta(days=1)).to_numpy()
    scores = ScoresReader(kafka_bootstrap, topics["scores"])
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "run", "--model", str(model.path)],
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            for d in range(DAYS):
                rows = np.flatnonzero(day == d)
                produce(kafka_bootstrap, topics["transactions"],
                        [(tx["customer_id"].iat[i].encode(), values[i]) for i in rows])
                scores.read_until(int((day <= d).sum()), timeout_s=120)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            scores.close()
    assert code == 0, log_path.read_text(errors="replace")[-3000:]
    live = pd.DataFrame([r.model_dump() for r in scores.records]).set_index("transaction_id")
    assert len(live) == len(tx) and live.index.is_unique

    redis_before = _redis_digest(redis_url, namespace)
    offsets_before = _committed(kafka_bootstrap, group, topics["transactions"])
    assert all(o >= 0 for o in offsets_before)

    # replay: the last 4 days, from Kafka, features rebuilt from the 8 days before
    start = first_day + timedelta(days=DAYS - 4)
    last = first_day + timedelta(days=DAYS - 1)
    out = tmp_path / "replay"
    result = CliRunner().invoke(app, [
        "replay", "--no-progress", "--from", f"{start:%Y-%m-%d}", "--to", f"{last:%Y-%m-%d}",
        "--source", "kafka", "--model", str(model.path), "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    replayed = pq.read_table(out / "scored.parquet").to_pandas().set_index("transaction_id")
    expected = tx[tx["timestamp"] >= start]["transaction_id"]
    assert set(replayed.index) == set(expected) and len(replayed) > 1000
    assert replayed["card_masked"].notna().all()

    live = live.loc[replayed.index]
    np.testing.assert_array_equal(replayed["score_a"].to_numpy(),
                                  live["fraud_score"].to_numpy())
    assert (replayed["decision_a"] == live["decision"]).all()
    assert (replayed["customer_token"] == live["customer_token"]).all()
    assert (replayed["decision_a"] != "allow").any()  # the comparison covers alerts too

    # nothing live was touched: feature state, the scorer's offsets, no replay group
    assert _redis_digest(redis_url, namespace) == redis_before
    assert _committed(kafka_bootstrap, group, topics["transactions"]) == offsets_before
    groups = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_consumer_groups(
        request_timeout=20).result()
    assert not [g.group_id for g in groups.valid if g.group_id.startswith("fraudscore-replay")]


def test_replay_refuses_a_missing_topic(kafka_bootstrap: str, model: ModelRef, unique,
                                        tmp_path: Path) -> None:
    out = tmp_path / "replay"
    topic = unique("no-such-topic")
    result = CliRunner().invoke(app, [
        "replay", "--no-progress", "--from", "2026-01-05", "--to", "2026-01-06",
        "--topic", topic, "--model", str(model.path), "--out", str(out)],
        env={"FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert result.exit_code == 2, result.output
    assert f"topic {topic!r} does not exist" in " ".join(result.output.split())
    assert not out.exists() and not list(tmp_path.glob(".replay.*"))
