"""Builds the scorer's long-lived parts from settings: keys, Redis, model, policy."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import redis

from app import audit as audit_trail
from app.config import ConfigError, Settings
from app.pipeline import Scorer, Topics
from app.security import keys as key_settings
from app.security.envelope import FieldCipher
from app.security.keyring import Keyring, KeyringWatcher
from app.security.tokens import KeyMaterialError, Tokenizer, load_key
from features.online import FeatureStoreUnavailable, RedisFeatureStore
from models.policy import Policy
from models.registry import ModelRef, resolve
from models.runtime import ModelRuntime, ModelWatcher

log = logging.getLogger("fraudscore.factory")


def keys_from_settings(settings: Settings) -> tuple[bytes, bytes]:
    """(token key, active PII key); a missing or unsafe key (the audit key included) stops
    the service at start. With a key directory, `build_scorer` loads all of its keys."""
    try:
        token_key = load_key(
            settings.token_key.get_secret_value() if settings.token_key else None,
            settings.token_key_file, "token_key",
        )
    except KeyMaterialError as exc:
        raise ConfigError(str(exc)) from None
    ring = key_settings.pii_keyring(settings)
    if settings.audit_scope != "off":
        key_settings.audit_signer(settings)
    return token_key, ring.keys[ring.active]


CLUSTER_SHARDS = 16  # enough slots to spread a namespace's cards over a few primaries


def _is_cluster(url: str) -> bool:
    """Whether `url` names a Redis Cluster node; False when it cannot be reached yet (the
    workers then wait for it with backoff)."""
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
                    .info("cluster").get("cluster_enabled"))
    except redis.RedisError:
        return False


def redis_client(url: str, cluster: bool | None = None) -> redis.Redis | redis.RedisCluster:
    """A client for one Redis or, when `url` names a Cluster node (asked when `cluster` is
    None), a cluster client that routes each command to the node owning its slot."""
    try:
        if cluster is None:
            cluster = _is_cluster(url)
        if cluster:
            return redis.RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                    health_check_interval=30)
    except ValueError as exc:  # a port that is not a number, a broken IPv6 address, ...
        raise ConfigError(f"invalid configuration: FRAUDSCORE_REDIS_URL: {exc}") from None
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # not usable
        raise ConfigError(f"FRAUDSCORE_REDIS_URL ({url.split('@')[-1]}): Redis Cluster not "
                          f"usable: {exc}") from None


def store_shards(settings: Settings, client: redis.Redis | redis.RedisCluster) -> int:
    if settings.redis_shards is not None:
        return settings.redis_shards
    return CLUSTER_SHARDS if isinstance(client, redis.RedisCluster) else 1


def check_redis(settings: Settings) -> None:
    """Stop at start on a Redis URL that cannot be used, or on a namespace created with
    another shard count (its cards would be looked for in the wrong slots). A Redis that
    cannot be reached yet passes: the workers wait for it with backoff."""
    client = redis_client(settings.redis_url, settings.redis_cluster)
    store = RedisFeatureStore(client, namespace=settings.redis_namespace,
                              shards=store_shards(settings, client))
    try:
        store.check_shards()
    except FeatureStoreUnavailable:
        return
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: FRAUDSCORE_REDIS_SHARDS: {exc}") from None


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


def audit_log(settings: Settings, worker_id: int | None) -> audit_trail.AuditLog | None:
    """The scorer's audit chain. A Kafka worker (`worker_id` known) recovers its head from
    the audit topic; otherwise from FRAUDSCORE_AUDIT_FILE, if any."""
    if settings.audit_scope == "off":
        return None
    signer = key_settings.audit_signer(settings)
    writer = key_settings.scorer_writer_id(settings, worker_id)
    if worker_id is not None:
        from app.audit_kafka import last_record_in_topic

        config = settings.kafka_client_config()
        recover = lambda: last_record_in_topic(config, settings.topic_audit, writer)  # noqa: E731
    elif settings.audit_file is not None:
        path = settings.audit_file
        recover = lambda: audit_trail.last_in_file(path, writer)  # noqa: E731
    else:
        recover = None
    return audit_trail.AuditLog(writer, signer, recover=recover, file=settings.audit_file,
                                checkpoint_s=settings.audit_checkpoint_s)


def pii_cipher(settings: Settings, pii_key: bytes) -> tuple[FieldCipher, KeyringWatcher | None]:
    """The alert cipher; with a key directory, all its keys and a watcher for rotations."""
    if settings.pii_keyring_dir is None:
        return FieldCipher({settings.pii_key_id: pii_key}, settings.pii_key_id), None
    # the watcher first: a rotation between the two steps is then seen at the first poll
    watcher = KeyringWatcher(settings.pii_keyring_dir, key_settings.key_wrapper(settings),
                             on_reload=lambda r: None,
                             on_error=lambda e: log.error("PII keyring not reloaded: %s", e))
    return FieldCipher.from_keyring(key_settings.pii_keyring(settings)), watcher


def build_scorer(
    settings: Settings, client: redis.Redis | redis.RedisCluster, ref: ModelRef,
    token_key: bytes, pii_key: bytes, follow: Path | None = None, worker_id: int | None = None,
) -> Scorer:
    """`follow`: the registry folder the model came from; its LATEST is then watched.
    `worker_id`: the Kafka worker's index (its audit chain is then its transactional id)."""
    runtime = _explaining(runtime_for(settings, ref))
    registry = follow
    watcher = None
    if registry is not None and settings.model_reload_s > 0 and settings.model_version is None \
            and (registry / "LATEST").exists():
        watcher = ModelWatcher(registry, runtime, settings.model_reload_s,
                               lambda r: _explaining(runtime_for(settings, r)))
    shadow = runtime_for(settings, resolve(settings.shadow_model_dir)) \
        if settings.shadow_model_dir else None
    cipher, key_watcher = pii_cipher(settings, pii_key)
    scorer = Scorer(
        store=RedisFeatureStore(client, namespace=settings.redis_namespace,
                                cache_cards=settings.cache_cards,
                                shards=store_shards(settings, client)),
        model=runtime,
        tokenizer=Tokenizer(token_key),
        cipher=cipher,
        policy=policy_for(settings, runtime),
        policy_for=lambda r: policy_for(settings, r),
        watcher=watcher,
        shadow=shadow,
        topics=Topics(settings.topic_alerts, settings.topic_scores, settings.topic_dlq,
                      settings.topic_labels, settings.topic_audit),
        max_event_bytes=settings.max_event_bytes,
        emit_scores=settings.emit_scores,
        max_future_s=settings.max_future_skew_s,
        audit=audit_log(settings, worker_id),
        audit_scope=settings.audit_scope,
        key_watcher=key_watcher,
    )
    if key_watcher is not None:
        key_watcher.on_reload = lambda ring: _rotated(scorer, ring)
    return scorer


def _explaining(runtime: ModelRuntime) -> ModelRuntime:
    """The runtime with its explainer loaded before any batch: the first alert of a worker
    (or of a newly loaded version) would otherwise wait seconds for lightgbm's import."""
    runtime.load_explainer()
    return runtime


def _rotated(scorer: Scorer, ring: Keyring) -> None:
    scorer.set_cipher(FieldCipher.from_keyring(ring))
    log.info("PII keyring reloaded: active key %s, %d keys", ring.active, len(ring.keys))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()
