"""Real services for the integration tests, one per test session.

Order of preference: ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` from the environment (the
local stack: ``eval "$(scripts/stack.sh up)"``), else testcontainers when a Docker engine
answers, else the test fails and says how to start the stack. Unit tests need none of it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

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
