"""AES-256-GCM envelopes for the personal fields an alert carries.

The associated data binds a ciphertext to its alert and transaction, so an envelope copied
into another alert fails to decrypt instead of revealing the wrong person's data.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from app.schemas import PiiEnvelope


class DecryptionError(ValueError):
    """The envelope cannot be opened: wrong key, tampered data, or moved to another alert."""


def associated_data(alert_id: str, transaction_id: str) -> bytes:
    return f"fraudscore/alert/v1\x00{alert_id}\x00{transaction_id}".encode()


class FieldCipher:
    """Encrypts with one key id; decrypts with any key it holds (rotation comes later)."""

    def __init__(self, keys: dict[str, bytes], active_kid: str) -> None:
        if active_kid not in keys:
            raise ValueError(f"active key id {active_kid!r} is not in the keyring")
        for kid, key in keys.items():
            if len(key) != 32:
                raise ValueError(f"key {kid!r} must be 32 bytes for AES-256, got {len(key)}")
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self._active = active_kid

    def encrypt(self, fields: dict[str, Any], aad: bytes) -> PiiEnvelope:
        nonce = os.urandom(12)
        plaintext = json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()
        ciphertext = self._aead[self._active].encrypt(nonce, plaintext, aad)
        return PiiEnvelope(
            kid=self._active,
            nonce=base64.b64encode(nonce).decode(),
            ciphertext=base64.b64encode(ciphertext).decode(),
        )

    def decrypt(self, envelope: PiiEnvelope, aad: bytes) -> dict[str, Any]:
        aead = self._aead.get(envelope.kid)
        if aead is None:
            raise DecryptionError(f"no key with id {envelope.kid!r} in the keyring")
        try:
            nonce = base64.b64decode(envelope.nonce, validate=True)
            sealed = base64.b64decode(envelope.ciphertext, validate=True)
            plaintext = aead.decrypt(nonce, sealed, aad)
        except (InvalidTag, ValueError):
            raise DecryptionError(
                "authentication failed: wrong key, tampered ciphertext, or an envelope "
                "that belongs to another alert"
            ) from None
        result: dict[str, Any] = json.loads(plaintext)
        return result
