"""Key directories: one active key encrypts, every older key still decrypts.

Layout of a key directory (mode 700, each file mode 600)::

    ACTIVE                 the active key id, one line (replaced atomically on rotation)
    <kid>.key              JSON: {"kid", "alg", "created_at", "key"}            plain mode
                           JSON: {"kid", "alg", "created_at", "wrapped_key",
                                  "wrapper"}                                    envelope mode

In envelope mode the data keys on disk are wrapped by a master key behind a
:class:`KeyWrapper` (a local master-key file here; a cloud KMS or an HSM in production), so a
copy of the directory alone decrypts nothing. A running scorer notices a new ``ACTIVE``
(one ``stat`` between batches) and reloads the directory without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import importlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.security.tokens import KeyMaterialError, load_key

ACTIVE_FILE = "ACTIVE"
KEY_SUFFIX = ".key"
ALG = "A256GCM"
KEY_BYTES = 32
_WRAP_AAD = b"fraudscore/keywrap/v1\x00"


@runtime_checkable
class KeyWrapper(Protocol):
    """Wraps data keys under a master key that never leaves its keeper (KMS, HSM, file).

    `context` (the key id) is bound to the wrapped bytes as associated data, so a wrapped key
    renamed to another id fails to unwrap. `wrapper_id` names the master key and is stored
    next to each wrapped key, so a directory says which master it needs.
    """

    @property
    def wrapper_id(self) -> str: ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...


class LocalFileKeyWrapper:
    """A master key in a local file (mode 600): AES-256-GCM, nonce prepended."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != KEY_BYTES:
            raise KeyMaterialError(f"master key must be {KEY_BYTES} bytes, got {len(master_key)}")
        self._aead = AESGCM(master_key)
        fingerprint = hmac.new(master_key, b"fraudscore/master-key-id", hashlib.sha256)
        self._id = "local:" + fingerprint.hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path) -> LocalFileKeyWrapper:
        return cls(load_key(None, path, "master_key", length=KEY_BYTES))

    @property
    def wrapper_id(self) -> str:
        return self._id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data_key, _WRAP_AAD + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], _WRAP_AAD + context)
        except (InvalidTag, ValueError):
            raise KeyMaterialError(
                f"cannot unwrap key {context.decode(errors='replace')!r} with master key "
                f"{self._id}: wrong master key, or the key file was edited"
            ) from None


def wrapper_from_spec(spec: str, master_key_file: Path | None) -> KeyWrapper | None:
    """`local` (with a master-key file) or `package.module:factory` for a plug-in wrapper.

    The factory is called with no arguments and reads its own configuration (KMS key ARN,
    region, …) from the environment; it must return an object with wrap/unwrap/wrapper_id.
    """
    if spec == "local":
        return LocalFileKeyWrapper.from_file(master_key_file) if master_key_file else None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise KeyMaterialError(
            f"key wrapper {spec!r}: use 'local' or 'package.module:factory' "
            "(FRAUDSCORE_KEY_WRAPPER)")
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise KeyMaterialError(f"key wrapper {spec!r} cannot be loaded: {exc}") from None
    wrapper = factory()
    if not isinstance(wrapper, KeyWrapper):
        raise KeyMaterialError(f"key wrapper {spec!r} lacks wrapper_id/wrap/unwrap")
    return wrapper


# ---- files ----------------------------------------------------------------------------------


def _check_private(path: Path, what: str, allow_group_read: bool = False) -> os.stat_result:
    """Refuse files others could read or replace; the message says how to fix it."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyMaterialError(f"{what} {path}: {exc.strerror}") from None
    loose = stat.S_IWGRP | stat.S_IWOTH | (0 if allow_group_read else stat.S_IRWXG | stat.S_IRWXO)
    if st.st_mode & loose:
        mode = "700" if path.is_dir() else "600"
        raise KeyMaterialError(
            f"{what} {path} is accessible by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):03o}); run: chmod {mode} {path}")
    return st


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically (temp file + rename), so readers never see half a key."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def new_key_id(now: datetime | None = None) -> str:
    """Sortable by creation time, unique without coordination."""
    now = now or datetime.now(UTC)
    return f"k{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class KeyInfo:
    """What `keys list` shows: never the key bytes."""

    kid: str
    created_at: str
    wrapper: str | None
    active: bool
    mode: str


@dataclass(frozen=True)
class Keyring:
    """Key id → key bytes, and the id that encrypts."""

    keys: dict[str, bytes]
    active: str

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise KeyMaterialError(f"active key id {self.active!r} is not in the keyring")


_FIX = ("restore it from backup, or remove it if nothing encrypted with it must still be "
        "read, then run `fraudscore keys rotate --dir {dir}`")


def _read_key_file(path: Path, wrapper: KeyWrapper | None) -> tuple[str, bytes, dict[str, Any]]:
    _check_private(path, "key file")
    fix = _FIX.format(dir=path.parent)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        kid = str(doc["kid"])
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise KeyMaterialError(f"key file {path} is malformed ({exc}); {fix}") from None
    if path.name != kid + KEY_SUFFIX:
        raise KeyMaterialError(f"key file {path} holds key id {kid!r}; rename it to "
                               f"{kid}{KEY_SUFFIX} or {fix}")
    if doc.get("alg") != ALG:
        raise KeyMaterialError(f"key file {path}: alg must be {ALG!r}; {fix}")
    try:
        if "wrapped_key" in doc:
            if wrapper is None:
                raise KeyMaterialError(
                    f"key {kid!r} is wrapped by {doc.get('wrapper')!r}: set "
                    "FRAUDSCORE_MASTER_KEY_FILE (local master key) or FRAUDSCORE_KEY_WRAPPER")
            if doc.get("wrapper") != wrapper.wrapper_id:
                raise KeyMaterialError(
                    f"key {kid!r} is wrapped by {doc.get('wrapper')!r}, but the configured "
                    f"master key is {wrapper.wrapper_id!r}")
            key = wrapper.unwrap(base64.b64decode(doc["wrapped_key"], validate=True),
                                 kid.encode())
        else:
            key = base64.b64decode(doc["key"], validate=True)
    except (KeyError, ValueError) as exc:
        raise KeyMaterialError(f"key file {path} is malformed ({exc}); {fix}") from None
    if len(key) != KEY_BYTES:
        raise KeyMaterialError(f"key file {path}: key must be {KEY_BYTES} bytes, got "
                               f"{len(key)}; {fix}")
    return kid, key, doc


def _key_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*" + KEY_SUFFIX) if not p.name.startswith("."))


def active_pointer(directory: Path) -> Path:
    return directory / ACTIVE_FILE


def load_keyring(directory: Path, wrapper: KeyWrapper | None = None) -> Keyring:
    """Every key in the directory; refuses loose permissions and malformed files."""
    if not directory.is_dir():
        raise KeyMaterialError(f"key directory {directory} does not exist; create one with "
                               f"`fraudscore keys generate --dir {directory}`")
    _check_private(directory, "key directory", allow_group_read=True)
    pointer = active_pointer(directory)
    if not pointer.exists():
        raise KeyMaterialError(f"{pointer} is missing; run `fraudscore keys rotate --dir "
                               f"{directory}` to create a new active key")
    _check_private(pointer, "active-key pointer", allow_group_read=True)
    active = pointer.read_text(encoding="ascii", errors="replace").strip()
    keys: dict[str, bytes] = {}
    for path in _key_files(directory):
        kid, key, _ = _read_key_file(path, wrapper)
        keys[kid] = key
    if active not in keys:
        raise KeyMaterialError(f"{pointer} names key {active!r}, but {directory} has no "
                               f"{active}{KEY_SUFFIX}; restore it or run `fraudscore keys "
                               f"rotate --dir {directory}`")
    return Keyring(keys, active)


def _add_key(directory: Path, wrapper: KeyWrapper | None) -> str:
    kid = new_key_id()
    key = os.urandom(KEY_BYTES)
    doc: dict[str, Any] = {"kid": kid, "alg": ALG, "created_at": datetime.now(UTC).isoformat()}
    if wrapper is not None:
        doc["wrapped_key"] = base64.b64encode(wrapper.wrap(key, kid.encode())).decode()
        doc["wrapper"] = wrapper.wrapper_id
    else:
        doc["key"] = base64.b64encode(key).decode()
    _write_private(directory / (kid + KEY_SUFFIX), json.dumps(doc, indent=1) + "\n")
    return kid


def generate(directory: Path, wrapper: KeyWrapper | None = None) -> str:
    """A new key directory with one active key; refuses a directory that already has keys."""
    if directory.exists() and (_key_files(directory) or active_pointer(directory).exists()):
        raise KeyMaterialError(f"{directory} already holds keys; use `fraudscore keys rotate "
                               f"--dir {directory}` to add a new active key")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    kid = _add_key(directory, wrapper)
    _write_private(active_pointer(directory), kid + "\n")
    return kid


def rotate(directory: Path, wrapper: KeyWrapper | None = None) -> str:
    """Add a key and make it active; old keys stay so existing ciphertexts still decrypt.

    The existing keyring is loaded first, so a rotation never happens on top of a broken
    directory (or with the wrong master key). The pointer is replaced last and atomically:
    a scorer that reloads at any moment sees either the old or the new active key.
    """
    load_keyring(directory, wrapper)
    kid = _add_key(directory, wrapper)
    _write_private(active_pointer(directory), kid + "\n")
    return kid


def list_keys(directory: Path) -> list[KeyInfo]:
    """Key ids, dates and modes from the files alone (no master key needed), oldest first."""
    pointer = active_pointer(directory)
    active = pointer.read_text(encoding="ascii").strip() if pointer.exists() else ""
    out = []
    for path in _key_files(directory):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            kid, created, wrapper = str(doc["kid"]), str(doc.get("created_at", "?")), \
                doc.get("wrapper")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            kid, created, wrapper = path.name.removesuffix(KEY_SUFFIX), "malformed", None
        mode = f"{stat.S_IMODE(path.stat().st_mode):03o}"
        out.append(KeyInfo(kid, created, wrapper, kid == active, mode))
    return sorted(out, key=lambda info: (info.created_at, info.kid))


class KeyringWatcher:
    """Reloads a key directory when its ACTIVE pointer changes: one `stat` per check.

    A failed reload (half-copied directory, missing master key) keeps the keys in use and
    is reported through `on_error`; it is retried every `retry_s` until it succeeds.
    """

    retry_s = 5.0

    def __init__(self, directory: Path, wrapper: KeyWrapper | None,
                 on_reload: Callable[[Keyring], None],
                 on_error: Callable[[KeyMaterialError], None] | None = None) -> None:
        self.directory = directory
        self._wrapper = wrapper
        self.on_reload = on_reload
        self.on_error = on_error
        self._seen = self._signature()
        self._failed_at = float("-inf")

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = active_pointer(self.directory).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def poll(self) -> bool:
        """True when a new keyring was loaded and handed to `on_reload`."""
        sig = self._signature()
        if sig == self._seen or time.monotonic() - self._failed_at < self.retry_s:
            return False
        try:
            ring = load_keyring(self.directory, self._wrapper)
        except KeyMaterialError as exc:
            self._failed_at = time.monotonic()
            if self.on_error is not None:
                self.on_error(exc)
            return False
        self._seen = sig
        self.on_reload(ring)
        return True
