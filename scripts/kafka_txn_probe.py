"""What one Kafka transaction costs on this broker, apart from the pipeline.

Per transaction of 100 messages (200 bytes each): begin, produce, send_offsets_to_transaction,
commit_transaction, and the time until a read_committed reader has all 100. Prints the
median and 90th percentile of each step in ms over 40 transactions.

    eval "$(scripts/stack.sh up)"; .venv/bin/python scripts/kafka_txn_probe.py
"""

from __future__ import annotations

import json
import os
import time
import uuid

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROUNDS, MESSAGES = 40, 100


def main() -> None:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    name = f"txn-probe-{uuid.uuid4().hex[:8]}"
    source, sink = f"{name}.in", f"{name}.out"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, num_partitions=4)
                                       for t in (source, sink)]).values():
        future.result()
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": name,
                         "linger.ms": 5})
    producer.init_transactions(30)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": name,
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    consumer.subscribe([source])
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{name}.reader",
                       "isolation.level": "read_committed", "fetch.wait.max.ms": 10})
    reader.assign([TopicPartition(sink, p, 0) for p in range(4)])
    for _ in range(30):  # join the group: its metadata goes with the offsets
        consumer.poll(0.1)
    steps: dict[str, list[float]] = {k: [] for k in
                                     ("begin", "produce", "offsets", "commit", "visible")}
    try:
        for k in range(ROUNDS):
            t0 = time.perf_counter()
            producer.begin_transaction()
            t1 = time.perf_counter()
            for j in range(MESSAGES):
                producer.produce(sink, b"x" * 200, str(j).encode())
            t2 = time.perf_counter()
            producer.send_offsets_to_transaction([TopicPartition(source, 0, k + 1)],
                                                 consumer.consumer_group_metadata(), 30)
            t3 = time.perf_counter()
            producer.commit_transaction(30)
            t4 = time.perf_counter()
            got = 0
            while got < MESSAGES:
                got += sum(1 for m in reader.consume(MESSAGES - got, 1) if m.error() is None)
            t5 = time.perf_counter()
            for key, a, b in zip(steps, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5),
                                 strict=True):
                steps[key].append((b - a) * 1000)
    finally:
        consumer.close()
        reader.close()
        admin.delete_topics([source, sink])
    print(json.dumps({k: {"median_ms": round(float(np.median(v)), 2),
                          "p90_ms": round(float(np.quantile(v, 0.9)), 2)}
                      for k, v in steps.items()}))


if __name__ == "__main__":
    main()
