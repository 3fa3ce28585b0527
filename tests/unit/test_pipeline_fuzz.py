"""Nothing is lost and nothing crashes: random valid and odd transactions, over several
batches against one store, each end as exactly one score or one dead letter."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, given, settings

from app.pipeline import InputRecord
from tests.unit.test_pipeline_stale import new_scorer

STAMPS = ["0001-01-01T00:00:00Z", "1677-09-21T00:12:43Z", "1969-12-31T23:59:59.999999Z",
          "2018-04-01T00:00:00+14:00", "2026-03-01T12:00:00Z", "2026-03-01T12:00:00.5-12:00",
          "2026-03-31T23:59:59Z", "2262-04-11T23:47:16Z", "9999-12-31T23:59:59Z"]
ODD = st.text(min_size=1, max_size=12) | st.sampled_from(
    ["\t", "\n", "\u2028", "{x}", "a:b", "\x00", "é€😀", "x" * 128])


@st.composite
def transaction(draw: st.DrawFn, i: int) -> bytes | None:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.none() | st.binary(max_size=30))
    doc = {"transaction_id": draw(st.sampled_from([f"tx-{i}", "tx-dup"]) | ODD),
           "timestamp": draw(st.sampled_from(STAMPS)),
           "customer_id": draw(st.sampled_from(["c1", "c2"]) | ODD),
           "terminal_id": draw(st.sampled_from(["t1", "t2"]) | ODD),
           "amount": draw(st.sampled_from([0.01, 4.99, 1e9, 12.5]) | st.floats()),
           "currency": "EUR"}
    if draw(st.booleans()):
        doc["device_id"] = draw(ODD)
        doc["country"] = draw(st.sampled_from(["BE", "FR", "be", ""]))
    return json.dumps(doc).encode()


@st.composite
def batches(draw: st.DrawFn) -> list[list[bytes | None]]:
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    return [[draw(transaction(i * 100 + j)) for j in range(n)] for i, n in enumerate(sizes)]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_every_event_is_scored_or_dead_lettered_once(stream: list[list[bytes | None]]) -> None:
    scorer = new_scorer(max_future_s=86_400)
    for b, values in enumerate(stream):
        records = [InputRecord(v, b"k", "transactions", b, i) for i, v in enumerate(values)]
        result = scorer.process(records)
        scored = [s.offset for s in result.sources]
        dead = [d.record.offset for d in result.dead]
        assert sorted(scored + dead) == list(range(len(values)))
        assert len(result.transaction_ids) == len(scored) == len(result.scores)
        assert all(d.reason for d in result.dead)
        assert np.isfinite(result.features).all()
