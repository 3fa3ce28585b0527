"""Builds the scorer's long-lived parts from settings: keys, Redis, model, policy."""

from __future__ import annotations

import base64
from pathlib import Path

import redis

from app.config import ConfigError, Settings
from app.pipeline import Scorer, Topics
from app.security.envelope import FieldCipher
from app.security.tokens import KeyMaterialError, Tokenizer, load_key
from features.online import RedisFeatureStore
from models.policy import Policy
from models.registry import ModelRef, resolve
from models.runtime import ModelRuntime, ModelWatcher


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


def model_source(settings: Settings, model: Path | None) -> Path | None:
    return model or settings.model_dir


def model_ref(settings: Settings, model: Path | None) -> ModelRef:
    path = model_source(settings, model)
    if path is None:
        raise ConfigError("no model: pass --model DIR or set FRAUDSCORE_MODEL_DIR "
                          "(train one with `fraudscore train`)")
    return resolve(path, settings.model_version)


def policy_for(settings: Settings, runtime: ModelRuntime) -> Policy:
    """The model's thresholds, with the operator's overrides and hard rules on top."""
    try:
        return Policy.from_manifest(
            runtime.manifest,
            review_threshold=settings.review_threshold,
            block_threshold=settings.block_threshold,
            amount_limit=settings.amount_limit,
            blocked_terminals=frozenset(settings.blocked_terminals) or None,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def runtime_for(settings: Settings, ref: ModelRef) -> ModelRuntime:
    return ModelRuntime(ref, device=settings.model_device, tree_backend=settings.tree_backend)


def build_scorer(
    settings: Settings, client: redis.Redis, ref: ModelRef, token_key: bytes, pii_key: bytes,
    follow: Path | None = None,
) -> Scorer:
    """`follow`: the registry folder the model came from; its LATEST is then watched."""
    runtime = runtime_for(settings, ref)
    registry = follow
    watcher = None
    if registry is not None and settings.model_reload_s > 0 and settings.model_version is None \
            and (registry / "LATEST").exists():
        watcher = ModelWatcher(registry, runtime, settings.model_reload_s,
                               lambda r: runtime_for(settings, r))
    shadow = runtime_for(settings, resolve(settings.shadow_model_dir)) \
        if settings.shadow_model_dir else None
    return Scorer(
        store=RedisFeatureStore(client, namespace=settings.redis_namespace),
        model=runtime,
        tokenizer=Tokenizer(token_key),
        cipher=FieldCipher({settings.pii_key_id: pii_key}, settings.pii_key_id),
        policy=policy_for(settings, runtime),
        policy_for=lambda r: policy_for(settings, r),
        watcher=watcher,
        shadow=shadow,
        topics=Topics(settings.topic_alerts, settings.topic_scores, settings.topic_dlq,
                      settings.topic_labels),
        max_event_bytes=settings.max_event_bytes,
        emit_scores=settings.emit_scores,
        max_future_s=settings.max_future_skew_s,
    )


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()
