"""Audit chains on a real broker: aborted transactions roll the head back, a restarted writer
continues its chain from the topic, even behind another writer's open transaction."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from confluent_kafka import Producer

from app.audit import AuditLog, AuditSigner, verify
from app.audit_kafka import last_record_in_topic, topic_records, write_one
from tests.integration.conftest import create_topics

pytestmark = pytest.mark.integration

SIGNER = AuditSigner({"a1": os.urandom(32)}, "a1")


def txn_producer(bootstrap: str, writer: str) -> Producer:
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"test-{writer}"})
    p.init_transactions(30)
    return p


def commit(producer: Producer, topic: str, chain: AuditLog, n: int) -> None:
    producer.begin_transaction()
    for i in range(n):
        line = chain.record(actor="svc", action="decision.alert", outcome="success",
                            object_type="alert", object_id=f"al-{i}")
        producer.produce(topic, line, chain.writer_id.encode())
    producer.commit_transaction(30)
    chain.confirm()


def test_abort_rollback_and_restart_keep_one_chain(kafka_bootstrap: str, unique) -> None:
    topic = unique("audit")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    config = {"bootstrap.servers": kafka_bootstrap}
    a, b = unique("writer-a"), unique("writer-b")
    pa, pb = txn_producer(kafka_bootstrap, a), txn_producer(kafka_bootstrap, b)

    chain = AuditLog(a, SIGNER, recover=lambda: last_record_in_topic(config, topic, a))
    commit(pa, topic, chain, 3)                                      # seq 0..2
    pa.begin_transaction()                                           # a batch that aborts
    for _ in range(2):
        pa.produce(topic, chain.record(actor="svc", action="decision.alert",
                                       outcome="success", object_type="alert",
                                       object_id="lost"), a.encode())
    # delivered first: an EndTxn(abort) racing the partition's AddPartitions once got
    # INVALID_TXN_STATE (fatal) from the local Kafka 3.9 broker
    pa.flush(10)
    pa.abort_transaction(30)
    chain.rollback()
    commit(pa, topic, chain, 2)                                      # seq 3..4

    # writer b holds a transaction open while a commits more: a read_committed reader
    # stops at b's open record and must wait for it to see a's newest records
    other = AuditLog(b, SIGNER)
    pb.begin_transaction()
    pb.produce(topic, other.record(actor="svc", action="x", outcome="success",
                                   object_type="t", object_id="1"), b.encode())
    pb.flush(10)
    commit(pa, topic, chain, 2)                                      # seq 5..6
    threading.Timer(2.0, lambda: (pb.commit_transaction(30), other.confirm())).start()

    started = time.monotonic()
    restarted = AuditLog(a, SIGNER, recover=lambda: last_record_in_topic(config, topic, a))
    assert restarted.head[0] == 7, "the restarted writer must continue after seq 6"
    assert time.monotonic() - started >= 1.5
    commit(txn_producer(kafka_bootstrap, a), topic, restarted, 1)   # seq 7, fences pa

    for i in range(2):  # the one-shot analyst writer continues its own chain each time
        write_one(config, topic, "analyst:test@host", SIGNER, actor="test",
                  action="alert.decrypt", outcome="success", object_type="alert",
                  object_id=f"al-{i}", reason="case")

    records = list(topic_records(config, topic))
    report = verify(records, SIGNER)
    assert report.ok, report.first_break()
    assert report.chains[a].last_seq == 7 and report.chains[a].records == 8
    assert report.chains["analyst:test@host"].last_seq == 1
    assert all(json.loads(v)["object_id"] != "lost" for _, v in records)
