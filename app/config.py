"""Settings: the only place that reads the environment.

Every setting is ``FRAUDSCORE_<NAME>`` (for example ``FRAUDSCORE_BATCH_SIZE=500``). Kafka
client settings pass through untouched as librdkafka keys in ``FRAUDSCORE_KAFKA_CONFIG``
(a JSON object), so TLS and SASL need no code here. ``KAFKA_BOOTSTRAP_SERVERS`` and
``REDIS_URL`` (printed by ``scripts/stack.sh up``) are honoured as fallbacks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

_LIBRDKAFKA_KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
# Keys the engines own; letting users set them would silently break exactly-once.
_RESERVED_KAFKA_KEYS = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "transactional.id",
        "enable.auto.commit",
        "isolation.level",
        "enable.idempotence",
    }
)


class ConfigError(ValueError):
    """Invalid configuration; the message names the environment variable to fix."""


class Settings(BaseSettings):
    """fraudscore configuration (env prefix ``FRAUDSCORE_``)."""

    model_config = SettingsConfigDict(
        env_prefix="FRAUDSCORE_", extra="ignore", validate_default=True, frozen=True
    )

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices(
            "FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"
        ),
        description="Kafka bootstrap servers, host:port[,host:port]",
    )
    kafka_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="extra librdkafka settings as a JSON object, e.g. security.protocol, sasl.*",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("FRAUDSCORE_REDIS_URL", "REDIS_URL"),
        description="redis://, rediss:// (TLS) or unix:// URL; user:password@ for ACL users",
    )
    redis_namespace: str = Field(default="fs", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                 description="prefix of every Redis key this service writes")
    redis_cluster: bool | None = Field(
        default=None, description="the Redis URL names a Redis Cluster node; unset: ask the "
        "server at start (set it when the workers may start before Redis is up)")
    redis_shards: Annotated[int, Field(ge=1, le=4096)] | None = Field(
        default=None, description="card shards (each one hash slot); fixed per namespace. "
        "Unset: 1 on one Redis, 16 on a Cluster")
    cache_cards: Annotated[int, Field(ge=1)] = Field(
        default=250_000, description="cards a worker keeps in memory, least recently used "
        "evicted (100 bytes per kept event, its region rounded up to a power of two)")
    group_id: str = Field(default="fraudscore-scorer", min_length=1)
    topic_transactions: str = "transactions"
    topic_labels: str = "fraud-labels"
    topic_alerts: str = "alerts"
    topic_scores: str = "scores"
    topic_dlq: str = "transactions.dlq"
    topic_audit: str = "audit"
    emit_scores: bool = Field(default=True, description="write every score to the scores topic")
    # a cap, reached only in a backlog (a batch takes what has arrived): per event, 4,000
    # cost the worker 16-17.5 us of CPU and the broker 2.4, against 19-21 and 4.3 at 1,000
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 4000
    batch_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = Field(
        default=20, description="confluent: how long an idle worker waits for a batch's first "
        "event; faust: the batch's time bound")
    batch_linger_ms: Annotated[int, Field(ge=0, le=60_000)] = Field(
        default=0, description="confluent: how long a batch then waits to fill; 0 takes what "
        "has arrived, so batches stay small when input is light and grow with the backlog")
    max_event_bytes: Annotated[int, Field(ge=256, le=16 * 1024 * 1024)] = 64 * 1024
    max_future_skew_s: Annotated[float, Field(ge=0)] = Field(
        default=300.0, description="dead-letter events stamped further ahead than this; 0 = off"
    )
    review_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="score from which an event is alerted; default: the model's"
    )
    block_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="score from which the decision is block; default: the model's"
    )
    model_dir: Path | None = Field(default=None,
                                   description="model folder, or a registry (its LATEST)")
    model_version: str | None = Field(
        default=None, description="pin a registry version; default: follow LATEST")
    model_reload_s: Annotated[float, Field(ge=0)] = Field(
        default=10.0, description="check the registry's LATEST this often; 0 = never reload")
    shadow_model_dir: Path | None = Field(
        default=None, description="score a second model alongside, recorded but not acted on")
    model_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda)$",
                              description="ONNX Runtime device: auto picks CUDA when present")
    tree_backend: str = Field(default="auto", pattern=r"^(auto|compiled|onnx)$",
                              description="tree scorer: compiled native code or ONNX Runtime")
    amount_limit: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="hard rule: block any amount above this")
    blocked_terminals: list[str] = Field(
        default_factory=list, description="hard rule: block these terminal ids (JSON list)")
    token_key: SecretStr | None = Field(default=None, description="HMAC key for tokens")
    token_key_file: Path | None = None
    pii_key: SecretStr | None = Field(default=None, description="AES-256 key, base64")
    pii_key_file: Path | None = None
    pii_key_id: str = "k1"
    pii_keyring_dir: Path | None = Field(
        default=None, description="key directory (`fraudscore keys`); replaces FRAUDSCORE_PII_KEY")
    key_wrapper: str = Field(default="local", description="envelope mode: 'local' (master-key "
                             "file) or 'package.module:factory' for a KMS plug-in")
    master_key_file: Path | None = Field(
        default=None, description="local master key that wraps the keyring's data keys")
    audit_scope: str = Field(default="all", pattern=r"^(all|alerts|off)$",
                             description="audit every decision, only alerts, or nothing")
    audit_key: SecretStr | None = Field(default=None, description="HMAC key for audit chains")
    audit_key_file: Path | None = None
    audit_key_id: str = Field(default="a1", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    audit_keyring_dir: Path | None = Field(
        default=None, description="audit keys as a key directory; replaces FRAUDSCORE_AUDIT_KEY")
    audit_file: Path | None = Field(
        default=None, description="append-only local copy of this process's audit records")
    audit_writer_id: str | None = Field(
        default=None, description="audit chain id; default: the worker's transactional id")
    audit_checkpoint_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, description="log the audit chain head this often (truncation anchor)")
    max_partition_skew_s: Annotated[float, Field(ge=0)] = Field(
        default=21600.0, description="pause a partition whose events run this far ahead of "
        "the slowest one with data left (event time); 0 = off")
    fail_open: bool = Field(
        default=False, description="on a Redis outage, score with default features (flagged "
        "fail_open on every output) instead of pausing")
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=9108, description="/metrics, /healthz, /readyz; worker i of --workers N uses "
        "port + i; 0 = off")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return value

    @field_validator("kafka_config")
    @classmethod
    def _check_kafka_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not _LIBRDKAFKA_KEY.match(key):
                raise ValueError(f"{key!r} is not a librdkafka setting name")
            if key in _RESERVED_KAFKA_KEYS:
                raise ValueError(f"{key!r} is set by fraudscore itself and cannot be overridden")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every client: bootstrap plus the pass-through keys."""
        return {"bootstrap.servers": self.kafka_bootstrap_servers, **self.kafka_config}


def _env_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    if field.isupper():  # already an environment name (a validation alias)
        return field
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return f"FRAUDSCORE_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings; on error raise ConfigError naming each bad variable."""
    try:
        settings = Settings(**overrides)
    except SettingsError as exc:  # a complex value (JSON) that does not parse
        match = re.search(r'field "(\w+)"', str(exc))
        name = _env_name((match.group(1),)) if match else "a FRAUDSCORE_ variable"
        raise ConfigError(f"invalid configuration: {name}: not valid JSON") from None
    except ValidationError as exc:
        problems = [f"{_env_name(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    review, block = settings.review_threshold, settings.block_threshold
    if review is not None and block is not None and block < review:
        raise ConfigError(
            "invalid configuration: FRAUDSCORE_BLOCK_THRESHOLD must be ≥ "
            "FRAUDSCORE_REVIEW_THRESHOLD"
        )
    return settings
