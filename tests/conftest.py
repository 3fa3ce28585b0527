"""Real services for the integration tests, one per test session.

Order of preference: ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` from the environment (the
local stack: ``eval "$(scripts/stack.sh up)"``), else testcontainers when a Docker engine
answers, else the test fails and says how to start the stack. Unit tests need none of it.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOW_TO_START = (
    "no Kafka/Redis for integration tests: start the local stack with\n"
    '    eval "$(scripts/stack.sh up)"\n'
    "(or run `make test`, which does it), or make a Docker engine available for testcontainers."
)


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if not _docker_answers():
        pytest.fail(HOW_TO_START, pytrace=False)
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer("confluentinc/cp-kafka:7.9.0").with_kraft()
    container.with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
    container.with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
    with container:
        yield container.get_bootstrap_server()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    if not _docker_answers():
        pytest.fail(HOW_TO_START, pytrace=False)
    from testcontainers.redis import RedisContainer

    with RedisContainer("redis:7-alpine") as container:
        host = container.get_container_host_ip()
        yield f"redis://{host}:{container.get_exposed_port(6379)}/0"


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too."""
    rng = random.Random()
    while True:
        port = rng.randrange(20_000, 50_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue


def _wait_cluster_ok(client: redis.Redis, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while client.cluster("info").get("cluster_state") != "ok":
        if time.monotonic() > end:
            raise RuntimeError("the test Redis Cluster did not reach cluster_state:ok")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A Redis Cluster node's URL: ``REDIS_CLUSTER_URL``, else three primaries started here
    from ``redis-server`` (slots split by ``redis-cli --cluster create``), else one
    cluster-mode container holding every slot (Docker)."""
    env = os.environ.get("REDIS_CLUSTER_URL")
    if env:
        yield env
        return
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        ports = [_cluster_port() for _ in range(3)]
        with tempfile.TemporaryDirectory(prefix="fs-cluster-") as tmp:
            procs = [subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(p), "--cluster-enabled",
                 "yes", "--cluster-config-file", f"nodes-{p}.conf", "--dir", tmp,
                 "--save", "", "--appendonly", "no", "--logfile", f"{tmp}/{p}.log"],
                stdout=subprocess.DEVNULL, cwd=tmp) for p in ports]
            try:
                for p, proc in zip(ports, procs, strict=True):
                    node = redis.Redis(port=p, retry=Retry(NoBackoff(), 0))
                    for _ in range(200):
                        if proc.poll() is not None:
                            log = Path(tmp, f"{p}.log")
                            raise RuntimeError(f"cluster node on port {p} exited: "
                                               f"{log.read_text()[-2000:] if log.exists() else ''}")
                        try:
                            node.ping()
                            break
                        except redis.ConnectionError:
                            time.sleep(0.05)
                subprocess.run(["redis-cli", "--cluster", "create",
                                *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                                "--cluster-yes"], check=True, capture_output=True, timeout=60)
                for p in ports:
                    _wait_cluster_ok(redis.Redis(port=p))
                yield f"redis://127.0.0.1:{ports[0]}/0"
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait(timeout=10)
        return
    if not _docker_answers():
        pytest.fail(HOW_TO_START, pytrace=False)
    from testcontainers.redis import RedisContainer

    with RedisContainer("redis:7-alpine").with_command(
            "redis-server --cluster-enabled yes") as container:
        host = socket.gethostbyname(container.get_container_host_ip())
        port = int(container.get_exposed_port(6379))
        node = redis.Redis(host=host, port=port)
        # the node tells clients the address they reach it at, not its own inside Docker
        node.config_set("cluster-announce-ip", host)
        node.config_set("cluster-announce-port", port)
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        _wait_cluster_ok(node)
        yield f"redis://{host}:{port}/0"


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Per-test names (topics, groups, key namespaces) so tests never see each other's data."""
    suffix = uuid.uuid4().hex[:10]
    return lambda name: f"{name}-{suffix}"


@pytest.fixture
def keys_env() -> dict[str, str]:
    """Fresh random token and PII keys, as the service reads them from the environment."""
    return {
        "FRAUDSCORE_TOKEN_KEY": base64.b64encode(os.urandom(32)).decode(),
        "FRAUDSCORE_PII_KEY": base64.b64encode(os.urandom(32)).decode(),
        "FRAUDSCORE_AUDIT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
