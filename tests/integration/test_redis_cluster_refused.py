"""A Redis Cluster node is refused at start with a clear error, not retried forever.

Each batch's read (one MULTI) and write (one script) span many cards' slots, which a cluster
refuses with CROSSSLOT: a worker pointed at one would pause and retry without end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from app.cli import app
from app.config import ConfigError
from app.factory import refuse_cluster
from app.simulator import simulate
from features.offline import events_from_frame
from features.online import FeatureStoreUnavailable, RedisFeatureStore
from models.registry import ModelRef


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[str]:
    """One cluster-enabled redis-server (no slots assigned: enough to be recognised)."""
    if shutil.which("redis-server") is None:  # the Docker way: a container in cluster mode
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine").with_command(
                "redis-server --cluster-enabled yes") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled",
         "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cluster_node_is_refused(cluster_node: str, redis_url: str) -> None:
    with pytest.raises(ConfigError, match="Redis Cluster node"):
        refuse_cluster(cluster_node)
    refuse_cluster(redis_url)  # a plain Redis passes
    refuse_cluster(f"redis://127.0.0.1:{_free_port()}/0")  # not up yet: the workers wait


def test_run_exits_2_naming_the_setting(cluster_node: str, model: ModelRef,
                                        keys_env: dict[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in keys_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FRAUDSCORE_REDIS_URL", cluster_node)
    result = CliRunner().invoke(app, ["run", "--model", str(model.path)])
    assert result.exit_code == 2, result.output
    assert "FRAUDSCORE_REDIS_URL" in result.output and "Cluster" in result.output


def test_without_the_check_the_store_fails_on_every_batch(cluster_node: str) -> None:
    """What the check prevents: the store's MULTI is refused (no slots served here; on a
    working cluster CROSSSLOT), so the engine would pause and retry forever."""
    tx, _ = simulate(customers=20, terminals=40, days=2, seed=1)
    store = RedisFeatureStore(redis.Redis.from_url(cluster_node), namespace="c")
    with pytest.raises(FeatureStoreUnavailable, match="reading feature state"):
        store.update_many(events_from_frame(tx))
