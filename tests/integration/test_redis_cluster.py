"""The service on a real Redis Cluster (three primaries here): the client follows the
server, a namespace keeps its shard count, and the default engine scores every event
exactly once with the cards spread over the primaries. Feature values on a Cluster are
checked against offline by the conformance suite (`tests/conformance`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import redis
from typer.testing import CliRunner

from app.cli import app
from app.config import ConfigError, load_settings
from app.factory import check_redis, redis_client
from app.schemas import ScoreRecord
from app.sources import transactions_to_json
from features.card_arena import CARD_KIND
from models.registry import ModelRef
from tests.integration.conftest import consume_all, produce, scorer_run

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_client_follows_the_server(redis_cluster_url: str, redis_url: str) -> None:
    assert isinstance(redis_client(redis_cluster_url), redis.RedisCluster)
    assert not isinstance(redis_client(redis_url), redis.RedisCluster)
    down = f"redis://127.0.0.1:{_free_port()}/0"
    assert not isinstance(redis_client(down), redis.RedisCluster)  # not up yet: workers wait
    with pytest.raises(ConfigError, match=r"FRAUDSCORE_REDIS_URL.*Cluster not usable"):
        redis_client(down, cluster=True)  # told it is a Cluster: it must answer at start


def test_a_namespace_keeps_its_shard_count(redis_cluster_url: str, unique, model: ModelRef,
                                           keys_env: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_REDIS_URL", redis_cluster_url)
    monkeypatch.setenv("FRAUDSCORE_REDIS_NAMESPACE", unique("ns"))
    check_redis(load_settings())  # created with the Cluster's default, 16
    check_redis(load_settings())
    monkeypatch.setenv("FRAUDSCORE_REDIS_SHARDS", "4")
    with pytest.raises(ConfigError, match=r"FRAUDSCORE_REDIS_SHARDS.*created with 16 shards"):
        check_redis(load_settings())
    for name, value in keys_env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["run", "--model", str(model.path)])
    assert result.exit_code == 2, result.output
    assert "FRAUDSCORE_REDIS_SHARDS" in result.output


def test_confluent_engine_on_a_cluster_scores_every_event_once(
    redis_cluster_url: str, kafka_bootstrap: str, model: ModelRef,
    simulated: tuple[pd.DataFrame, pd.DataFrame], unique, keys_env: dict[str, str],
    tmp_path: Path,
) -> None:
    tx = simulated[0].iloc[:4000]
    items = [(c.encode(), v) for c, v in zip(tx["customer_id"], transactions_to_json(tx),
                                              strict=True)]
    env, topics, namespace = scorer_run(kafka_bootstrap, redis_cluster_url, unique, model,
                                        keys_env)
    env["FRAUDSCORE_BATCH_SIZE"] = "300"
    produce(kafka_bootstrap, topics["transactions"], items)
    log_path = tmp_path / "scorer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            seen = consume_all(kafka_bootstrap, [topics["scores"]],
                               until=lambda s: len(s[topics["scores"]]) >= len(items),
                               timeout_s=180)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
    logs = log_path.read_bytes().decode(errors="replace")
    assert code == 0, logs[-3000:]
    ids = Counter(ScoreRecord.model_validate_json(m.value()).transaction_id
                  for m in seen[topics["scores"]])
    assert set(ids) == set(tx["transaction_id"]) and max(ids.values()) == 1
    assert "CROSSSLOT" not in logs and "unavailable" not in logs, logs[-3000:]
    # the cards are spread over the primaries, each shard's keys in one slot
    cluster = redis.RedisCluster.from_url(redis_cluster_url)
    per_node: Counter[str] = Counter()
    primaries = cluster.get_primaries()
    for node in primaries:
        client = node.redis_connection
        per_node[node.name] = sum(1 for _ in client.scan_iter(
            match=f"{namespace}:{CARD_KIND}:*", count=1000))
    assert sum(per_node.values()) == tx["customer_id"].nunique()
    assert sum(1 for n in per_node.values() if n > 0) == min(len(primaries), 3), per_node
