"""`fraudscore bench features --json` runs against the real Redis and prints its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_features_prints_the_json_the_issue_asks_for(redis_url: str) -> None:
    env = {**os.environ, "FRAUDSCORE_REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, "-m", "app", "bench", "features", "--customers", "300", "--days", "9",
         "--batch-size", "200", "--alternate", "3", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    for key in ("store_events_per_s", "naive_events_per_s", "ratio", "p50_ms_per_batch",
                "p99_ms_per_batch", "batch_size", "other_client_p99_ms"):
        assert key in doc, key
    assert doc["batch_size"] == 200 and doc["store_events_per_s"] > 0
    assert doc["alternate_batches"] == 3
    assert doc["ratio"] == pytest.approx(doc["store_events_per_s"] / doc["naive_events_per_s"],
                                         rel=0.05)


def test_bench_features_scale_runs_n_owner_processes(redis_url: str) -> None:
    env = {**os.environ, "FRAUDSCORE_REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, "-m", "app", "bench", "features", "--customers", "300", "--days", "9",
         "--batch-size", "200", "--processes", "2", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    one, two = doc["processes"]["1"], doc["processes"]["2"]
    assert len(one["per_process_events_per_s"]) == 1 and len(two["per_process_events_per_s"]) == 2
    # every streamed event is measured once, however the cards are shared out
    assert one["events_measured"] == two["events_measured"] > 0
    assert doc["scaling"]["2"] == pytest.approx(two["events_per_s"] / one["events_per_s"],
                                                abs=0.01)


def test_bench_features_refuses_turns_of_no_batches(redis_url: str) -> None:
    env = {**os.environ, "FRAUDSCORE_REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, "-m", "app", "bench", "features", "--alternate", "0", "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "--alternate must be 1 or more" in result.stderr
