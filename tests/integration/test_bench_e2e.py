"""`fraudscore bench e2e --json`, small: real workers on the real stack print the JSON.

A smoke run (20,000 events, short latency window, the default engine and the naive loop)
so it stays within a few minutes on two cores; `faust` and `confluent_2w` run in the full
benchmark only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_e2e_prints_throughput_latency_and_profile(kafka_bootstrap: str,
                                                         redis_url: str) -> None:
    env = {**os.environ, "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "FRAUDSCORE_REDIS_URL": redis_url}
    result = subprocess.run(
        [sys.executable, "-m", "app", "bench", "e2e", "--events", "20000", "--rate", "1000",
         "--latency-seconds", "4", "--warmup-seconds", "2", "--max-seconds", "20",
         "--variants", "confluent_1w,naive", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    for variant in ("confluent_1w", "naive"):
        got = doc[variant]
        assert got["status"] == "ok", got
        assert got["events_per_s"] > 0 and got["events_measured"] > 0
        assert 0 < got["latency_p50_ms"] <= got["latency_p99_ms"]
        assert got["latency_events"] >= 1000 * 4 * 0.9
    # the default engine drains 20,000 events in time: its headline latency is the steady
    # state of those workers, and a restart is measured apart
    steady = doc["confluent_1w"]
    assert steady["drained"] and steady["latency_workers"] == "warm"
    # split at the score's Kafka timestamp: both parts measured, each within the whole
    for part in ("to_emit", "emit_to_visible"):
        assert 0 < steady[f"{part}_p50_ms"] <= steady[f"{part}_p99_ms"]
        assert steady[f"{part}_p50_ms"] < steady["latency_p99_ms"]
    fresh = steady["fresh_workers"]
    assert fresh["latency_workers"] == "fresh"
    assert 0 < fresh["latency_p50_ms"] <= fresh["latency_p99_ms"]
    assert fresh["latency_events"] >= 1000 * 4 * 0.9
    profile = doc["profile"]
    assert profile["batches"] > 0
    assert {"decode", "features", "score", "commit"} <= profile["stage_ms_per_batch"].keys()
    for phase in ("latency_phase", "fresh_workers_latency_phase"):
        assert profile[phase]["batches"] > 0
    assert doc["targets"]["confluent_variant"] == "confluent_1w"
    assert doc["config"]["events"] == 20000
    # the broker warm-up (default 300,000 events, capped at --events) ran first, unmeasured
    assert doc["config"]["broker_warmup"]["events"] == 20000
    assert doc["config"]["broker_warmup"]["drained"]
