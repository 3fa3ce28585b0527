"""Redis unresponsive for 10 s mid-stream: the scorer pauses, retries, and every event still
ends exactly once, with no crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import redis

from app.schemas import ScoreRecord
from app.sources import transactions_to_json
from models.registry import ModelRef
from tests.integration.conftest import consume_all, create_topics, produce

pytestmark = pytest.mark.integration

N = 4000


def test_redis_outage_pauses_and_loses_nothing(
    kafka_bootstrap: str, redis_url: str, model: ModelRef,
    simulated: tuple[pd.DataFrame, pd.DataFrame], unique, keys_env: dict[str, str],
    tmp_path: Path,
) -> None:
    tx = simulated[0].iloc[:N]
    names = {k: unique(k) for k in ("transactions", "labels", "alerts", "scores", "dlq", "audit")}
    create_topics(kafka_bootstrap, list(names.values()))
    env = {**os.environ, **keys_env,
           "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "FRAUDSCORE_REDIS_URL": redis_url, "FRAUDSCORE_REDIS_NAMESPACE": unique("fs"),
           "FRAUDSCORE_GROUP_ID": unique("scorer"), "FRAUDSCORE_MODEL_DIR": str(model.path),
           "FRAUDSCORE_BATCH_SIZE": "100",
           **{f"FRAUDSCORE_TOPIC_{k.upper()}": v for k, v in names.items()}}
    items = [(c.encode(), v) for c, v in zip(tx["customer_id"], transactions_to_json(tx),
                                             strict=True)]
    produce(kafka_bootstrap, names["transactions"], items[:1000])  # the rest after the outage
    log_path = tmp_path / "scorer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        paused: list[bool] = []

        def pause_then_wait(s: dict) -> bool:
            """Freeze Redis the moment 300 scores are out (mid-stream), then wait for all."""
            if not paused and len(s[names["scores"]]) >= 300:
                redis.Redis.from_url(redis_url).execute_command("CLIENT", "PAUSE", 10_000,
                                                                "ALL")
                paused.append(True)
                produce(kafka_bootstrap, names["transactions"], items[1000:])
            return len(s[names["scores"]]) >= N

        try:
            seen = consume_all(kafka_bootstrap, [names["scores"]], until=pause_then_wait,
                               timeout_s=240)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    logs = log_path.read_text(errors="replace")
    assert code == 0, logs[-3000:]
    assert "feature store unavailable" in logs
    ids = Counter(ScoreRecord.model_validate_json(m.value()).transaction_id
                  for m in seen[names["scores"]])
    assert sum(ids.values()) == N and set(ids) == set(tx["transaction_id"])
