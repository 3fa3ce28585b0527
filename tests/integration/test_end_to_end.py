"""The walking skeleton on real services: Kafka in, Redis features, ONNX score, Kafka out.

10,000 simulated events plus malformed ones go to a real broker; `fraudscore run` (the real
CLI, as a subprocess) scores them with each Kafka engine; a read_committed reader must then
find every event as a score (and an alert when flagged) or as a dead letter with its reason:
exactly once with the confluent engine (outputs and offsets in one transaction per
micro-batch), at least once with the faust engine (app/engines/faust_engine.py says why),
where a repeat must be a redelivery, the same decision about the same event.
"""

from __future__ import annotations

import base64
import json
import math
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import redis

from app.pipeline import alert_id
from app.schemas import Alert, PiiEnvelope, ScoreRecord
from app.security.envelope import FieldCipher, associated_data
from app.security.redact import open_dead_letter
from app.sources import transactions_to_json
from models.registry import ModelRef
from tests.integration.conftest import consume_all, produce, scorer_run

pytestmark = pytest.mark.integration

N_VALID = 10_000
EXACTLY_ONCE = {"confluent": True, "faust": False}


def malformed(valid: list[bytes], rng: random.Random) -> list[bytes]:
    """Bad events of every kind we promise to dead-letter."""
    out: list[bytes] = []
    for i in range(40):
        doc = json.loads(rng.choice(valid))
        doc["transaction_id"] = f"bad-{i}"
        kind = i % 8
        if kind == 0:
            doc["amount"] = -abs(doc["amount"])
        elif kind == 1:
            doc["timestamp"] = doc["timestamp"].rstrip("Z")
        elif kind == 2:
            del doc["customer_id"]
        elif kind == 3:
            pan = doc.get("card_number") or json.loads(valid[0])["card_number"]
            doc["card_number"] = pan[:-1] + str((int(pan[-1]) + 1) % 10)
        elif kind == 4:
            doc["amount"] = "lots"
        elif kind == 5:
            doc["pad"] = "x" * 100_000  # above the 64 KiB limit
        if kind == 6:
            out.append(b"\xff\xfe not utf-8 " + str(i).encode())
        elif kind == 7:
            out.append(b"{broken json " + str(i).encode())
        else:
            out.append(json.dumps(doc).encode())
    return out


def assert_repeats_are_redeliveries(scores: list[ScoreRecord]) -> None:
    """At-least-once: a second score of an event must be the same decision about it. The
    neural parts go through ONNX Runtime's GEMM, whose last bit depends on the batch's row
    count, so a redelivery in another batch may differ by an ulp (as in the kill -9 test)."""
    first: dict[str, ScoreRecord] = {}
    for s in scores:
        was = first.setdefault(s.transaction_id, s)
        assert ((was.decision, was.model_version, was.customer_token, was.event_time)
                == (s.decision, s.model_version, s.customer_token, s.event_time)), s.transaction_id
        assert math.isclose(was.fraud_score, s.fraud_score, rel_tol=1e-12), s.transaction_id
        assert math.isclose(was.anomaly_score, s.anomaly_score, rel_tol=1e-12), s.transaction_id


def _dump(r: redis.Redis, key: bytes) -> bytes:
    """A key and its whole value, whatever its type."""
    kind = r.type(key)
    if kind == b"hash":
        value = b"|".join(f + b"=" + v for f, v in r.hgetall(key).items())
    elif kind == b"list":
        value = b"|".join(r.lrange(key, 0, -1))
    else:
        value = r.get(key) or b""
    return key + b"=" + value


@pytest.mark.parametrize("engine", ["confluent", "faust"])
def test_every_event_ends_exactly_once_as_score_or_dead_letter(
    engine: str, kafka_bootstrap: str, redis_url: str, model: ModelRef,
    simulated: tuple[pd.DataFrame, pd.DataFrame], unique, keys_env: dict[str, str],
    tmp_path: Path,
) -> None:
    tx, _ = simulated
    tx = tx.iloc[:N_VALID]
    valid = transactions_to_json(tx)
    rng = random.Random(5)
    bad = malformed(valid, rng)
    items = [(c.encode(), v) for c, v in zip(tx["customer_id"], valid, strict=True)]
    for b in bad:
        items.insert(rng.randrange(len(items)), (b"bad", b))

    env, topics, namespace = scorer_run(kafka_bootstrap, redis_url, unique, model, keys_env)
    produce(kafka_bootstrap, topics["transactions"], items)

    log_path = tmp_path / "scorer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "run", "--engine", engine], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            seen = consume_all(
                kafka_bootstrap, [topics["scores"], topics["alerts"], topics["dlq"]],
                until=lambda s: len(s[topics["scores"]]) + len(s[topics["dlq"]]) >= len(items),
                timeout_s=180,
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    logs = log_path.read_bytes()
    assert code == 0, logs.decode(errors="replace")[-3000:]

    scores = [ScoreRecord.model_validate_json(m.value()) for m in seen[topics["scores"]]]
    alerts = [Alert.model_validate_json(m.value()) for m in seen[topics["alerts"]]]
    dead = seen[topics["dlq"]]

    # every valid event a score, every bad one a dead letter: exactly once (confluent), or
    # at least once with repeats that are redeliveries (faust)
    score_ids = Counter(s.transaction_id for s in scores)
    assert set(score_ids) == set(tx["transaction_id"])
    # the DLQ value is redacted; the original bytes are sealed under the PII key
    dlq_cipher = FieldCipher({"k1": base64.b64decode(keys_env["FRAUDSCORE_PII_KEY"])}, "k1")
    dead_values = Counter(open_dead_letter(m.headers(), dlq_cipher)[1] for m in dead)
    if EXACTLY_ONCE[engine]:
        assert sum(score_ids.values()) == N_VALID and max(score_ids.values()) == 1
        assert dead_values == Counter(bad)
    else:
        assert_repeats_are_redeliveries(scores)
        assert set(dead_values) == set(bad)
    for m in dead:
        headers = {k: v.decode() for k, v in (m.headers() or [])}
        assert headers["error.stage"] == "decode" and headers["error.reason"]
        assert headers["source.topic"] == topics["transactions"]
        assert int(headers["source.offset"]) >= 0 and int(headers["source.partition"]) >= 0

    # alerts: exactly the flagged scores, each decryptable only with the right binding
    flagged = {s.transaction_id for s in scores if s.decision != "allow"}
    assert {a.transaction_id for a in alerts} == flagged
    n_alerts = len(alerts) if EXACTLY_ONCE[engine] else len({a.alert_id for a in alerts})
    assert n_alerts == len(flagged) > 0
    pii_key = base64.b64decode(keys_env["FRAUDSCORE_PII_KEY"])
    cipher = FieldCipher({"k1": pii_key}, "k1")
    by_id = tx.set_index("transaction_id")
    for a in alerts[:50]:
        assert a.alert_id == alert_id(a.model_version, a.transaction_id)
        assert [r.feature for r in a.reasons] and len(a.reasons) >= 3
        pii = cipher.decrypt(PiiEnvelope.model_validate(a.pii.model_dump()),
                             associated_data(a.alert_id, a.transaction_id))
        assert pii["card_number"] == by_id.loc[a.transaction_id, "card_number"]

    # privacy: no card number or customer id in outputs, logs or Redis
    pans = set(tx["card_number"].dropna()) | {json.loads(b).get("card_number", "") for b in bad
                                              if b.startswith(b"{\"")} - {""}
    outputs = b"\n".join(m.value() for m in seen[topics["scores"]] + seen[topics["alerts"]])
    r = redis.Redis.from_url(redis_url)
    redis_dump = b"\n".join(_dump(r, k) for k in r.scan_iter(match=f"{namespace}:*", count=1000))
    assert redis_dump, "the scorer wrote no feature state"
    for pan in list(pans)[:2000]:
        needle = pan.encode()
        assert needle not in outputs and needle not in logs and needle not in redis_dump
    customer_ids = {f'"{c}"'.encode() for c in tx["customer_id"].unique()[:200]}
    assert not any(c in outputs for c in customer_ids)
