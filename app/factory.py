"""Builds the scorer's long-lived parts from settings: keys, Redis, model, policy."""

from __future__ import annotations

import base64
from pathlib import Path

import redis

from app.config import ConfigError, Settings
from app.pipeline import Policy, Scorer, Topics
from app.security.envelope import FieldCipher
from app.security.tokens import KeyMaterialError, Tokenizer, load_key
from features.online import RedisFeatureStore
from models.registry import ModelRef, resolve
from models.runtime import ModelRuntime


def keys_from_settings(settings: Settings) -> tuple[bytes, bytes]:
    """(token key, PII key); a missing or unsafe key stops the service at start."""
    try:
        token_key = load_key(
            settings.token_key.get_secret_value() if settings.token_key else None,
            settings.token_key_file, "token_key",
        )
        pii_key = load_key(
            settings.pii_key.get_secret_value() if settings.pii_key else None,
            settings.pii_key_file, "pii_key", length=32,
        )
    except KeyMaterialError as exc:
        raise ConfigError(str(exc)) from None
    return token_key, pii_key


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                health_check_interval=30)


def model_ref(settings: Settings, model: Path | None) -> ModelRef:
    path = model or settings.model_dir
    if path is None:
        raise ConfigError("no model: pass --model DIR or set FRAUDSCORE_MODEL_DIR "
                          "(train one with `fraudscore train`)")
    return resolve(path)


def build_scorer(
    settings: Settings, client: redis.Redis, ref: ModelRef, token_key: bytes, pii_key: bytes
) -> Scorer:
    policy = Policy(
        review_threshold=float(ref.manifest["review_threshold"])
        if settings.review_threshold is None else settings.review_threshold,
        block_threshold=float(ref.manifest["block_threshold"])
        if settings.block_threshold is None else settings.block_threshold,
    )
    return Scorer(
        store=RedisFeatureStore(client, namespace=settings.redis_namespace),
        model=ModelRuntime(ref),
        tokenizer=Tokenizer(token_key),
        cipher=FieldCipher({settings.pii_key_id: pii_key}, settings.pii_key_id),
        policy=policy,
        topics=Topics(settings.topic_alerts, settings.topic_scores, settings.topic_dlq,
                      settings.topic_labels),
        max_event_bytes=settings.max_event_bytes,
        emit_scores=settings.emit_scores,
        max_future_s=settings.max_future_skew_s,
    )


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()
