"""PII canary on the real stack: known card numbers, e-mails and IPs go in; none come out.

Simulated events (Luhn-valid card numbers, IPs, device ids) plus an e-mail per event and
malformed events carrying the same data are scored by `fraudscore run` (confluent engine,
real Kafka and Redis). The PII key directory is rotated mid-stream, without a restart. An
analyst then decrypts one alert of each key through the CLI. Afterwards every Redis key and
value of the run, every record of every output topic (values, keys, headers, aborted
records included), the audit file and every process log are scanned: no card number,
e-mail, IP, device id or customer id may appear in clear. The audit trail must verify.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, TopicPartition

from app.schemas import Alert
from app.security.envelope import FieldCipher
from app.security.keyring import load_keyring
from app.security.redact import open_dead_letter
from app.sources import transactions_to_json
from models.registry import ModelRef
from tests.integration.conftest import consume_all, create_topics, produce

pytestmark = pytest.mark.integration

N_PHASE = 1200


def with_canaries(raw: bytes, i: int, salt: str) -> bytes:
    doc = json.loads(raw)
    doc["email"] = f"canary.{i}.{salt}@example.org"
    if i % 5 == 0:
        doc["ip"] = f"2001:db8:{salt[:4]}::{i % 9999:x}"
    return json.dumps(doc).encode()


def malformed(valid: list[bytes], rng: random.Random) -> list[bytes]:
    """Bad events that carry personal data in every shape a producer could send it."""
    out = []
    for i in range(24):
        doc = json.loads(rng.choice(valid))
        pan, email, ip = doc["card_number"], doc["email"], doc.get("ip", "192.0.2.77")
        kind = i % 6
        if kind == 0:
            doc["amount"] = -1.0
        elif kind == 1:
            doc["card_number"] = pan[:-1] + str((int(pan[-1]) + 1) % 10)  # fails Luhn
        elif kind == 2:
            doc["note"] = f"card {pan[:4]} {pan[4:8]} {pan[8:12]} {pan[12:]} mail {email}"
            doc["currency"] = "euro"
        elif kind == 3:
            doc["email"] = "not an email"
            doc["ip"] = ip
        if kind == 4:
            out.append(f"{{broken json {pan} {email} {ip}".encode())
        elif kind == 5:
            out.append(b"\xff\xfe" + f"{pan}|{email}|{ip}".encode())
        else:
            out.append(json.dumps(doc).encode())
    return out


def dump_topic(bootstrap: str, topic: str) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Every record up to the high watermark, aborted ones included (read_uncommitted)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"canary-{time.time_ns()}",
                  "isolation.level": "read_uncommitted", "enable.partition.eof": True,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out, done = [], {p for p in parts if ends[p] == 0}
    deadline = time.monotonic() + 60
    while len(done) < len(parts) and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is None:
            continue
        if msg.error() is not None:
            if msg.error().code() == KafkaError._PARTITION_EOF:
                done.add(msg.partition())
            continue
        out.append((msg.key() or b"", msg.value() or b"", list(msg.headers() or [])))
    c.close()
    return out


def redis_dump(r: redis.Redis, namespace: str) -> bytes:
    parts = []
    for key in r.scan_iter(match=f"{namespace}*", count=1000):
        kind = r.type(key)
        if kind == b"hash":
            value = b"|".join(f + b"=" + v for f, v in r.hgetall(key).items())
        elif kind == b"list":
            value = b"|".join(r.lrange(key, 0, -1))
        elif kind == b"set":
            value = b"|".join(r.smembers(key))
        elif kind == b"zset":
            value = b"|".join(r.zrange(key, 0, -1))
        else:
            value = r.get(key) or b""
        parts.append(key + b"=" + value)
    return b"\n".join(parts)


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True,
                          timeout=180)


def test_no_personal_data_anywhere_downstream(
    kafka_bootstrap: str, redis_url: str, model: ModelRef,
    simulated: tuple[pd.DataFrame, pd.DataFrame], unique, keys_env: dict[str, str],
    tmp_path: Path,
) -> None:
    salt = os.urandom(4).hex()
    tx = simulated[0].iloc[:2 * N_PHASE]
    valid = [with_canaries(v, i, salt) for i, v in enumerate(transactions_to_json(tx))]
    rng = random.Random(3)
    bad = malformed(valid, rng)
    keys = [c.encode() for c in tx["customer_id"]]
    phase1 = list(zip(keys[:N_PHASE], valid[:N_PHASE], strict=True)) + \
        [(rng.choice(keys), b) for b in bad]
    phase2 = list(zip(keys[N_PHASE:], valid[N_PHASE:], strict=True))

    topics = {n: unique(n) for n in ("transactions", "labels", "alerts", "scores", "dlq",
                                     "audit")}
    create_topics(kafka_bootstrap, list(topics.values()))
    namespace = unique("fs")
    key_dir, audit_file = tmp_path / "pii-keys", tmp_path / "audit.jsonl"
    env = {
        **os.environ, "FRAUDSCORE_TOKEN_KEY": keys_env["FRAUDSCORE_TOKEN_KEY"],
        "FRAUDSCORE_AUDIT_KEY": keys_env["FRAUDSCORE_AUDIT_KEY"],
        "FRAUDSCORE_PII_KEYRING_DIR": str(key_dir), "FRAUDSCORE_AUDIT_FILE": str(audit_file),
        "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "FRAUDSCORE_REDIS_URL": redis_url, "FRAUDSCORE_REDIS_NAMESPACE": namespace,
        "FRAUDSCORE_GROUP_ID": unique("scorer"), "FRAUDSCORE_MODEL_DIR": str(model.path),
        "FRAUDSCORE_REVIEW_THRESHOLD": "0.02", "FRAUDSCORE_BLOCK_THRESHOLD": "0.5",
        "FRAUDSCORE_METRICS_PORT": "0", "FRAUDSCORE_LOG_LEVEL": "DEBUG",
        "FRAUDSCORE_AUDIT_CHECKPOINT_S": "1",
        **{f"FRAUDSCORE_TOPIC_{k.upper()}": v for k, v in topics.items()},
    }
    env.pop("FRAUDSCORE_PII_KEY", None)
    logs: list[bytes] = []
    generated = cli(["keys", "generate"], env)
    assert generated.returncode == 0, generated.stderr
    first_kid = load_keyring(key_dir).active

    log_path = tmp_path / "scorer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            produce(kafka_bootstrap, topics["transactions"], phase1)
            consume_all(kafka_bootstrap, [topics["scores"], topics["dlq"]],
                        until=lambda s: len(s[topics["scores"]]) + len(s[topics["dlq"]])
                        >= len(phase1), timeout_s=180)
            rotated = cli(["keys", "rotate"], env)  # the scorer keeps running
            logs.append(rotated.stdout + rotated.stderr)
            assert rotated.returncode == 0, rotated.stderr
            produce(kafka_bootstrap, topics["transactions"], phase2)
            seen = consume_all(
                kafka_bootstrap, [topics["scores"], topics["alerts"], topics["dlq"]],
                until=lambda s: len(s[topics["scores"]]) + len(s[topics["dlq"]])
                >= len(phase1) + len(phase2), timeout_s=180)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    logs.append(log_path.read_bytes())
    assert code == 0, logs[-1].decode(errors="replace")[-3000:]
    assert len(seen[topics["dlq"]]) == len(bad)
    assert len(seen[topics["scores"]]) == len(phase1) + len(phase2) - len(bad)

    # rotation without restart: phase 2 alerts use the new key, phase 1 alerts the old one
    second_kid = load_keyring(key_dir).active
    alerts = [Alert.model_validate_json(m.value()) for m in seen[topics["alerts"]]]
    phase2_ids = {json.loads(v)["transaction_id"] for _, v in phase2}
    old = [a for a in alerts if a.transaction_id not in phase2_ids]
    new = [a for a in alerts if a.transaction_id in phase2_ids]
    assert old and new and second_kid != first_kid
    assert {a.pii.kid for a in old} == {first_kid} and {a.pii.kid for a in new} == {second_kid}
    cipher = FieldCipher.from_keyring(load_keyring(key_dir))
    originals = {open_dead_letter(m.headers(), cipher)[1] for m in seen[topics["dlq"]]}
    assert originals == set(bad)

    # an analyst decrypts one alert of each key; each access is audited on the topic
    by_tx = {json.loads(v)["transaction_id"]: json.loads(v) for v in valid}
    for alert in (old[0], new[-1]):
        shown = cli(["alerts", "decrypt", alert.alert_id, "--reason", "canary test: chargeback",
                     "--from-topic", topics["alerts"]], env)
        logs.append(shown.stderr)
        assert shown.returncode == 0, shown.stderr
        pii = json.loads(shown.stdout)["pii"]
        assert pii["card_number"] == by_tx[alert.transaction_id]["card_number"]
        assert pii["email"] == by_tx[alert.transaction_id]["email"]
    verified = cli(["audit", "verify", "--topic", topics["audit"], "--anchor",
                    str(audit_file), "--anchor", str(log_path)], env)
    logs.append(verified.stdout + verified.stderr)
    assert verified.returncode == 0, verified.stderr.decode()
    assert b"analyst:" in verified.stderr and b"BROKEN" not in verified.stderr

    # the scan: every sink, every byte
    sinks: dict[str, bytes] = {"logs": b"\n".join(logs), "audit file": audit_file.read_bytes()}
    for name, topic in topics.items():
        if name in ("transactions", "labels"):
            continue
        records = dump_topic(kafka_bootstrap, topic)
        sinks[f"topic {name}"] = b"\n".join(
            k + b"\t" + v + b"\t" + b"\t".join(h.encode() + b"=" + (hv or b"")
                                               for h, hv in hs) for k, v, hs in records)
    sinks["redis"] = redis_dump(redis.Redis.from_url(redis_url), namespace)
    assert sinks["redis"] and sinks["topic audit"] and sinks["audit file"]

    docs = [json.loads(v) for v in valid]
    needles = {d["card_number"] for d in docs} | {d["email"] for d in docs} \
        | {d["ip"] for d in docs if d.get("ip")} | {d["device_id"] for d in docs
                                                    if d.get("device_id")}
    needles |= {json.loads(b)["card_number"] for b in bad if b.startswith(b"{\"")}
    leaks = {name: sorted(n for n in needles if n.encode() in blob)[:5]
             for name, blob in sinks.items()}
    assert not any(leaks.values()), leaks
    customers = {f'"{c}"'.encode() for c in tx["customer_id"].unique()} \
        | {c.encode() for c in tx["customer_id"].unique()}
    for name, blob in sinks.items():
        assert not [c for c in customers if c in blob], name
    assert len(needles) > 3000
    assert base64.b64decode(keys_env["FRAUDSCORE_TOKEN_KEY"]) not in b"".join(sinks.values())
