"""What one Kafka transaction costs on this broker, apart from the pipeline.

Per transaction of 100 messages (200 bytes each): begin, produce, send_offsets_to_transaction,
commit_transaction, and the time until a read_committed reader has all 100 (``spaced``:
each transaction waits for that before the next begins). Then ``back_to_back``: the next
transaction begins as soon as the last commit returns, as in the worker under load, once
with librdkafka's default ``retry.backoff.ms`` (100) and once with the engine's
(``TXN_RETRY_BACKOFF_MS``), alternated. Prints the median and 90th percentile of each step
in ms over 40 transactions per series, and the mean: a retry after a 100 ms backoff hits
some transactions, not all, so the median alone can miss it. Last, ``call_order``: two
producers at once, back to back, each transaction adding its outputs before its offsets or
after them (the engine's order, ``_commit`` in app/engines/confluent.py), 160 each.

    eval "$(scripts/stack.sh up)"; .venv/bin/python scripts/kafka_txn_probe.py
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engines.confluent import TXN_RETRY_BACKOFF_MS

ROUNDS, MESSAGES, PARTITIONS = 40, 100, 4
STEPS = ("begin", "produce", "offsets", "commit", "visible")


class Probe:
    """A transactional producer, its consumer group, and a read_committed reader."""

    def __init__(self, bootstrap: str, producer_extra: dict[str, Any]) -> None:
        self.name = f"txn-probe-{uuid.uuid4().hex[:8]}"
        self.source, self.sink = f"{self.name}.in", f"{self.name}.out"
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in self.admin.create_topics([NewTopic(t, num_partitions=PARTITIONS)
                                                for t in (self.source, self.sink)]).values():
            future.result()
        self.producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": self.name,
                                  "linger.ms": 5, **producer_extra})
        self.producer.init_transactions(30)
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": self.name,
                                  "enable.auto.commit": False,
                                  "isolation.level": "read_committed"})
        self.consumer.subscribe([self.source])
        self.reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{self.name}.r",
                                "isolation.level": "read_committed", "fetch.wait.max.ms": 10})
        self.reader.assign([TopicPartition(self.sink, p, 0) for p in range(PARTITIONS)])
        for _ in range(30):  # join the group: its metadata goes with the offsets
            self.consumer.poll(0.1)
        self.offset = 0

    def run(self, rounds: int, wait_visible: bool) -> dict[str, list[float]]:
        steps: dict[str, list[float]] = {k: [] for k in STEPS}
        for _ in range(rounds):
            self.offset += 1
            t0 = time.perf_counter()
            self.producer.begin_transaction()
            t1 = time.perf_counter()
            for j in range(MESSAGES):
                self.producer.produce(self.sink, b"x" * 200, str(j).encode())
            t2 = time.perf_counter()
            self.producer.send_offsets_to_transaction(
                [TopicPartition(self.source, p, self.offset) for p in range(PARTITIONS)],
                self.consumer.consumer_group_metadata(), 30)
            t3 = time.perf_counter()
            self.producer.commit_transaction(30)
            t4 = time.perf_counter()
            if wait_visible:
                got = 0
                while got < MESSAGES:
                    got += sum(1 for m in self.reader.consume(MESSAGES - got, 1)
                               if m.error() is None)
            t5 = time.perf_counter()
            for key, a, b in zip(STEPS, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5),
                                 strict=True):
                steps[key].append((b - a) * 1000)
        if not wait_visible:
            del steps["visible"]
        return steps

    def cycles(self, offsets_first: bool, rounds: int, out: list[float]) -> None:
        """Back-to-back transactions as the engine commits them: offsets then outputs
        (``offsets_first``, the engine's order), or outputs then offsets; each delivered
        before the commit. Appends each whole transaction's time in ms to `out`."""
        for _ in range(rounds):
            self.offset += 1
            t0 = time.perf_counter()
            self.producer.begin_transaction()
            offsets = [TopicPartition(self.source, p, self.offset) for p in range(PARTITIONS)]
            meta = self.consumer.consumer_group_metadata()
            if offsets_first:
                self.producer.send_offsets_to_transaction(offsets, meta, 30)
            for j in range(MESSAGES):
                self.producer.produce(self.sink, b"x" * 200, str(j).encode())
            self.producer.flush(30)
            if not offsets_first:
                self.producer.send_offsets_to_transaction(offsets, meta, 30)
            self.producer.commit_transaction(30)
            out.append((time.perf_counter() - t0) * 1000)

    def close(self) -> None:
        self.consumer.close()
        self.reader.close()
        self.admin.delete_topics([self.source, self.sink])


def _summary(steps: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"median_ms": round(float(np.median(v)), 2),
                "p90_ms": round(float(np.quantile(v, 0.9)), 2),
                "mean_ms": round(float(np.mean(v)), 2)} for k, v in steps.items()}


def main() -> None:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    probes = {"librdkafka_default_100ms": Probe(bootstrap, {}),
              f"engine_{TXN_RETRY_BACKOFF_MS}ms": Probe(bootstrap, {
                  "retry.backoff.ms": TXN_RETRY_BACKOFF_MS})}
    try:
        default = probes["librdkafka_default_100ms"]
        spaced = _summary(default.run(ROUNDS, wait_visible=True))
        series: dict[str, dict[str, list[float]]] = {name: {} for name in probes}
        for _ in range(4):  # alternate in slices: the machine's load moves
            for name, probe in probes.items():
                for key, values in probe.run(ROUNDS // 4, wait_visible=False).items():
                    series[name].setdefault(key, []).extend(values)
    finally:
        for probe in probes.values():
            probe.close()
    back = {name: _summary(steps) for name, steps in series.items()}
    order = _call_order(bootstrap)
    a, b = (back[name]["offsets"]["mean_ms"] for name in probes)
    print(json.dumps({"spaced": spaced, "back_to_back": back, "call_order": order,
                      "offsets_mean_ratio_default_vs_engine": round(a / b, 1) if b else None}))


def _call_order(bootstrap: str) -> dict[str, dict[str, float]]:
    """Two producers at once, back to back, with the engine's backoff: a transaction's
    outputs before its offsets, or after (the engine's order). A refused AddPartitionsToTxn
    (CONCURRENT_TRANSACTIONS, the last commit's markers not yet written) is retried after a
    fixed 20 ms in librdkafka, AddOffsetsToTxn after `retry.backoff.ms`: the share of
    transactions taking 20 ms or more shows which one waited."""
    extra = {"retry.backoff.ms": TXN_RETRY_BACKOFF_MS}
    pairs = {"outputs_first": [Probe(bootstrap, extra) for _ in range(2)],
             "offsets_first": [Probe(bootstrap, extra) for _ in range(2)]}
    times: dict[str, list[float]] = {name: [] for name in pairs}
    try:
        for _ in range(4):  # alternate in slices: the machine's load moves
            for name, probes in pairs.items():
                threads = [threading.Thread(target=p.cycles,
                                            args=(name == "offsets_first", ROUNDS // 2,
                                                  times[name])) for p in probes]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
    finally:
        for probes in pairs.values():
            for p in probes:
                p.close()
    return {name: {"transactions": len(v), "median_ms": round(float(np.median(v)), 2),
                   "p90_ms": round(float(np.quantile(v, 0.9)), 2),
                   "p99_ms": round(float(np.quantile(v, 0.99)), 2),
                   "at_least_20ms": int(np.sum(np.asarray(v) >= 20.0))}
            for name, v in times.items()}


if __name__ == "__main__":
    main()
