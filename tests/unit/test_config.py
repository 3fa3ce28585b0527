"""Configuration: env prefix, pass-through Kafka settings, errors that name the variable."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings


def test_defaults_and_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_BATCH_SIZE", "250")
    monkeypatch.setenv("FRAUDSCORE_TOPIC_ALERTS", "alerts-eu")
    s = load_settings()
    assert s.batch_size == 250 and s.topic_alerts == "alerts-eu"
    assert s.group_id == "fraudscore-scorer"


def test_stack_variables_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("FRAUDSCORE_REDIS_URL", raising=False)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "10.0.0.1:9092,10.0.0.2:9092")
    monkeypatch.setenv("REDIS_URL", "rediss://scorer:secret@redis.internal:6380/0")
    s = load_settings()
    assert s.kafka_client_config()["bootstrap.servers"] == "10.0.0.1:9092,10.0.0.2:9092"
    assert s.redis_url.startswith("rediss://")


def test_librdkafka_settings_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FRAUDSCORE_KAFKA_CONFIG",
        '{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", '
        '"sasl.username": "scorer", "ssl.ca.location": "/etc/ssl/ca.pem"}',
    )
    cfg = load_settings().kafka_client_config()
    assert cfg["security.protocol"] == "SASL_SSL" and cfg["sasl.mechanism"] == "SCRAM-SHA-512"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("FRAUDSCORE_BATCH_SIZE", "0", "FRAUDSCORE_BATCH_SIZE"),
        ("FRAUDSCORE_BATCH_SIZE", "lots", "FRAUDSCORE_BATCH_SIZE"),
        ("FRAUDSCORE_BATCH_TIMEOUT_MS", "-1", "FRAUDSCORE_BATCH_TIMEOUT_MS"),
        ("FRAUDSCORE_BATCH_LINGER_MS", "-1", "FRAUDSCORE_BATCH_LINGER_MS"),
        ("FRAUDSCORE_BATCH_LINGER_MS", "abc", "FRAUDSCORE_BATCH_LINGER_MS"),
        ("FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS", "localhost", "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS"),
        ("FRAUDSCORE_REDIS_URL", "http://redis:6379", "FRAUDSCORE_REDIS_URL"),
        ("FRAUDSCORE_KAFKA_CONFIG", "{not json", "FRAUDSCORE_KAFKA_CONFIG"),
        ("FRAUDSCORE_KAFKA_CONFIG", '{"Security Protocol": "SSL"}', "FRAUDSCORE_KAFKA_CONFIG"),
        ("FRAUDSCORE_KAFKA_CONFIG", '{"transactional.id": "x"}', "FRAUDSCORE_KAFKA_CONFIG"),
        ("FRAUDSCORE_REVIEW_THRESHOLD", "1.5", "FRAUDSCORE_REVIEW_THRESHOLD"),
        ("FRAUDSCORE_LOG_LEVEL", "LOUD", "FRAUDSCORE_LOG_LEVEL"),
        ("FRAUDSCORE_REDIS_SHARDS", "0", "FRAUDSCORE_REDIS_SHARDS"),
        ("FRAUDSCORE_REDIS_SHARDS", "100000", "FRAUDSCORE_REDIS_SHARDS"),
        ("FRAUDSCORE_REDIS_CLUSTER", "maybe", "FRAUDSCORE_REDIS_CLUSTER"),
    ],
)
def test_invalid_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert expected in str(info.value)


def test_threshold_order_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_REVIEW_THRESHOLD", "0.8")
    monkeypatch.setenv("FRAUDSCORE_BLOCK_THRESHOLD", "0.5")
    with pytest.raises(ConfigError, match="FRAUDSCORE_BLOCK_THRESHOLD"):
        load_settings()


def test_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_TOKEN_KEY", "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
    s = load_settings()
    assert "c2VjcmV0" not in repr(s) and "c2VjcmV0" not in str(s.model_dump())


@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://[::1:6379/0"])
def test_a_redis_url_that_cannot_be_parsed_names_the_setting(url: str) -> None:
    from app.factory import redis_client

    with pytest.raises(ConfigError, match="FRAUDSCORE_REDIS_URL"):
        redis_client(url)
