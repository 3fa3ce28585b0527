"""`fraudscore simulate --kafka TOPIC --rate R` produces live to the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from app.schemas import Transaction
from tests.integration.conftest import consume_all, create_topics

pytestmark = pytest.mark.integration


def test_simulate_produces_valid_events_at_the_requested_rate(kafka_bootstrap: str,
                                                              unique) -> None:
    topic = unique("transactions")
    create_topics(kafka_bootstrap, [topic])
    env = {**os.environ, "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "app", "simulate", "--customers", "60", "--terminals", "120",
         "--days", "7", "--seed", "4", "--kafka", topic, "--rate", "2000"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    produced = int(result.stderr.split("produced ")[1].split(" ")[0].replace(",", ""))
    assert produced > 500
    assert elapsed >= produced / 2000 * 0.8  # paced, not a burst

    seen = consume_all(kafka_bootstrap, [topic], until=lambda s: len(s[topic]) >= produced)
    messages = seen[topic]
    assert len(messages) == produced
    txs = [Transaction.model_validate_json(m.value()) for m in messages]
    assert all(m.key() == t.customer_id.encode() for m, t in zip(messages, txs, strict=True))
    assert len({t.transaction_id for t in txs}) == produced
