"""Throughput of the Kafka engines side by side, on the same input, Kafka and Redis.

For each engine: fresh topics (3 partitions), group and Redis namespace; the same N
simulated events produced before the worker starts; one `fraudscore run --engine E` worker
(the real CLI, default batch settings); a read_committed reader of the scores topic. The
rate is N / (time the last score became visible - time the first one did), so worker start-up
and the group join are left out. Run it with the local stack up:

    eval "$(scripts/stack.sh up)"
    .venv/bin/python scripts/engine_throughput.py --events 50000
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.simulator import simulate  # noqa: E402
from app.sources import transactions_to_json  # noqa: E402
from features.offline import compute_features  # noqa: E402
from models.ensemble import train_ensemble  # noqa: E402
from models.registry import save  # noqa: E402
from models.train import TrainConfig  # noqa: E402

TOPICS = ("transactions", "labels", "alerts", "scores", "dlq", "audit")


def train(tx: pd.DataFrame, labels: pd.DataFrame, registry: Path) -> Path:
    features = compute_features(tx, labels)
    ens = train_ensemble(features, labels["is_fraud"].to_numpy(), tx["timestamp"],
                         tx["customer_id"].to_numpy(), TrainConfig(n_estimators=60))
    return save(ens, registry, {"bench": True}, features.to_numpy()[:1000]).path


def measure(engine: str, items: list[tuple[bytes, bytes]], model: Path, kafka: str,
            redis_url: str, keys: dict[str, str], timeout_s: float) -> dict[str, float]:
    suffix = uuid.uuid4().hex[:8]
    topics = {t: f"bench-{t}-{suffix}" for t in TOPICS}
    admin = AdminClient({"bootstrap.servers": kafka})
    for f in admin.create_topics([NewTopic(t, num_partitions=3)
                                  for t in topics.values()]).values():
        f.result(30)
    producer = Producer({"bootstrap.servers": kafka, "linger.ms": 20, "acks": "all"})
    for key, value in items:
        while True:
            try:
                producer.produce(topics["transactions"], value, key)
                break
            except BufferError:
                producer.poll(0.1)
    producer.flush(120)
    env = {**os.environ, **keys,
           "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka, "FRAUDSCORE_REDIS_URL": redis_url,
           "FRAUDSCORE_REDIS_NAMESPACE": f"bench-{suffix}",
           "FRAUDSCORE_GROUP_ID": f"bench-{suffix}", "FRAUDSCORE_MODEL_DIR": str(model),
           "FRAUDSCORE_METRICS_PORT": "0", "FRAUDSCORE_LOG_LEVEL": "WARNING",
           **{f"FRAUDSCORE_TOPIC_{k.upper()}": v for k, v in topics.items()}}
    reader = Consumer({"bootstrap.servers": kafka, "group.id": f"reader-{suffix}",
                       "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                       "enable.auto.commit": False})
    reader.subscribe([topics["scores"]])
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app", "run", "--engine", engine],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    seen, first, last = 0, None, None
    try:
        while seen < len(items) and time.perf_counter() - started < timeout_s:
            msgs = [m for m in reader.consume(1000, 0.2) if m.error() is None]
            if msgs:
                now = time.perf_counter()
                first = first if first is not None else now
                seen, last = seen + len(msgs), now
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        reader.close()
    if seen < len(items) or first is None or last is None:
        raise RuntimeError(f"{engine}: only {seen} of {len(items)} scores in {timeout_s}s")
    return {"events": len(items), "events_per_s": round(len(items) / (last - first)),
            "first_score_after_s": round(first - started, 1),
            "seconds": round(last - first, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--engines", default="confluent,faust")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    customers = max(600, args.events // 60)
    tx, labels = simulate(customers=customers, terminals=2 * customers, days=45, seed=11)
    if len(tx) < args.events:
        raise SystemExit(f"simulated only {len(tx)} events")
    keys = {name: base64.b64encode(os.urandom(32)).decode() for name in
            ("FRAUDSCORE_TOKEN_KEY", "FRAUDSCORE_PII_KEY", "FRAUDSCORE_AUDIT_KEY")}
    with tempfile.TemporaryDirectory() as tmp:
        model = train(tx, labels, Path(tmp))
        part = tx.iloc[:args.events]
        items = list(zip((c.encode() for c in part["customer_id"]),
                         transactions_to_json(part), strict=True))
        results = {engine: measure(engine, items, model, kafka, redis_url, keys, args.timeout)
                   for engine in args.engines.split(",")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
