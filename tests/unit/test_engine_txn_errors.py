"""How the confluent engine treats transaction API errors (librdkafka's contract), with a
stand-in producer that raises the errors a slow or wedged broker produces."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from app.engines import confluent
from app.engines.confluent import ConfluentEngine, EngineStats
from app.pipeline import BatchResult, InputRecord


class StubProducer:
    def __init__(self, commit_errors: list[KafkaError], abort_error: KafkaError | None = None,
                 offsets_error: KafkaError | None = None) -> None:
        self.commit_errors = commit_errors
        self.abort_error = abort_error
        self.offsets_error = offsets_error
        self.offsets: list[object] = []
        self.commits = 0
        self.calls: list[str] = []

    undelivered = 0

    def produce(self, topic: str, value: bytes, key: bytes | None = None,
                headers: object = None) -> None:
        self.calls.append("produce")

    def flush(self, timeout: float) -> int:
        self.calls.append("flush")
        return self.undelivered

    def send_offsets_to_transaction(self, offsets: list[object], group_meta: object,
                                    timeout: float) -> None:
        self.calls.append("offsets")
        if self.offsets_error is not None:
            raise KafkaException(self.offsets_error)
        self.offsets.append((offsets, group_meta))

    def commit_transaction(self, timeout: float) -> None:
        self.commits += 1
        self.calls.append("commit")
        if self.commit_errors:
            raise KafkaException(self.commit_errors.pop(0))

    def abort_transaction(self, timeout: float) -> None:
        if self.abort_error is not None:
            raise KafkaException(self.abort_error)


def timed_out() -> KafkaError:
    return KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation to finish",
                      retriable=True)


def test_a_commit_that_times_out_is_resumed_once_then_reported() -> None:
    resumed = StubProducer([timed_out()])
    outputs = [("scores", b"k", b"v", None)] * 2
    confluent._commit(resumed, outputs, ["offsets"], "group")  # type: ignore[arg-type]
    assert resumed.commits == 2
    assert resumed.offsets == [(["offsets"], "group")]  # added once, before the commit
    # offsets first (their request waits out the last commit's markers with a short
    # backoff), then the outputs, delivered before the commit, no call overlapping another
    # (see _commit: a commit stalled 30 s in 2 of 3 end-to-end runs otherwise)
    assert resumed.calls == ["offsets", "produce", "produce", "flush", "commit", "commit"]

    stuck = StubProducer([timed_out(), timed_out(), timed_out()])
    with pytest.raises(KafkaException):
        confluent._commit(stuck, [], [], None)  # type: ignore[arg-type]
    assert stuck.commits == confluent.COMMIT_ATTEMPTS

    fenced = StubProducer([KafkaError(KafkaError._FENCED, "fenced", fatal=True)])
    with pytest.raises(KafkaException):
        confluent._commit(fenced, [], [], None)  # type: ignore[arg-type]
    assert fenced.commits == 1  # not retriable: no resume


def test_outputs_still_undelivered_after_the_flush_leave_the_verdict_to_the_commit(
        caplog: pytest.LogCaptureFixture) -> None:
    """A flush that times out is logged, not fatal by itself: commit_transaction flushes
    again and either completes or raises, and then the batch is read again."""
    slow = StubProducer([timed_out(), timed_out()])
    slow.undelivered = 2
    with pytest.raises(KafkaException):
        confluent._commit(slow, [], [], None)  # type: ignore[arg-type]
    assert slow.calls == ["offsets", "flush", "commit", "commit"]
    assert "2 output(s) not delivered" in caplog.text


def test_offsets_that_cannot_be_added_fail_the_commit_before_it_starts() -> None:
    """send_offsets_to_transaction runs on the commit thread too: its error fails the
    batch's future (the engine aborts and reads the batch again), and nothing commits."""
    stale = StubProducer([], offsets_error=KafkaError(
        KafkaError.ILLEGAL_GENERATION, "stale generation", txn_requires_abort=True))
    with pytest.raises(KafkaException):
        confluent._commit(stale, [("scores", b"k", b"v", None)], [],  # type: ignore[arg-type]
                          None)
    assert stale.commits == 0 and stale.calls == ["offsets"]  # nothing produced either


@pytest.mark.parametrize("abort_error", [
    None,
    KafkaError(KafkaError._CONFLICT, "Conflicting commit_transaction API call is already in "
               "progress"),
    timed_out(),
    KafkaError(KafkaError._FENCED, "fenced", fatal=True),
])
def test_an_abort_that_fails_in_any_way_replaces_the_producer(
        abort_error: KafkaError | None) -> None:
    """A commit still in progress makes abort (and every later begin) fail with _CONFLICT:
    keeping that producer would wedge the worker forever."""
    engine = ConfluentEngine.__new__(ConfluentEngine)
    engine.stats = EngineStats()
    engine._producer = StubProducer([], abort_error)  # type: ignore[assignment]
    restarts: list[bool] = []
    engine._restart_producer = lambda: restarts.append(True)  # type: ignore[method-assign]
    engine._abort()
    assert restarts == ([] if abort_error is None else [True])
    assert engine.stats.aborts == 1


class _AlignConsumer:
    """One assigned partition with data left."""

    def __init__(self) -> None:
        self.paused: list[object] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("tx", 0)]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("tx", 0, 5)]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, 100

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.extend(tps)

    def resume(self, tps: list[TopicPartition]) -> None:
        pass


class _Progress:
    def __init__(self) -> None:
        self.exchanges = 0
        self.others: dict[int, tuple[int, bool]] = {}

    def exchange_progress(self, topic: str, mine: dict[int, tuple[int, bool]]
                          ) -> dict[int, tuple[int, bool]]:
        self.exchanges += 1
        return {**self.others, **mine}


def test_partition_progress_is_exchanged_when_it_matters_not_every_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a batch the engine skips the Redis round trip unless its partitions advanced
    a quarter of the skew bound since the last exchange, time passed, or it holds some;
    a rebalance-time or idle alignment (no batch) always exchanges."""
    skew_us = 3600 * 10**6
    engine = ConfluentEngine.__new__(ConfluentEngine)
    engine.settings = SimpleNamespace(topic_transactions="tx")  # type: ignore[assignment]
    engine._skew_us, engine._event_us, engine._held = skew_us, {}, set()
    engine._aligned_at, engine._aligned_us = 0.0, confluent._UNKNOWN
    engine._consumer = _AlignConsumer()  # type: ignore[assignment]
    progress = _Progress()
    engine.scorer = SimpleNamespace(store=progress)  # type: ignore[assignment]
    clock = [1000.0]
    monkeypatch.setattr(confluent.time, "monotonic", lambda: clock[0])

    def batch(t_us: int) -> BatchResult:
        empty = np.empty(0)
        return BatchResult([], [], empty, empty, [], 0, empty,
                           event_us=np.array([t_us], dtype=np.int64),
                           sources=[InputRecord(b"", None, "tx", 0, 1)])

    t0 = 10**15
    engine._align(batch(t0))
    assert progress.exchanges == 1  # the first batch
    engine._align(batch(t0 + skew_us // 8))
    assert progress.exchanges == 1  # little progress, little time: skipped
    engine._align(batch(t0 + skew_us // 4))
    assert progress.exchanges == 2  # a quarter of the bound since the last exchange
    clock[0] += confluent.ALIGN_EVERY_S
    engine._align(batch(t0 + skew_us // 4 + 1))
    assert progress.exchanges == 3  # time passed: another worker may have fallen behind
    engine._align(None)
    assert progress.exchanges == 4  # no batch: always

    progress.others = {1: (t0 - 2 * skew_us, True)}  # another worker's partition lags
    clock[0] += confluent.ALIGN_EVERY_S
    engine._align(batch(t0 + skew_us // 4 + 2))
    assert engine._held == {("tx", 0)} and progress.exchanges == 5
    engine._align(batch(t0 + skew_us // 4 + 3))
    assert progress.exchanges == 6  # holding: checked every batch, to resume promptly
