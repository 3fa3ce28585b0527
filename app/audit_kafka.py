"""The audit topic: reading chains back (recovery, verification) and one-shot writers.

Reads use ``read_committed`` and go on until the consumer's position passes the
*uncommitted* high watermark: a ``read_committed`` reader stops at the last stable offset,
so a record committed just behind another writer's open transaction would otherwise be
missed, and a restarted writer would fork its own chain.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from app.audit import AuditError, AuditLog, AuditSigner, write_to_file
from app.config import Settings
from app.security.keys import audit_signer
from app.security.redact import redact_text

READ_TIMEOUT_S = 90.0  # above the scorer's transaction timeout (60 s): open ones resolve
TXN_TIMEOUT_S = 30.0


def _consumer(config: dict[str, Any], isolation: str) -> Consumer:
    return Consumer({
        **config,
        "group.id": f"fraudscore-audit-reader-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "isolation.level": isolation,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        raise AuditError(f"audit topic {topic!r} is not readable: "
                         f"{meta.error if meta else 'missing'}")
    return sorted(meta.partitions)


def _read_range(consumer: Consumer, topic: str, partition: int, start: int, end: int,
                deadline: float) -> list[Message]:
    """Committed messages with start ≤ offset < end (end: an uncommitted high watermark)."""
    if start >= end:
        return []
    tp = TopicPartition(topic, partition, start)
    consumer.assign([tp])
    out: list[Message] = []
    try:
        while True:
            pos = consumer.position([TopicPartition(topic, partition)])[0].offset
            if pos >= end:  # (before the first fetch, pos is negative: "invalid")
                return out
            if time.monotonic() > deadline:
                raise AuditError(f"reading {topic}[{partition}] timed out at offset {pos} of "
                                 f"{end}: an open transaction that does not end?")
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            if msg.offset() >= end:
                return out
            out.append(msg)
    finally:
        consumer.unassign()


def _bounds(config: dict[str, Any], topic: str) -> dict[int, tuple[int, int]]:
    """partition → (low, uncommitted high watermark)."""
    probe = _consumer(config, "read_uncommitted")
    try:
        return {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10,
                                               cached=False)
                for p in _partitions(probe, topic)}
    finally:
        probe.close()


def last_record_in_topic(config: dict[str, Any], topic: str, writer_id: str,
                         timeout_s: float = READ_TIMEOUT_S) -> dict[str, Any] | None:
    """The writer's last committed record: windows scanned backwards from each end.

    Records are keyed by writer id, so with librdkafka's default partitioner (CRC32 of the
    key) they live in partition crc32 % count, which is read first; when it holds the
    writer's records they are the newest (a grown topic sends new records to the new
    partition). Otherwise — a new writer, another partitioner — every partition is read.
    """
    deadline = time.monotonic() + timeout_s
    key = writer_id.encode()
    best: dict[str, Any] | None = None
    bounds = _bounds(config, topic)
    home = zlib.crc32(key) % len(bounds) if bounds else 0
    reader = _consumer(config, "read_committed")
    try:
        for partition in sorted(bounds, key=lambda p: p != home):
            low, high = bounds[partition]
            end, size = high, 256
            while end > low:
                start = max(low, end - size)
                mine = [m for m in _read_range(reader, topic, partition, start, end, deadline)
                        if m.key() == key]
                if mine:
                    doc = json.loads(mine[-1].value())
                    if best is None or int(doc["seq"]) > int(best["seq"]):
                        best = doc
                    break
                end, size = start, size * 4
            if best is not None and partition == home:
                break
    finally:
        reader.close()
    return best


def topic_records(config: dict[str, Any], topic: str,
                  timeout_s: float = READ_TIMEOUT_S) -> Iterator[tuple[str, bytes]]:
    """(``topic[partition]@offset``, value) for every committed record, partition order."""
    deadline = time.monotonic() + timeout_s
    reader = _consumer(config, "read_committed")
    try:
        for partition, (low, high) in _bounds(config, topic).items():
            for msg in _read_range(reader, topic, partition, low, high, deadline):
                yield f"{topic}[{partition}]@{msg.offset()}", msg.value() or b""
    finally:
        reader.close()


def write_one(config: dict[str, Any], topic: str, writer_id: str, signer: AuditSigner,
              **fields: Any) -> bytes:
    """One analyst-access record in its own transaction; returns the record as written.

    ``transactional.id`` is derived from the writer id, so a second instance of the same
    analyst on the same host fences the first instead of forking the chain; the head is
    read back only after that fencing.
    """
    producer = Producer({**config, "transactional.id": f"fraudscore-audit/{writer_id}",
                         "transaction.timeout.ms": int(TXN_TIMEOUT_S * 1000)})
    producer.init_transactions(TXN_TIMEOUT_S)
    chain = AuditLog(writer_id, signer,
                     recover=lambda: last_record_in_topic(config, topic, writer_id))
    line = chain.record(**fields)
    producer.begin_transaction()
    producer.produce(topic, line, writer_id.encode())
    producer.commit_transaction(TXN_TIMEOUT_S)
    chain.confirm()
    return line


def analyst_writer_id(os_user: str) -> str:
    return f"analyst:{os_user}@{socket.gethostname()}"


def record_access(settings: Settings, *, os_user: str, actor: str, action: str, outcome: str,
                  object_type: str, object_id: str, reason: str, audit_file: Path | None = None,
                  **extra: Any) -> bytes:
    """An analyst access (decrypt, replay, …) in the analyst's own chain: to `audit_file`
    when given, else to the audit topic. Call it *before* showing anything personal, and
    show nothing when it raises. The reason is redacted (PANs, e-mails, IPs)."""
    signer = audit_signer(settings)
    writer = analyst_writer_id(os_user)
    fields = dict(actor=actor, action=action, outcome=outcome, object_type=object_type,
                  object_id=object_id, reason=redact_text(reason)[:1000], **extra)
    if audit_file is not None:
        return write_to_file(audit_file, writer, signer, **fields)
    return write_one(settings.kafka_client_config(), settings.topic_audit, writer, signer,
                     **fields)
