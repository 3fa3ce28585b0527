"""The faust engine's at-least-once promise under the failures that break naive ones.

SIGKILL at random points while it scores, a Redis that stops answering mid-stream (the
batch is retried, never acked), and a second worker joining and leaving the group. Every
event must then have a score, and a repeated score must be a redelivery: the same decision
about the same event (app/engines/faust_engine.py says why not exactly-once). Behaviour
shared with the confluent engine is in test_end_to_end.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import pytest
from confluent_kafka import Consumer, TopicPartition

from app.config import ConfigError, load_settings
from app.engines.faust_engine import broker_credentials
from app.sources import transactions_to_json
from models.registry import ModelRef
from tests.integration.conftest import consume_all, create_topics, produce

N_EVENTS = 12_000
KILLS = 6


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """A failed test leaves no worker behind to eat the CPU of the tests after it."""
    yield
    while Worker.started:
        proc = Worker.started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Worker:
    """`fraudscore run --engine faust` processes of one test, on its own topics."""

    started: ClassVar[list[subprocess.Popen[bytes]]] = []  # killed after each test (_no_orphans)

    def __init__(self, kafka: str, redis_url: str, model: ModelRef, unique,
                 keys_env: dict[str, str], tmp: Path) -> None:
        self.kafka = kafka
        self.topics = {n: unique(n) for n in
                       ("transactions", "labels", "alerts", "scores", "dlq", "audit")}
        inputs = [self.topics["transactions"], self.topics["labels"]]
        create_topics(kafka, inputs, partitions=3)
        # outputs not co-partitioned with the inputs: faust's own Topic.send would look for
        # a transactional producer of output partition 3, which no input partition has
        create_topics(kafka, [t for t in self.topics.values() if t not in inputs],
                      partitions=4)
        self.env = {
            **os.environ, **keys_env,
            "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka,
            "FRAUDSCORE_REDIS_URL": redis_url,
            "FRAUDSCORE_REDIS_NAMESPACE": unique("fs"),
            "FRAUDSCORE_GROUP_ID": unique("scorer"),
            "FRAUDSCORE_MODEL_DIR": str(model.path),
            "FRAUDSCORE_METRICS_PORT": "0",
            **{f"FRAUDSCORE_TOPIC_{k.upper()}": v for k, v in self.topics.items()},
        }
        self.tmp = tmp
        self.tmpdir = tmp / "tmpdir"  # the workers' temp folder (faust's datadir goes there)
        self.tmpdir.mkdir()
        self.env["TMPDIR"] = str(self.tmpdir)
        self.n_started = 0

    def start(self, worker_id: int = 0, **env: str) -> subprocess.Popen[bytes]:
        self.n_started += 1
        log = (self.tmp / f"worker-{self.n_started}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "run", "--engine", "faust",
             "--worker-id", str(worker_id)],
            env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        Worker.started.append(proc)
        return proc

    def output_end(self) -> int:
        """High watermark of the scores topic: moves as a worker produces."""
        c = Consumer({"bootstrap.servers": self.kafka, "group.id": "watermarks"})
        try:
            topic = self.topics["scores"]
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                       for p in parts)
        finally:
            c.close()

    def scores_seen(self, expected: pd.Series, timeout_s: float = 240) -> list[dict]:
        """Read scores until every expected event has one (repeats may come first)."""
        topic, want = self.topics["scores"], set(expected)

        def complete(seen: dict) -> bool:
            return len(seen[topic]) >= len(want) and \
                want <= {json.loads(m.value())["transaction_id"] for m in seen[topic]}

        seen = consume_all(self.kafka, [topic, self.topics["dlq"]], until=complete,
                           timeout_s=timeout_s)
        assert not seen[self.topics["dlq"]], "valid events were dead-lettered"
        return [json.loads(m.value()) for m in seen[topic]]

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:]
                         for p in sorted(self.tmp.glob("worker-*.log")))


def assert_at_least_once(scores: list[dict], expected: pd.Series, logs: str) -> int:
    """No event lost, every repeat the same decision about the same event; the repeats."""
    ids = Counter(s["transaction_id"] for s in scores)
    lost = set(expected) - set(ids)
    assert not lost, f"{len(lost)} lost\n{logs[-3000:]}"
    first: dict[str, dict] = {}
    for s in scores:  # scores within 1e-12: ONNX GEMM's last bit depends on the batch's rows
        was = first.setdefault(s["transaction_id"], s)
        same = ("decision", "customer_token", "event_time")
        assert [was[k] for k in same] == [s[k] for k in same], s
        assert math.isclose(was["fraud_score"], s["fraud_score"], rel_tol=1e-12), s
    return sum(ids.values()) - len(ids)


@pytest.fixture
def stream(simulated: tuple[pd.DataFrame, pd.DataFrame]) -> pd.DataFrame:
    return simulated[0].iloc[:N_EVENTS].reset_index(drop=True)


def items_of(tx: pd.DataFrame) -> list[tuple[bytes, bytes]]:
    return [(c.encode(), v) for c, v in
            zip(tx["customer_id"], transactions_to_json(tx), strict=True)]


@pytest.mark.integration
def test_kill_9_loses_and_duplicates_nothing(
    kafka_bootstrap: str, redis_url: str, model: ModelRef, stream: pd.DataFrame, unique,
    keys_env: dict[str, str], tmp_path: Path,
) -> None:
    svc = Worker(kafka_bootstrap, redis_url, model, unique, keys_env, tmp_path)
    produce(kafka_bootstrap, svc.topics["transactions"], items_of(stream))
    rng = random.Random(4)
    progressed = 0
    for _ in range(KILLS):
        before = svc.output_end()
        proc = svc.start(FRAUDSCORE_BATCH_SIZE="200")
        deadline = time.monotonic() + 90
        while (svc.output_end() == before and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)  # wait until it scores, then kill at a random point after
        assert proc.poll() is None, svc.logs()
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        progressed += svc.output_end() > before
    assert progressed >= KILLS // 2, "most kills should land while the worker was scoring"
    final = svc.start()
    try:
        scores = svc.scores_seen(stream["transaction_id"])
    finally:
        final.send_signal(signal.SIGTERM)
        assert final.wait(60) == 0, svc.logs()
    repeats = assert_at_least_once(scores, stream["transaction_id"], svc.logs())
    print(f"{repeats} repeated scores after {KILLS} kills")


class FreezableProxy:
    """A TCP relay to Redis that can stop relaying for a while: a Redis outage that only
    this test's worker sees (CLIENT PAUSE would stall every test sharing the server)."""

    def __init__(self, redis_url: str) -> None:
        url = urlsplit(redis_url)
        self.target = (url.hostname or "127.0.0.1", url.port or 6379)
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        port = self.server.getsockname()[1]
        auth = url.netloc.rpartition("@")[0]
        self.url = urlunsplit(url._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth
                                           else f"127.0.0.1:{port}"))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FreezableProxy]:
    proxy = FreezableProxy(redis_url)
    yield proxy
    proxy.close()


@pytest.mark.integration
def test_redis_outage_retries_the_part_and_loses_nothing(
    kafka_bootstrap: str, redis_url: str, model: ModelRef, stream: pd.DataFrame, unique,
    keys_env: dict[str, str], tmp_path: Path, redis_proxy: FreezableProxy,
) -> None:
    svc = Worker(kafka_bootstrap, redis_url, model, unique, keys_env, tmp_path)
    tx = stream.iloc[:4000]
    items = items_of(tx)
    # the rest only once Redis is frozen: a worker that had drained everything before the
    # freeze would never meet the outage
    produce(kafka_bootstrap, svc.topics["transactions"], items[:1000])
    proc = svc.start(FRAUDSCORE_REDIS_URL=redis_proxy.url, FRAUDSCORE_BATCH_SIZE="100")
    try:
        consume_all(kafka_bootstrap, [svc.topics["scores"]],
                    until=lambda s: len(s[svc.topics["scores"]]) >= 300, timeout_s=120)
        redis_proxy.frozen.set()  # requests time out after 5 s: the part fails, is retried
        produce(kafka_bootstrap, svc.topics["transactions"], items[1000:])
        time.sleep(12)
        redis_proxy.frozen.clear()
        scores = svc.scores_seen(tx["transaction_id"], timeout_s=180)
    finally:
        redis_proxy.frozen.clear()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    logs = svc.logs()
    assert code == 0, logs[-3000:]
    assert "feature store unavailable" in logs
    assert_at_least_once(scores, tx["transaction_id"], logs)
    # a stopped worker leaves no faust data folder, neither in its working directory
    # (faust's default) nor in the temp folder
    assert not list(svc.tmp.glob("*-data")) and not list(svc.tmpdir.glob("fraudscore-faust-*"))


@pytest.mark.integration
def test_a_second_worker_joining_and_leaving_mid_stream(
    kafka_bootstrap: str, redis_url: str, model: ModelRef, stream: pd.DataFrame, unique,
    keys_env: dict[str, str], tmp_path: Path,
) -> None:
    svc = Worker(kafka_bootstrap, redis_url, model, unique, keys_env, tmp_path)
    items = items_of(stream)

    def trickle() -> None:  # ~25 s of traffic, so the membership changes happen mid-stream
        for i in range(0, len(items), 1000):
            produce(kafka_bootstrap, svc.topics["transactions"], items[i:i + 1000])
            time.sleep(2.0)

    feeder = threading.Thread(target=trickle)
    feeder.start()
    a = svc.start(0, FRAUDSCORE_BATCH_SIZE="200")
    time.sleep(6)
    b = svc.start(1, FRAUDSCORE_BATCH_SIZE="200")  # joins: partitions move to it
    time.sleep(10)
    b.send_signal(signal.SIGTERM)  # leaves: they move back
    assert b.wait(60) == 0, svc.logs()
    feeder.join()
    try:
        scores = svc.scores_seen(stream["transaction_id"])
    finally:
        a.send_signal(signal.SIGTERM)
        assert a.wait(60) == 0, svc.logs()
    repeats = assert_at_least_once(scores, stream["transaction_id"], svc.logs())
    print(f"{repeats} repeated scores after a join and a leave")


def test_kafka_settings_map_to_faust_credentials() -> None:
    plain = load_settings(kafka_config={})
    assert broker_credentials(plain) is None
    sasl = broker_credentials(load_settings(kafka_config={
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc", "sasl.password": "secret"}))
    assert sasl is not None and sasl.username == "svc" and sasl.ssl_context is not None
    with pytest.raises(ConfigError, match=r"socket\.keepalive\.enable"):
        broker_credentials(load_settings(kafka_config={"socket.keepalive.enable": True}))
