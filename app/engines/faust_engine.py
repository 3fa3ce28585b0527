"""faust engine: the same pipeline as a faust-streaming agent, at-least-once.

Every output of a micro-batch is acknowledged by the broker (``acks=all``) before the
batch's events are acked to faust, and offsets are committed only for acked events, right
after each batch: an event is never lost, and is scored twice only when a worker dies (or a
commit fails) between its outputs and its offset commit. A redelivered event gets the same
features, score, decision and alert id as the first time (idempotent feature state), so
readers can drop repeats by ``transaction_id`` / ``alert_id``.

Why not exactly-once: faust-streaming's ``processing_guarantee="exactly_once"`` (one
transactional producer per input partition) was tried on the local Kafka 3.9 and failed
both ways. Its ``Topic.send`` puts an output into the transaction of the *output*
partition's producer, not the input's, and ``kill -9`` then duplicated scores (17 of
12,000); routing outputs to the input partition's producer fixed that, but a worker joining
and leaving the group left the other worker with a stale, fenced producer: ProducerFenced,
crash (faust-streaming issue #323). The consumer then also reads ``read_uncommitted`` (faust
sets ``read_committed`` only in that mode): events of an aborted upstream transaction are
scored. Use the confluent engine where exactly-once matters.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import ssl
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.exceptions import ProducerSendError
from faust.types import EventT, StreamT
from mode import CrashingSupervisor

from app import metrics
from app.config import ConfigError, Settings
from app.engines.confluent import BACKOFF_MAX_S, BACKOFF_START_S, IDLE_PING_S, EngineStats
from app.engines.workers import tune_gc
from app.pipeline import BatchResult, InputRecord, Scorer
from features.online import FeatureStoreUnavailable

log = logging.getLogger("fraudscore.engine.faust")

STOP_TIMEOUT_S = 60.0
REVOKE_WAIT_S = 8.0  # under broker_session_timeout: a stuck batch must not stall the group
_FAUST_LOGGERS = ("faust", "mode", "aiokafka")


class FaustEngineError(RuntimeError):
    """The worker cannot go on (an output was not delivered, the app crashed): restart it."""


def broker_credentials(settings: Settings) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """The librdkafka pass-through keys that aiokafka can honour, as faust credentials;
    anything else stops the worker at start rather than being silently ignored."""
    config = dict(settings.kafka_config)
    protocol = str(config.pop("security.protocol", "PLAINTEXT")).upper()
    mechanism = str(config.pop("sasl.mechanism", "PLAIN")).upper()
    username, password = config.pop("sasl.username", None), config.pop("sasl.password", None)
    ca = config.pop("ssl.ca.location", None)
    if config:
        raise ConfigError("invalid configuration: FRAUDSCORE_KAFKA_CONFIG: the faust engine "
                          f"does not support {', '.join(sorted(config))} (use --engine confluent)")
    context = ssl.create_default_context(cafile=str(ca) if ca else None) \
        if protocol.endswith("SSL") else None
    if protocol.startswith("SASL_"):
        return faust.SASLCredentials(username=str(username or ""), password=str(password or ""),
                                     ssl_context=context, mechanism=mechanism)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol != "PLAINTEXT":
        raise ConfigError(f"invalid configuration: FRAUDSCORE_KAFKA_CONFIG: "
                          f"security.protocol {protocol!r} is unknown")
    return None


class FaustEngine:
    """One faust worker: an agent over the transactions and labels topics."""

    def __init__(self, settings: Settings, scorer: Scorer, worker_id: int = 0) -> None:
        self.settings = settings
        self.scorer = scorer
        self.worker_id = worker_id
        self.stats = EngineStats()
        self.ready: tuple[bool, str] = (False, "starting")
        self._backoff = BACKOFF_START_S
        self._last_activity = time.monotonic()
        self._invalidate = False
        self._assigned: set[Any] | None = None  # None until the first assignment
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        # the scorer blocks (Redis, ONNX): run it off the event loop so aiokafka keeps
        # fetching and heartbeating meanwhile; one thread keeps batches in order
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fraudscore-score")
        self._batch_lock = asyncio.Lock()  # held while a batch is in flight
        # faust writes a folder for its tables even with the memory store (in the working
        # directory by default, left behind); ours lives in the temp folder and goes at stop
        self._datadir = Path(tempfile.mkdtemp(prefix="fraudscore-faust-"))
        self.app = self._new_app()

    def _new_app(self) -> faust.App:
        s = self.settings
        app = faust.App(
            # the app id is the consumer group: the confluent engine's, so a switch of
            # engines resumes from the committed offsets
            s.group_id,
            broker=[f"kafka://{host.strip()}" for host in s.kafka_bootstrap_servers.split(",")],
            broker_credentials=broker_credentials(s),
            processing_guarantee="at_least_once",  # see the module docstring
            key_serializer="raw",
            value_serializer="raw",
            consumer_auto_offset_reset="earliest",
            web_enabled=False,  # our own /metrics, /healthz, /readyz instead (metrics_port)
            topic_disable_leader=True,  # no leader-only timers: no <id>-__assignor-__leader
            autodiscover=False,
            store="memory://",
            datadir=str(self._datadir),
            # an unexpected error in the agent stops the worker instead of restarting the
            # agent with events left unacked in the middle of its partitions
            agent_supervisor=CrashingSupervisor,
            # faust would wait, at a rebalance and at shutdown, for every event handed to
            # the agent to be acked, and waits forever for those a stopping agent leaves
            # unacked (SIGTERM with a batch forming): _on_revoked does that job instead
            stream_wait_empty=False,
            stream_buffer_maxsize=max(4 * s.batch_size, 4096),
            # as the confluent engine: a dead worker's partitions move on within seconds
            broker_session_timeout=10.0,
            producer_linger_ms=5,
            producer_acks=-1,  # all in-sync replicas: "delivered" means durable
        )
        app.in_worker = True  # a worker, started without the `faust worker` command
        topic = app.topic(s.topic_transactions, s.topic_labels,
                          key_serializer="raw", value_serializer="raw")
        app.agent(topic, name=f"{s.group_id}-scorer")(self._agent)
        app.on_partitions_revoked.connect(self._on_revoked)
        app.on_partitions_assigned.connect(self._on_assigned)
        return app

    async def _on_revoked(self, sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        """Before partitions move: the batch in flight finishes and its offsets are
        committed, and events of the revoked partitions not yet scored will be dropped by
        the agent (unacked: their next owner reads them), so two workers never score the
        same card at once."""
        if self._assigned is not None:
            self._assigned -= set(revoked)
        try:
            await asyncio.wait_for(self._batch_lock.acquire(), REVOKE_WAIT_S)
        except TimeoutError:
            log.warning("rebalance: the batch in flight did not finish within %.0fs; its "
                        "events may be scored again by their next owner", REVOKE_WAIT_S)
            return
        try:
            await self._commit()
        finally:
            self._batch_lock.release()

    async def _on_assigned(self, sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        """Cards may have moved to or from another worker: drop the card cache (before the
        next batch is scored, never under a running one)."""
        self._assigned = set(assigned)
        self._invalidate = True
        log.info("rebalance: %d partitions; card cache will be dropped", len(assigned))

    async def run(self, stop: threading.Event) -> EngineStats:
        """Run the app until `stop`; the batch in flight finishes (or, failing, is left
        unacked for the next owner) before the app stops."""
        metrics.MODEL_INFO.labels(self.scorer.model.version, self.scorer.model.tree_backend,
                                  self.scorer.model.device).set(1)
        await self.app.start()
        self._set_ready(True, "ok")
        try:
            while not (stop.is_set() or self._stop.is_set() or self.app.crashed):
                await asyncio.sleep(0.1)
                if time.monotonic() - self._last_activity > IDLE_PING_S:
                    await self._idle_check()
        finally:
            self._stop.set()  # a failing batch stops retrying
            self._set_ready(False, "stopped")
            async with self._batch_lock:
                pass  # the batch in flight finishes; none starts after _stop
            try:
                await asyncio.wait_for(self.app.stop(), STOP_TIMEOUT_S)
            finally:
                self._pool.shutdown(wait=True)
                shutil.rmtree(self._datadir, ignore_errors=True)
        reason = self._fatal or self.app.crash_reason
        if reason is not None:
            raise FaustEngineError(f"worker stopped on an error: {reason!r}") from reason
        return self.stats

    async def _agent(self, stream: StreamT) -> None:
        """Micro-batches as in the confluent engine: `batch_size` events or
        `batch_timeout_ms`, whichever first. ``noack_take`` is ``stream.take`` yielding the
        events (their offsets) and leaving the ack to us: ``take`` acks a batch as soon as
        the loop moves on, failed or not."""
        within = self.settings.batch_timeout_ms / 1000.0
        async for batch in stream.noack_take(self.settings.batch_size, within=within):
            async with self._batch_lock:
                if self._stop.is_set():
                    return  # stopping: unacked events are read again by the next owner
                events: Sequence[EventT] = self._owned(batch)
                if events and not await self._process(stream, events):
                    return

    def _owned(self, batch: Sequence[EventT]) -> Sequence[EventT]:
        """The batch less events of partitions revoked since they were fetched."""
        if self._assigned is None:
            return batch
        owned = [e for e in batch if e.message.tp in self._assigned]
        if len(owned) < len(batch):
            log.info("rebalance: %d events of revoked partitions left to their next owner",
                     len(batch) - len(owned))
        return owned

    async def _process(self, stream: StreamT, events: Sequence[EventT]) -> bool:
        """Score, deliver, ack, commit. A Redis outage retries the same batch with backoff
        (nothing sent, nothing acked); an output not delivered stops the worker with an
        error, since acking past it would lose it. False: the agent stops."""
        records = [InputRecord(m.value, m.key, m.topic, m.partition, m.offset)
                   for m in (e.message for e in events)]
        self._last_activity = time.monotonic()
        metrics.BATCH_SIZE.observe(len(records))
        result = await self._score_with_retry(records)
        if result is None:
            return False
        try:
            with metrics.STAGE_SECONDS.labels("commit").time():
                await self._deliver(result)
        except (ProducerSendError, KafkaError, OSError) as exc:
            self.scorer.batch_aborted()
            log.error("outputs not delivered (%r); stopping the worker", exc)
            self._fatal = exc
            self._stop.set()
            return False
        self.scorer.batch_committed()  # delivered: the audit records are durable
        for event in events:
            await stream.ack(event)
        await self._commit()
        self._committed(records, result)
        return True

    async def _score_with_retry(self, records: list[InputRecord]) -> BatchResult | None:
        """The batch's result, or None when the worker stops while Redis is down."""
        loop = asyncio.get_running_loop()
        while True:
            if self._invalidate:
                self._invalidate = False
                self.scorer.store.invalidate()
            score = partial(self.scorer.process_mixed, records, fail_open=self.settings.fail_open)
            try:
                return await loop.run_in_executor(self._pool, score)
            except FeatureStoreUnavailable as exc:
                self.scorer.batch_aborted()  # the audit chain head rolls back with the batch
                self._set_ready(False, f"redis unavailable: {exc}")
                metrics.RETRIES.labels("feature_store").inc()
                self.stats.retries += 1
                log.warning("feature store unavailable, retrying in %.1fs: %s", self._backoff,
                            exc)
                if await self._stopped_within(self._backoff):
                    return None
                self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    async def _deliver(self, result: BatchResult) -> None:
        """Send every output and wait until the broker has each one (faust's producer
        uses acks=all); raises if any was not delivered."""
        producer = self.app.producer
        pending = [await producer.send(out.topic, out.key, out.value, None, None, out.headers)
                   for out in result.outputs]
        await asyncio.gather(*pending)

    async def _commit(self) -> None:
        """Commit the acked offsets now rather than on faust's timer: faust forgets acks of
        revoked partitions at a rebalance, so fewer pending acks mean fewer repeats. A
        failed commit only means the batch may be read again."""
        try:
            await self.app.consumer.commit()
        except (KafkaError, OSError) as exc:
            log.warning("offset commit failed (%r); the batch may be scored again", exc)

    async def _stopped_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stop.is_set():
                return True
            await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        return self._stop.is_set()

    def _committed(self, records: list[InputRecord], result: BatchResult) -> None:
        self.stats.batches += 1
        self.stats.events += len(records)
        self.stats.alerts += result.n_alerts
        self.stats.dead += len(result.dead)
        self._backoff = BACKOFF_START_S
        n_labels = sum(1 for r in records if r.topic == self.settings.topic_labels)
        metrics.observe_batch(result, n_labels)
        if result.fail_open:
            self.stats.fail_open += len(result.scores)
            self._set_ready(False, "redis unavailable: scoring fail-open")
        else:
            self._set_ready(True, "ok")

    async def _idle_check(self) -> None:
        self._last_activity = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self.scorer.store.ping)
        except FeatureStoreUnavailable as exc:
            self._set_ready(False, f"redis unavailable: {exc}")
        else:
            self._set_ready(True, "ok")

    def _set_ready(self, ok: bool, why: str) -> None:
        self.ready = (ok, why)
        metrics.READY.set(1 if ok else 0)


def run_worker(settings: Settings, scorer: Scorer, stop: threading.Event,
               worker_id: int = 0) -> EngineStats:
    """Run one faust worker in this thread's own event loop until `stop`."""
    started = time.perf_counter()
    quiet = max(logging.getLogger().level, logging.WARNING)
    for name in _FAUST_LOGGERS:  # their INFO lines are rebalance chatter
        logging.getLogger(name).setLevel(quiet)
    engine = FaustEngine(settings, scorer, worker_id)
    server = None
    if settings.metrics_port:
        try:
            server = metrics.serve(settings.metrics_port + worker_id, lambda: engine.ready)
        except OSError as exc:  # scoring matters more than its dashboard
            log.error("metrics port %d unavailable (%s): no /metrics, /healthz, /readyz",
                      settings.metrics_port + worker_id, exc)
    tune_gc()
    try:
        stats = asyncio.run(engine.run(stop))
    finally:
        if server is not None:
            server.shutdown()
    log.info("worker %d stopped after %.1fs: %s", worker_id, time.perf_counter() - started, stats)
    return stats


def serve(model: Path | None, worker_id: int, stop: threading.Event | None = None
          ) -> EngineStats:
    """One faust worker process end to end (settings from the environment); the spawn
    target of ``--engine faust --workers N``. Without `stop`, SIGTERM/SIGINT stop it."""
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
