"""Events too late to apply exactly once are dead-lettered with the reason; the rest of
their batch is scored (the store refuses the batch, the scorer retries without them)."""

from __future__ import annotations

import json

import fakeredis
import numpy as np

from app.pipeline import STAGE_FEATURES, InputRecord, Scorer, Topics
from app.security.envelope import FieldCipher
from app.security.tokens import Tokenizer, random_key
from features.definitions import FEATURE_NAMES
from features.online import RedisFeatureStore
from models.policy import Policy
from models.runtime import Scores


class StubModel:
    version = "stub-1"
    non_finite_rows = 0

    def score(self, features: np.ndarray) -> Scores:
        fraud = np.full(len(features), 0.01)
        return Scores(fraud, np.zeros(len(features)), fraud)

    def contributions_many(self, features: np.ndarray) -> np.ndarray:
        return np.zeros_like(features)


def new_scorer(max_future_s: float = 0.0) -> Scorer:
    """A scorer over an in-process store and a stub model."""
    return Scorer(store=RedisFeatureStore(fakeredis.FakeRedis()),
                  model=StubModel(),  # type: ignore[arg-type]
                  tokenizer=Tokenizer(random_key()),
                  cipher=FieldCipher({"k": random_key()}, "k"), policy=Policy(0.5, 0.9),
                  topics=Topics(), max_future_s=max_future_s)


def record(i: int, day: int, customer: str) -> InputRecord:
    doc = {"transaction_id": f"t{i}", "timestamp": f"2026-{3 + day // 28:02d}-"
           f"{1 + day % 28:02d}T12:00:00Z", "customer_id": customer, "terminal_id": "T1",
           "amount": 12.5, "currency": "EUR"}
    return InputRecord(json.dumps(doc).encode(), customer.encode(), "transactions", 0, i)


def test_events_older_than_the_cards_kept_history_go_to_the_dlq() -> None:
    scorer = new_scorer()
    first = scorer.process([record(0, 50, "alice")])  # alice's newest event: day 50
    assert len(first.transaction_ids) == 1
    result = scorer.process([record(1, 51, "bob"), record(2, 10, "alice"),  # 40 days late
                             record(3, 30, "alice")])  # 20 days late: fine
    assert result.transaction_ids == ["t1", "t3"]
    assert [(d.record.offset, d.stage) for d in result.dead] == [(2, STAGE_FEATURES)]
    assert "days before its card's newest event" in result.dead[0].reason
    dlq = [o for o in result.outputs if o.topic == Topics().dlq]
    assert len(dlq) == 1 and dict(dlq[0].headers or [])["error.stage"] == b"features"
    count_30d = result.features[1, FEATURE_NAMES.index("card_count_30d")]
    assert count_30d == 1.0  # the late event (day 30) sees none of alice's (day 50) events


def test_a_late_event_repeated_in_its_batch_goes_to_the_dlq_with_its_repeat() -> None:
    """Found by the fuzz test: the repeat was left in the batch, became new on the retry
    and was refused again, uncaught."""
    scorer = new_scorer()
    scorer.process([record(0, 50, "alice")])
    late = record(1, 10, "alice")
    again = InputRecord(late.value, late.key, "transactions", 0, 3)
    result = scorer.process([late, record(2, 51, "bob"), again])
    assert result.transaction_ids == ["t2"]
    assert [d.record.offset for d in result.dead] == [1, 3]
    assert all("days before its card's newest event" in d.reason for d in result.dead)


def test_an_event_from_year_one_among_hundreds_of_cards_is_scored() -> None:
    """A valid but absurd timestamp (0001-01-01) of a new card: applied like any event of a
    card with no history, without breaking its batch (int64 keys over 2,000 years)."""
    scorer = new_scorer()
    records = [record(i, 5, f"c{i}") for i in range(300)]
    doc = json.loads(records[7].value)
    records[7] = InputRecord(json.dumps({**doc, "timestamp": "0001-01-01T00:00:00Z"}).encode(),
                             b"c7", "transactions", 0, 7)
    result = scorer.process(records)
    assert len(result.transaction_ids) == 300 and not result.dead
    assert (result.features[:, FEATURE_NAMES.index("card_count_30d")] == 1.0).all()


def test_a_sub_cent_amount_has_a_finite_ratio() -> None:
    """Card sums run in whole cents; 0.001 (a 3-decimal currency) must not divide by 0."""
    scorer = new_scorer()
    doc = json.loads(record(0, 5, "kw").value)
    result = scorer.process([InputRecord(json.dumps({**doc, "amount": 0.001}).encode(), b"kw",
                                         "transactions", 0, 0)])
    assert result.features[0, FEATURE_NAMES.index("card_amount_ratio_30d")] == 1.0
