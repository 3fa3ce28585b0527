"""Key material from settings: the PII keyring, its wrapper, the audit signer.

One place turns FRAUDSCORE_* key settings into objects, for the scorer and the analyst
commands alike; every problem becomes a :class:`ConfigError` that says what to set.
"""

from __future__ import annotations

import os
import socket

from app.audit import AuditSigner
from app.config import ConfigError, Settings
from app.security.keyring import Keyring, KeyWrapper, load_keyring, wrapper_from_spec
from app.security.tokens import KeyMaterialError, load_key


def key_wrapper(settings: Settings) -> KeyWrapper | None:
    try:
        return wrapper_from_spec(settings.key_wrapper, settings.master_key_file)
    except KeyMaterialError as exc:
        raise ConfigError(str(exc)) from None


def pii_keyring(settings: Settings) -> Keyring:
    """The key directory when FRAUDSCORE_PII_KEYRING_DIR is set, else the single key."""
    try:
        if settings.pii_keyring_dir is not None:
            return load_keyring(settings.pii_keyring_dir, key_wrapper(settings))
        key = load_key(settings.pii_key.get_secret_value() if settings.pii_key else None,
                       settings.pii_key_file, "pii_key", length=32)
    except KeyMaterialError as exc:
        raise ConfigError(str(exc)) from None
    return Keyring({settings.pii_key_id: key}, settings.pii_key_id)


def has_pii_key(settings: Settings) -> bool:
    return bool(settings.pii_keyring_dir or settings.pii_key or settings.pii_key_file)


def audit_signer(settings: Settings) -> AuditSigner:
    """The audit HMAC keys; refuses to run without one (unless auditing is off)."""
    try:
        if settings.audit_keyring_dir is not None:
            ring = load_keyring(settings.audit_keyring_dir, key_wrapper(settings))
            return AuditSigner(ring.keys, ring.active)
        if settings.audit_key is None and settings.audit_key_file is None:
            raise ConfigError(
                "no audit key: set FRAUDSCORE_AUDIT_KEY (base64, ≥ 16 bytes), "
                "FRAUDSCORE_AUDIT_KEY_FILE or FRAUDSCORE_AUDIT_KEYRING_DIR; or turn the audit "
                "trail off with FRAUDSCORE_AUDIT_SCOPE=off")
        key = load_key(settings.audit_key.get_secret_value() if settings.audit_key else None,
                       settings.audit_key_file, "audit_key")
    except KeyMaterialError as exc:
        raise ConfigError(str(exc)) from None
    return AuditSigner({settings.audit_key_id: key}, settings.audit_key_id)


def scorer_writer_id(settings: Settings, worker_id: int | None) -> str:
    """The scorer's audit chain: its transactional id when the worker index is known (the
    chain then continues across restarts); otherwise one chain per process."""
    if settings.audit_writer_id:
        return settings.audit_writer_id
    if worker_id is not None:
        return f"{settings.group_id}-worker-{worker_id}"
    return f"{settings.group_id}@{socket.gethostname()}/pid{os.getpid()}"
