"""How the confluent engine treats transaction API errors (librdkafka's contract), with a
stand-in producer that raises the errors a slow or wedged broker produces."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from app.engines import confluent
from app.engines.confluent import ConfluentEngine, EngineStats


class StubProducer:
    def __init__(self, commit_errors: list[KafkaError], abort_error: KafkaError | None = None
                 ) -> None:
        self.commit_errors = commit_errors
        self.abort_error = abort_error
        self.commits = 0

    def commit_transaction(self, timeout: float) -> None:
        self.commits += 1
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
    confluent._commit(resumed)  # type: ignore[arg-type]
    assert resumed.commits == 2

    stuck = StubProducer([timed_out(), timed_out(), timed_out()])
    with pytest.raises(KafkaException):
        confluent._commit(stuck)  # type: ignore[arg-type]
    assert stuck.commits == confluent.COMMIT_ATTEMPTS

    fenced = StubProducer([KafkaError(KafkaError._FENCED, "fenced", fatal=True)])
    with pytest.raises(KafkaException):
        confluent._commit(fenced)  # type: ignore[arg-type]
    assert fenced.commits == 1  # not retriable: no resume


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
