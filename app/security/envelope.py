"""AES-256-GCM envelopes for the personal fields an alert carries (and dead letters' bytes).

The associated data binds a ciphertext to its alert and transaction, so an envelope copied
into another alert fails to decrypt instead of revealing the wrong person's data. The
cipher holds a keyring: the active key encrypts, every key it holds decrypts, so ciphertexts
written before a rotation stay readable.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.schemas import PiiEnvelope
from app.security.keyring import Keyring


class DecryptionError(ValueError):
    """The envelope cannot be opened: wrong key, tampered data, or moved to another alert."""


def associated_data(alert_id: str, transaction_id: str) -> bytes:
    return f"fraudscore/alert/v1\x00{alert_id}\x00{transaction_id}".encode()


def dead_letter_associated_data(topic: str, partition: int, offset: int) -> bytes:
    """Binds a dead letter's sealed original to the input position it came from."""
    return f"fraudscore/dlq/v1\x00{topic}\x00{partition}\x00{offset}".encode()


class FieldCipher:
    """Encrypts with the active key id; decrypts with any key it holds."""

    def __init__(self, keys: dict[str, bytes], active_kid: str) -> None:
        if active_kid not in keys:
            raise ValueError(f"active key id {active_kid!r} is not in the keyring")
        for kid, key in keys.items():
            if len(key) != 32:
                raise ValueError(f"key {kid!r} must be 32 bytes for AES-256, got {len(key)}")
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self._active = active_kid

    @classmethod
    def from_keyring(cls, ring: Keyring) -> FieldCipher:
        return cls(ring.keys, ring.active)

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._aead)

    def encrypt_bytes(self, plaintext: bytes, aad: bytes) -> PiiEnvelope:
        nonce = os.urandom(12)
        ciphertext = self._aead[self._active].encrypt(nonce, plaintext, aad)
        return PiiEnvelope(
            kid=self._active,
            nonce=base64.b64encode(nonce).decode(),
            ciphertext=base64.b64encode(ciphertext).decode(),
        )

    def encrypt(self, fields: dict[str, Any], aad: bytes) -> PiiEnvelope:
        plaintext = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
        return self.encrypt_bytes(plaintext, aad)

    def decrypt_bytes(self, envelope: PiiEnvelope, aad: bytes) -> bytes:
        aead = self._aead.get(envelope.kid)
        if aead is None:
            held = ", ".join(self.key_ids) or "none"
            raise DecryptionError(
                f"no key with id {envelope.kid!r} in the keyring (held: {held}): wrong key "
                "directory or key, or the key was removed after a rotation")
        try:
            nonce = base64.b64decode(envelope.nonce, validate=True)
            sealed = base64.b64decode(envelope.ciphertext, validate=True)
            return aead.decrypt(nonce, sealed, aad)
        except (InvalidTag, ValueError):
            raise DecryptionError(
                f"authentication failed with key {envelope.kid!r}: wrong key, tampered "
                "ciphertext, or an envelope that belongs to another alert"
            ) from None

    def decrypt(self, envelope: PiiEnvelope, aad: bytes) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.decrypt_bytes(envelope, aad))
        return result
