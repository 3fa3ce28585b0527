"""confluent engine: consume a micro-batch, score it, commit outputs and offsets atomically.

Each batch is one Kafka transaction holding its alerts, scores and dead letters and the
consumer offsets (``send_offsets_to_transaction`` with the group metadata), so a crash
anywhere yields neither loss nor duplicates for ``read_committed`` readers, and a zombie
worker with the same ``transactional.id`` is fenced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from app.config import Settings
from app.pipeline import InputRecord, Output, Scorer
from features.online import FeatureStoreUnavailable

log = logging.getLogger("fraudscore.engine")

TXN_TIMEOUT_S = 30.0
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0


def ensure_topics(settings: Settings, partitions: int = 3) -> None:
    """Create the service's topics when missing (idempotent; replication follows the broker)."""
    admin = AdminClient(settings.kafka_client_config())
    wanted = [settings.topic_transactions, settings.topic_labels, settings.topic_alerts,
              settings.topic_scores, settings.topic_dlq, settings.topic_audit]
    existing = admin.list_topics(timeout=10).topics
    missing = [NewTopic(t, num_partitions=partitions) for t in wanted if t not in existing]
    if not missing:
        return
    for topic, future in admin.create_topics(missing, operation_timeout=10).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            log.debug("topic %s already exists", topic)


@dataclass
class EngineStats:
    batches: int = 0
    events: int = 0
    alerts: int = 0
    dead: int = 0
    aborts: int = 0
    retries: int = 0


class ConfluentEngine:
    """One worker: a consumer in the group and a transactional producer of its own."""

    def __init__(self, settings: Settings, scorer: Scorer, worker_id: int = 0) -> None:
        self.settings = settings
        self.scorer = scorer
        self.stats = EngineStats()
        self._backoff = BACKOFF_START_S
        base = settings.kafka_client_config()
        self._consumer = Consumer({
            **base,
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        })
        self._producer = Producer({
            **base,
            "transactional.id": f"{settings.group_id}-worker-{worker_id}",
            "linger.ms": 5,
            "transaction.timeout.ms": int(TXN_TIMEOUT_S * 2000),
        })

    def run(self, stop: threading.Event) -> EngineStats:
        """Process batches until `stop` is set; the in-flight batch finishes first."""
        self._producer.init_transactions(TXN_TIMEOUT_S)
        # Labels ride along: a batch's labels update feature state before its transactions
        # are scored, and their offsets commit in the same transaction.
        self._consumer.subscribe(
            [self.settings.topic_transactions, self.settings.topic_labels],
            on_assign=self._on_rebalance, on_revoke=self._on_rebalance,
        )
        timeout = self.settings.batch_timeout_ms / 1000.0
        try:
            while not stop.is_set():
                messages = self._consumer.consume(self.settings.batch_size, timeout)
                records = self._records(messages)
                if records:
                    self._process_with_retry(records, stop)
        finally:
            self._consumer.close()
            self._producer.flush(10)
        return self.stats

    def _on_rebalance(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Cards may have moved to or from another worker: drop the cached card state."""
        self.scorer.store.invalidate()
        log.info("rebalance: %d partitions; card cache dropped", len(partitions))

    def _records(self, messages: Sequence[Message]) -> list[InputRecord]:
        records = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                log.warning("consumer error: %s", err)
                continue
            records.append(InputRecord(msg.value(), msg.key(), msg.topic(), msg.partition(),
                                       msg.offset()))
        return records

    def _process_with_retry(self, records: list[InputRecord], stop: threading.Event) -> None:
        """Score and commit; on a Redis outage or an abortable Kafka error, rewind the batch,
        pause consumption while backing off (still polling, so the group keeps this worker),
        and let the batch come back."""
        try:
            result = self.scorer.process_mixed(records)
            self._commit(result.outputs, records)
        except FeatureStoreUnavailable as exc:
            log.warning("feature store unavailable, pausing %.1fs: %s", self._backoff, exc)
        except KafkaException as exc:
            err = exc.args[0]
            if not err.txn_requires_abort() and not err.retriable():
                raise
            log.warning("transaction failed (%s); aborting, the batch will be retried", err)
            self._abort()
        else:
            self.stats.batches += 1
            self.stats.events += len(records)
            self.stats.alerts += result.n_alerts
            self.stats.dead += len(result.dead)
            self._backoff = BACKOFF_START_S
            return
        self.stats.retries += 1
        self._pause_for(self._backoff, stop, records)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _pause_for(self, seconds: float, stop: threading.Event,
                   batch: Sequence[InputRecord]) -> None:
        """Back off without leaving the group: pause every partition, keep polling, then
        resume each partition where it stood (its batch start for the failed batch's)."""
        assigned = self._consumer.assignment()
        where = {(tp.topic, tp.partition): tp.offset for tp in self._consumer.position(assigned)}
        first: dict[tuple[str, int], int] = {}
        for rec in batch:
            first.setdefault((rec.topic, rec.partition), rec.offset)
        where.update(first)  # the failed batch is read again from its start
        self._consumer.pause(assigned)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            late = self._consumer.consume(100, min(0.1, max(deadline - time.monotonic(), 0.0)))
            if late:
                log.info("%d messages arrived while paused; they will be read again", len(late))
        self._consumer.resume(assigned)
        for (topic, partition), offset in where.items():
            if offset >= 0:
                try:
                    self._consumer.seek(TopicPartition(topic, partition, offset))
                except KafkaException as exc:  # no longer assigned: its new owner re-reads it
                    log.info("seek %s[%d] skipped: %s", topic, partition, exc.args[0])

    def _commit(self, outputs: Sequence[Output], records: Sequence[InputRecord]) -> None:
        """Outputs and input offsets in one transaction.

        Step 1: begin the transaction.
        Step 2: produce every output of the batch.
        Step 3: add the next offset (last processed + 1) of each partition.
        Step 4: commit; librdkafka flushes the outputs first.
        """
        # Step 1
        self._producer.begin_transaction()
        # Step 2
        for out in outputs:
            self._produce(out)
        # Step 3
        next_offsets: dict[tuple[str, int], int] = {}
        for rec in records:
            next_offsets[(rec.topic, rec.partition)] = rec.offset + 1
        self._producer.send_offsets_to_transaction(
            [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()],
            self._consumer.consumer_group_metadata(),
            TXN_TIMEOUT_S,
        )
        # Step 4
        self._producer.commit_transaction(TXN_TIMEOUT_S)

    def _produce(self, out: Output) -> None:
        while True:
            try:
                self._producer.produce(out.topic, out.value, out.key, headers=out.headers)
                return
            except BufferError:
                self._producer.poll(0.05)  # queue full: let deliveries drain

    def _abort(self) -> None:
        try:
            self._producer.abort_transaction(TXN_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("abort failed: %s", exc.args[0])
        self.stats.aborts += 1


def run_worker(settings: Settings, scorer: Scorer, stop: threading.Event,
               worker_id: int = 0) -> EngineStats:
    started = time.perf_counter()
    stats = ConfluentEngine(settings, scorer, worker_id).run(stop)
    log.info("worker %d stopped after %.1fs: %s", worker_id, time.perf_counter() - started, stats)
    return stats
