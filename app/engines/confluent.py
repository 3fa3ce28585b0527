"""confluent engine: consume a micro-batch, score it, commit outputs and offsets atomically.

Each batch is one Kafka transaction holding its alerts, scores and dead letters and the
consumer offsets (``send_offsets_to_transaction`` with the group metadata), so a crash
anywhere yields neither loss nor duplicates for ``read_committed`` readers, and a zombie
worker with the same ``transactional.id`` is fenced.

Commits are pipelined: a batch's ``send_offsets_to_transaction``, outputs and
``commit_transaction`` (broker round trips, ~10 ms idle, tens of ms on a loaded machine) run
on a thread while the next batch is consumed and scored; that batch's transaction begins
once the commit is back. When a commit fails, both batches are read again (the feature
store gives redelivered events their first features, so the scores do not change).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from app import metrics
from app.config import Settings
from app.engines.workers import tune_gc
from app.pipeline import BatchResult, InputRecord, Output, Scorer
from features.online import FeatureStoreUnavailable

log = logging.getLogger("fraudscore.engine")

TXN_TIMEOUT_S = 30.0
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 5.0
RESTART_ATTEMPTS = 5
# Back-to-back transactions: until the broker has written the last commit's markers it
# answers the next transaction's AddPartitionsToTxn/AddOffsetsToTxn with
# CONCURRENT_TRANSACTIONS, and librdkafka retries after `retry.backoff.ms` (100 ms by
# default): with nothing between two transactions, send_offsets_to_transaction took 54-65 ms
# on average, against 5-6 ms at 2 ms (scripts/kafka_txn_probe.py). A 2 ms first backoff
# still doubles on each further retry up to `retry.backoff.max.ms` (1 s), so a broker in
# trouble is not hammered. FRAUDSCORE_KAFKA_CONFIG can set either.
TXN_RETRY_BACKOFF_MS = 2
COMMIT_ATTEMPTS = 2  # a commit that times out is resumed once, then aborted
# Partition progress is exchanged (one Redis round trip, and client calls) after a batch
# only when this worker's partitions advanced a quarter of the skew bound in event time since
# the last exchange, or this long passed, or it holds partitions: between two exchanges a
# partition runs at most 1.25x the bound ahead, still far inside the terminal windows' delay.
ALIGN_EVERY_S = 0.25
# see consumer_config; at 5,000 events/s one worker's batch cycle is this wait plus the
# batch's work: 10 ms against 20 took the latency p50/p99 from 25/41 to 17/33 ms (medians
# of 3 alternated pairs); at 5 ms the extra fetches cost the broker more than they saved
FETCH_WAIT_MS = 10
FETCH_MIN_BYTES = 1_000_000
IDLE_PING_S = 5.0  # when no events arrive, check Redis this often so /readyz stays truthful
_UNKNOWN = -(2**62)
_TOPIC, _PARTITION = attrgetter("topic"), attrgetter("partition")


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
    producer_restarts: int = 0
    fail_open: int = 0


@dataclass
class _InFlight:
    """A batch whose transaction is committing on the commit thread."""

    records: list[InputRecord]
    result: BatchResult
    commit: Future[None]


class ConfluentEngine:
    """One worker: a consumer in the group and a transactional producer of its own."""

    def __init__(self, settings: Settings, scorer: Scorer, worker_id: int = 0) -> None:
        self.settings = settings
        self.scorer = scorer
        self.worker_id = worker_id
        self.stats = EngineStats()
        self.ready: tuple[bool, str] = (False, "starting")
        self._backoff = BACKOFF_START_S
        self._last_activity = time.monotonic()
        self._consumer = Consumer({
            **consumer_config(settings, worker_id),
            "stats_cb": metrics.update_lag_from_stats,
        })
        self._producer = self._new_producer()
        self._event_us: dict[tuple[str, int], int] = {}  # latest event time per partition
        self._held: set[tuple[str, int]] = set()  # partitions paused for running ahead
        self._skew_us = int(settings.max_partition_skew_s * 1e6)
        self._aligned_at, self._aligned_us = 0.0, _UNKNOWN  # the last progress exchange
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="fraudscore-commit")
        self._in_flight: _InFlight | None = None
        # the group's generation for send_offsets_to_transaction: asking the client costs a
        # round trip to its main thread (about 1 ms per batch), and it only changes with a
        # rebalance, after which (or after any failed transaction) it is asked again
        self._group_meta: Any = None
        self._drift: metrics.ScoreDrift | None = None

    def _new_producer(self) -> Producer:
        return Producer(producer_config(self.settings, self.worker_id))

    def run(self, stop: threading.Event) -> EngineStats:
        """Process batches until `stop` is set; the in-flight batch finishes first."""
        self._producer.init_transactions(TXN_TIMEOUT_S)
        self.ready = (True, "ok")
        metrics.READY.set(1)
        model = self.scorer.model
        metrics.MODEL_INFO.labels(model.version, model.tree_backend, model.device).set(1)
        self._drift = metrics.ScoreDrift(model.manifest.get("score_quantiles") or [])
        # Labels ride along: a batch's labels update feature state before its transactions
        # are scored, and their offsets commit in the same transaction.
        self._consumer.subscribe(
            [self.settings.topic_transactions, self.settings.topic_labels],
            on_assign=self._on_assign, on_revoke=self._on_rebalance,
        )
        try:
            while not stop.is_set():
                records = self._records(self._next_batch())
                if records:
                    self._process_with_retry(records, stop)
                else:
                    failed = self._settle()
                    if failed:
                        self._retry(stop, failed)
                    elif self._held:
                        self._align(None)  # the slow partitions may have caught up
                    if time.monotonic() - self._last_activity > IDLE_PING_S:
                        self._idle_check()
            self._settle()  # a failed last commit is read again by the next owner
        finally:
            metrics.READY.set(0)
            self.ready = (False, "stopped")
            self._committer.shutdown(wait=True)
            self._consumer.close()
            try:
                self._producer.flush(10)
            except KafkaException as exc:  # fenced or failed at the end: nothing is lost
                log.warning("producer not flushed at shutdown: %s", exc.args[0])
        return self.stats

    def _next_batch(self) -> list[Message]:
        """What has arrived, up to `batch_size`, without waiting for a full batch.

        A blocking ``consume(batch_size, timeout)`` returns only when the batch is full or
        the timeout ends, so under light input every event waited out the timeout and the
        cycle it lengthened (at 5,000 events/s: 20 ms of waiting per batch, then the batch's
        work on top). Taking what the client has already fetched keeps the cycle to the
        work itself; under a backlog the batches fill as before. An idle worker sleeps in
        the client until the first event arrives."""
        size = self.settings.batch_size
        messages = self._consumer.consume(size, 0)
        if not messages:
            messages = self._consumer.consume(1, self.settings.batch_timeout_ms / 1000.0)
            if not messages:
                return messages
            messages += self._consumer.consume(size - 1, 0) if size > 1 else []
        linger = self.settings.batch_linger_ms / 1000.0
        if linger > 0 and len(messages) < size:
            messages += self._consumer.consume(size - len(messages), linger)
        return messages

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take the assignment here, then align it before anything is fetched.

        Aligning later (at the next loop turn) was too late: the consume call that ran this
        callback went on fetching and returned a batch of whichever partition came first.
        A worker restarted 20 times and killed soon after its first output read one batch
        of partition 0 per life and never reached partition 2: partition 0 ended 7 days
        ahead, past the terminal windows' delay, and hundreds of scores came out different.
        librdkafka keeps a partition's pause flag across an eager rebalance, so the
        partitions are resumed first (a held one would otherwise stay paused for good)."""
        self._on_rebalance(consumer, partitions)
        if partitions:
            consumer.assign(partitions)  # the client skips its own assign() after this
            consumer.resume(partitions)
            self._align(None)

    def _on_rebalance(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Cards may have moved to or from another worker: drop the cached card state. The
        batch committing finishes first (if it fails, the next owner reads it again)."""
        self._settle(align=False)
        self._group_meta = None
        self.scorer.store.invalidate()
        self._event_us.clear()
        self._held.clear()  # a new assignment starts unpaused
        self._aligned_at, self._aligned_us = 0.0, _UNKNOWN
        log.info("rebalance: %d partitions; card cache dropped", len(partitions))

    def _records(self, messages: Sequence[Message]) -> list[InputRecord]:
        """The batch's records; consumer errors (rare: they arrive as messages) are raised
        when fatal and logged otherwise. Built in one comprehension with ``tuple.__new__``:
        the named tuple's own constructor takes twice as long (0.16 against 0.07 ms per
        1,000), on every event."""
        if any(msg.error() is not None for msg in messages):
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.fatal():
                        raise KafkaException(err)
                    log.warning("consumer error: %s", err)
            messages = [msg for msg in messages if msg.error() is None]
        new = tuple.__new__
        return [new(InputRecord, (msg.value(), msg.key(), msg.topic(), msg.partition(),
                                  msg.offset())) for msg in messages]

    def _align(self, result: BatchResult | None) -> None:
        """Keep the group's transaction partitions within `max_partition_skew_s` of each
        other in event time: pause this worker's partitions that run ahead of the slowest
        partition with data left (on any worker; progress is shared through Redis), resume
        them when it catches up. Terminal windows end 7 days before the event, so with a
        bounded skew every event is counted before any window needs it, and catching up
        after an outage, a crash or a rebalance scores exactly like a live run."""
        if self._skew_us <= 0:
            return
        if result is not None and len(result.sources):
            self._note_event_times(result.sources, result.event_us)
        topic = self.settings.topic_transactions
        newest = max(self._event_us.values(), default=_UNKNOWN)
        now = time.monotonic()
        if (result is not None and not self._held and now - self._aligned_at < ALIGN_EVERY_S
                and newest - self._aligned_us < self._skew_us // 4):
            return  # nothing held, little progress since the last exchange: skip a round trip
        self._aligned_at, self._aligned_us = now, newest
        mine = [tp for tp in self._consumer.assignment() if tp.topic == topic]
        if not mine:
            return
        positions = {tp.partition: tp.offset for tp in self._consumer.position(mine)}
        report: dict[int, tuple[int, bool]] = {}
        unread: list[int] = []  # mine, with data, not read yet in this assignment
        for tp in mine:
            t = self._event_us.get((topic, tp.partition))
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            pos = positions.get(tp.partition, -1)
            left = (topic, tp.partition) in self._held or high < 0 or pos < 0 or pos < high
            if t is not None:
                report[tp.partition] = (t, left)
            elif left:
                unread.append(tp.partition)
            else:  # nothing to read: it must not hold anyone back
                report[tp.partition] = (0, False)
        try:
            everyone = self.scorer.store.exchange_progress(topic, report)
        except FeatureStoreUnavailable as exc:  # the next batch retries with backoff
            log.warning("feature store unavailable (sharing partition progress): %s", exc)
            self._set_ready(False, f"redis unavailable: {exc}")
            everyone = report
        times = {p: t for p, (t, _) in everyone.items()}
        # a partition of mine with data but not read yet, unknown to the group, is the slowest
        slow = [t for _, (t, left) in everyone.items() if left]
        slow += [_UNKNOWN for p in unread if p not in times]
        ahead: set[tuple[str, int]] = set()
        if slow:
            limit = min(slow) + self._skew_us
            ahead = {(topic, tp.partition) for tp in mine
                     if times.get(tp.partition, _UNKNOWN) > limit}
        pause = [TopicPartition(t, p) for t, p in ahead - self._held]
        resume = [TopicPartition(t, p) for t, p in self._held - ahead]
        if pause or resume:
            log.debug("alignment: slowest %s, mine %s, holding %s", min(slow) if slow else None,
                      {tp.partition: times.get(tp.partition) for tp in mine},
                      sorted(p for _, p in ahead))
        if pause:
            self._consumer.pause(pause)
        if resume:
            self._consumer.resume(resume)
        self._held = ahead

    def _note_event_times(self, sources: Sequence[InputRecord], event_us: np.ndarray) -> None:
        """Each partition's latest event time so far, a batch at a time (numpy per
        partition, not a Python step per event)."""
        topics = np.array(list(map(_TOPIC, sources)), dtype=object)
        parts = np.fromiter(map(_PARTITION, sources), dtype=np.int64, count=len(sources))
        for topic in set(topics.tolist()):
            in_topic = topics == topic
            for p in np.unique(parts[in_topic]).tolist():
                t = int(event_us[in_topic & (parts == p)].max())
                if t > self._event_us.get((topic, p), _UNKNOWN):
                    self._event_us[(topic, p)] = t

    def _idle_check(self) -> None:
        self._last_activity = time.monotonic()
        try:
            self.scorer.store.ping()
        except FeatureStoreUnavailable as exc:
            self._set_ready(False, f"redis unavailable: {exc}")
        else:
            self._set_ready(True, "ok")

    def _set_ready(self, ok: bool, why: str) -> None:
        self.ready = (ok, why)
        metrics.READY.set(1 if ok else 0)

    def _process_with_retry(self, records: list[InputRecord], stop: threading.Event) -> None:
        """Score the batch while the previous one commits, then start its own commit. On
        a Redis outage or an abortable Kafka error, rewind what is not committed, pause
        consumption while backing off (still polling, so the group keeps this worker),
        and let it come back. A fatal producer error (fenced, or the broker lost the
        producer's state) recreates the producer, which aborts whatever it left open."""
        self._last_activity = time.monotonic()
        metrics.BATCH_SIZE.observe(len(records))
        in_flight = 1 if self._in_flight is not None else 0
        try:
            result = self.scorer.process_mixed(records, fail_open=self.settings.fail_open,
                                               in_flight=in_flight)
        except FeatureStoreUnavailable as exc:
            failed = self._settle()
            self.scorer.batch_aborted()  # the audit chain head rolls back with the batch
            log.warning("feature store unavailable, pausing %.1fs: %s", self._backoff, exc)
            self._set_ready(False, f"redis unavailable: {exc}")
            metrics.RETRIES.labels("feature_store").inc()
            self._retry(stop, [*(failed or []), *records])
            return
        failed = self._settle()
        if failed:  # this batch was scored after a batch that did not commit: both again
            self.scorer.batch_aborted()
            self._retry(stop, [*failed, *records])
            return
        with metrics.STAGE_SECONDS.labels("commit").time():
            try:
                commit = self._start_commit(result.outputs, records)
            except KafkaException as exc:
                self._kafka_failed(exc, "starting the commit")
                self._retry(stop, records)
                return
        self._in_flight = _InFlight(records, result, commit)

    def _settle(self, align: bool = True) -> list[InputRecord] | None:
        """Wait for the batch in flight to commit; its records when it did not (the audit
        records of every uncommitted batch are then forgotten), else None."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return None
        with metrics.STAGE_SECONDS.labels("commit").time():  # the wait only, not the overlap
            try:
                in_flight.commit.result()
            except KafkaException as exc:
                self._kafka_failed(exc, "committing")
                return in_flight.records
        self.scorer.batch_committed()
        self._committed(in_flight.records, in_flight.result)
        if self._drift is not None:
            self._drift.observe(in_flight.result.scores)
        if align:
            self._align(in_flight.result)
        return None

    def _kafka_failed(self, exc: KafkaException, step: str) -> None:
        """Abort the transaction after an abortable or retriable error; after anything else
        (fatal, or an error librdkafka does not classify, such as ``_FATAL`` from
        ``produce`` on a producer already fenced) recreate the producer, which aborts
        whatever it left open. The batch is read again either way."""
        self.scorer.batch_aborted()
        self._group_meta = None  # a stale generation may be why
        err = exc.args[0]
        metrics.RETRIES.labels("kafka").inc()
        if not err.fatal() and (err.txn_requires_abort() or err.retriable()):
            log.warning("transaction failed %s (%s); aborting, the batch will be retried",
                        step, err)
            self._abort()
        else:
            log.error("fatal producer error %s (%s); recreating the producer", step, err)
            self._restart_producer()

    def _retry(self, stop: threading.Event, records: Sequence[InputRecord]) -> None:
        self.stats.retries += 1
        self._pause_for(self._backoff, stop, records)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _committed(self, records: list[InputRecord], result: BatchResult) -> None:
        self.stats.batches += 1
        self.stats.events += len(records)
        self.stats.alerts += result.n_alerts
        self.stats.dead += len(result.dead)
        self._backoff = BACKOFF_START_S
        metrics.TRANSACTIONS.labels("commit").inc()
        metrics.observe_batch(result, result.n_labels)
        if result.fail_open:
            self.stats.fail_open += len(result.scores)
            self._set_ready(False, "redis unavailable: scoring fail-open")
        else:
            self._set_ready(True, "ok")

    def _restart_producer(self) -> None:
        """A new producer with the same transactional.id; its init fences the old one."""
        with contextlib.suppress(KafkaException):
            self._producer.flush(1)
        for attempt in range(RESTART_ATTEMPTS):
            self._producer = self._new_producer()
            try:
                self._producer.init_transactions(TXN_TIMEOUT_S)
                break
            except KafkaException as exc:  # e.g. fenced again while initialising
                if attempt == RESTART_ATTEMPTS - 1:
                    raise
                log.warning("producer init failed (%s); trying again", exc.args[0])
                time.sleep(BACKOFF_START_S * 2**attempt)
        self.stats.producer_restarts += 1
        metrics.PRODUCER_RESTARTS.inc()

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
        self._held.clear()
        for (topic, partition), offset in where.items():
            if offset >= 0:
                try:
                    self._consumer.seek(TopicPartition(topic, partition, offset))
                except KafkaException as exc:  # no longer assigned: its new owner re-reads it
                    log.info("seek %s[%d] skipped: %s", topic, partition, exc.args[0])

    def _start_commit(self, outputs: Sequence[Output], records: Sequence[InputRecord]
                      ) -> Future[None]:
        """Outputs and input offsets in one transaction.

        Step 1: begin the transaction.
        Step 2: note the next offset (last processed + 1) of each partition.
        Step 3: on the commit thread (`_commit`): add those offsets with the group metadata,
        produce and deliver every output, commit. Nothing touches the producer until the
        returned future is done, and the next batch is scored meanwhile.
        """
        # Step 1
        self._producer.begin_transaction()
        # Step 2
        next_offsets = {(rec.topic, rec.partition): rec.offset + 1 for rec in records}
        if self._group_meta is None:
            self._group_meta = self._consumer.consumer_group_metadata()
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
        # Step 3
        return self._committer.submit(_commit, self._producer, outputs, offsets,
                                      self._group_meta)

    def _abort(self) -> None:
        """Abort the open transaction. A producer that cannot (fatal error, a commit still
        in progress after its timeout, an abort timing out) is replaced: the new one's init
        fences it and aborts what it left open. Anything else would wedge the worker, every
        later begin failing with the same conflict."""
        try:
            self._producer.abort_transaction(TXN_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("abort failed (%s); recreating the producer", exc.args[0])
            self._restart_producer()
        self.stats.aborts += 1
        metrics.TRANSACTIONS.labels("abort").inc()


def consumer_config(settings: Settings, worker_id: int) -> dict[str, Any]:
    """The worker's consumer: manual offsets (they commit inside the transactions), committed
    input only, eager rebalances, and fetches sized to the worker's batches."""
    extra = settings.kafka_client_config()
    # with the backlog in one partition a fetch holds at most that partition's limit: a
    # minimum above it would make every fetch of a backlog wait out FETCH_WAIT_MS
    per_partition = extra.get("max.partition.fetch.bytes",
                              extra.get("fetch.message.max.bytes", 1_048_576))
    min_bytes = FETCH_MIN_BYTES
    with contextlib.suppress(TypeError, ValueError):  # else librdkafka names the bad value
        min_bytes = max(1, min(FETCH_MIN_BYTES, int(per_partition)))
    return {
        # Fetches: librdkafka's defaults (fetch.min.bytes 1) have the broker answer as soon
        # as any byte arrives, so under a steady trickle of small produce requests the
        # worker fetched up to ~1,000 times a second, far more often than its batches (tens
        # of ms each) need; on a machine shared with the broker those requests took CPU the
        # scoring needed. The broker now answers when 1 MB has accumulated or after
        # FETCH_WAIT_MS, whichever comes first: under a backlog at once, as before.
        # FRAUDSCORE_KAFKA_CONFIG can set either.
        "fetch.wait.max.ms": FETCH_WAIT_MS,
        "fetch.min.bytes": min_bytes,
        **extra,
        "group.id": settings.group_id,
        # static membership: a worker restarted after a crash takes its old place at
        # once instead of waiting for the session timeout and a full rebalance
        "group.instance.id": f"{settings.group_id}-worker-{worker_id}",
        "session.timeout.ms": 10000,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
        # eager rebalances (librdkafka's default, pinned): _on_assign takes the whole
        # assignment with assign(), and every rebalance drops the cached card state
        "partition.assignment.strategy": "range,roundrobin",
        "statistics.interval.ms": 5000,
    }


def producer_config(settings: Settings, worker_id: int) -> dict[str, Any]:
    """The worker's transactional producer: the same id on restart fences any zombie still
    holding an open transaction."""
    return {
        "retry.backoff.ms": TXN_RETRY_BACKOFF_MS,
        **settings.kafka_client_config(),
        "transactional.id": f"{settings.group_id}-worker-{worker_id}",
        "linger.ms": 5,
        "transaction.timeout.ms": int(TXN_TIMEOUT_S * 2000),
    }


def _commit(producer: Producer, outputs: Sequence[Output], offsets: list[TopicPartition],
            group_meta: Any) -> None:
    """Add the batch's input offsets, produce and deliver its outputs, commit; on the commit
    thread, every call in this order.

    The offsets go first. Right after the last commit returns, the broker may not have
    written that commit's markers yet and answers the next transaction's first requests
    with CONCURRENT_TRANSACTIONS: AddOffsetsToTxn is retried after `retry.backoff.ms`
    (TXN_RETRY_BACKOFF_MS), but AddPartitionsToTxn, which the first output of a partition
    sends, after a fixed 20 ms in librdkafka. Offsets first, so the outputs' partitions are
    added once the broker is ready: two workers at 5,000 events/s, 5 alternated pairs,
    latency p99 (median of the pairs) 78.0 -> 60.1 ms, 63.2 -> 50.1 with fresh workers.
    The delivery (flush) comes before the commit, and no call overlaps another: with
    ``send_offsets_to_transaction`` called right after a ``produce`` from another thread,
    a commit stalled with outputs undelivered until its 30 s timeout in 2 of 3 end-to-end
    runs (librdkafka 2.16). ``commit_transaction`` is resumed once after a timeout: a
    retriable error means the commit is still under way, and calling again continues it
    (librdkafka's contract). Any error fails the future; the engine then aborts and reads
    the batch again."""
    producer.send_offsets_to_transaction(offsets, group_meta, TXN_TIMEOUT_S)
    produce = producer.produce
    for topic, key, value, headers in outputs:
        try:
            produce(topic, value, key, headers=headers)
        except BufferError:
            _produce_when_room(producer, topic, key, value, headers)
    left = producer.flush(TXN_TIMEOUT_S)
    if left:
        log.warning("%d output(s) not delivered after %.0fs; the commit waits for them "
                    "(or fails, and the batch is read again)", left, TXN_TIMEOUT_S)
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            producer.commit_transaction(TXN_TIMEOUT_S)
            return
        except KafkaException as exc:
            if not exc.args[0].retriable() or attempt == COMMIT_ATTEMPTS - 1:
                raise
            log.warning("commit not done after %.0fs (%s); resuming it", TXN_TIMEOUT_S,
                        exc.args[0])


def _produce_when_room(producer: Producer, topic: str, key: bytes | None, value: bytes,
                       headers: list[tuple[str, bytes]] | None) -> None:
    while True:
        producer.poll(0.05)  # queue full: let deliveries drain
        try:
            producer.produce(topic, value, key, headers=headers)
            return
        except BufferError:
            continue


def run_worker(settings: Settings, scorer: Scorer, stop: threading.Event,
               worker_id: int = 0) -> EngineStats:
    started = time.perf_counter()
    engine = ConfluentEngine(settings, scorer, worker_id)
    server = None
    if settings.metrics_port:
        try:
            server = metrics.serve(settings.metrics_port + worker_id, lambda: engine.ready)
        except OSError as exc:  # scoring matters more than its dashboard
            log.error("metrics port %d unavailable (%s): no /metrics, /healthz, /readyz",
                      settings.metrics_port + worker_id, exc)
    tune_gc()
    try:
        stats = engine.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    log.info("worker %d stopped after %.1fs: %s", worker_id, time.perf_counter() - started, stats)
    return stats


def serve(model: Path | None, worker_id: int, stop: threading.Event | None = None
          ) -> EngineStats:
    """One worker process end to end: settings from the environment, model, keys, Redis.

    Used in-process for a single worker and as the spawn target of ``--workers N``; a
    worker started without `stop` stops on SIGTERM/SIGINT itself.
    """
    from app import factory
    from app.config import load_settings
    from app.observability import setup_logging

    settings = load_settings()
    setup_logging(settings.log_level)
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())  # type: ignore[union-attr]
    ref = factory.model_ref(settings, model)
    token_key, pii_key = factory.keys_from_settings(settings)
    client = factory.redis_client(settings.redis_url, settings.redis_cluster)
    scorer = factory.build_scorer(settings, client, ref, token_key, pii_key,
                                  follow=factory.model_source(settings, model),
                                  worker_id=worker_id)
    return run_worker(settings, scorer, stop, worker_id)
