"""Keyed HMAC-SHA256 tokens: the only form in which identifiers travel past ingest.

A token is stable for a key (features keep working) and useless without it (a leaked
Redis dump or alert names no card). The key comes from the environment or a key file,
never from the repository.
"""

from __future__ import annotations

import base64
import hmac
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np

TOKEN_HEX = 32  # 128 bits: collision-free for any realistic card population


class KeyMaterialError(ValueError):
    """A key is missing, malformed or unsafely stored; the message says how to fix it."""


def load_key(value: str | None, path: Path | None, name: str, length: int | None = None) -> bytes:
    """Key bytes from a base64 string or a key file (which must not be readable by others)."""
    if value is None and path is None:
        raise KeyMaterialError(
            f"no {name}: set FRAUDSCORE_{name.upper()} (base64) or "
            f"FRAUDSCORE_{name.upper()}_FILE; generate 32 random bytes with "
            "`python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'`"
        )
    if path is not None:
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise KeyMaterialError(f"{name} file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyMaterialError(
                f"{name} file {path} is accessible by group/others; run: chmod 600 {path}"
            )
        value = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = base64.b64decode(value or "", validate=True)
    except ValueError:
        raise KeyMaterialError(f"{name} is not valid base64") from None
    if length is not None and len(key) != length:
        raise KeyMaterialError(f"{name} must be {length} bytes, got {len(key)}")
    if len(key) < 16:
        raise KeyMaterialError(f"{name} must be at least 16 bytes, got {len(key)}")
    return key


def random_key(n: int = 32) -> bytes:
    return os.urandom(n)


class Tokenizer:
    """HMAC-SHA256 tokens, memoised per batch of values (many events share a card)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._mac = hmac.new(key, digestmod="sha256")  # OpenSSL-backed; key schedule once

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[bytes]]:
        return Tokenizer, (self._key,)  # HMAC objects do not pickle; rebuild from the key

    def token(self, value: str) -> str:
        """HMAC-SHA256 of the value (hex, truncated); copying the keyed HMAC object skips
        the key schedule that ``hmac.new`` would redo for every token."""
        mac = self._mac.copy()
        mac.update(value.encode("utf-8"))
        return mac.hexdigest()[:TOKEN_HEX]

    def tokens(self, values: Iterable[object]) -> list[str | None]:
        """Tokens for a column; missing values (None, NaN) stay missing."""
        cache: dict[str, str] = {}
        out: list[str | None] = []
        for v in values:
            if not isinstance(v, str):
                out.append(None)
                continue
            tok = cache.get(v)
            if tok is None:
                tok = cache[v] = self.token(v)
            out.append(tok)
        return out


def equality_keys(tokens: Iterable[str | None]) -> np.ndarray:
    """32-bit keys from tokens (0 = missing), for state that only compares equality."""
    return np.fromiter((int(t[:8], 16) or 1 if t else 0 for t in tokens), dtype=np.uint32)
