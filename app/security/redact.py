"""Make dead letters safe to keep: a redacted value in clear, the original only sealed.

A dead letter is by definition input we could not parse, so the usual guarantee (PII leaves
stage 2 only encrypted) does not cover it. What goes to the DLQ instead:

- the value with every PAN-like digit run (13–19 digits, optionally split by spaces or
  dashes, passing Luhn) masked to BIN + last 4, every e-mail address and IP address
  replaced, and, when the value is JSON, the identifier fields (card number, customer id,
  device id, ip, e-mail) replaced by tokens or masks wherever they sit;
- the key (a customer id) replaced by its token, so the DLQ partitions like the alerts;
- the original key and bytes in an AES-256-GCM envelope in the ``original.envelope``
  header, bound to the source topic, partition and offset, for an analyst with the key.

Residual risk, stated: free text that is not JSON keeps customer ids (we cannot know which
word is one), and digits hidden by JSON escapes survive only in values that fail to parse.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from typing import Any

from app.schemas import PiiEnvelope, luhn_ok
from app.security.envelope import FieldCipher, dead_letter_associated_data
from app.security.tokens import Tokenizer

HEADER_ENVELOPE = "original.envelope"
HEADER_OMITTED = "original.omitted"
HEADER_TRUNCATED = "value.truncated"
# Dead-letter size bounds: the DLQ record must stay well under the broker's 1 MB default.
MAX_SEALED_BYTES = 512 * 1024
MAX_REDACTED_BYTES = 64 * 1024

_DIGIT_RUN = re.compile(rb"[0-9](?:[ -]?[0-9]){12,}")
_EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(rb"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9])")
_IPV6 = re.compile(rb"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                   rb"(?:[0-9]{1,3}\.){3}[0-9]{1,3})?(?![0-9A-Fa-f:])")
_FIELDS_MASKED = frozenset({"card_number", "pan", "card", "cardnumber"})
_FIELDS_TOKENISED = frozenset({"customer_id", "device_id"})
_FIELDS_DROPPED = frozenset({"email", "ip", "ip_address", "phone", "name"})


def mask_pan(digits: str) -> str:
    """BIN (first 6) and last 4, the most PCI DSS 3.4.1 allows to show."""
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def _mask_pan_match(m: re.Match[bytes]) -> bytes:
    """Mask the middle of every 13–19 digit window of the run that passes Luhn.

    Windows, not the whole run: a PAN followed by more digits ("… 1486 0") or written
    inside a longer number is still a PAN. A digit stays visible only where it is in no
    window's middle, so no PAN shows more than its BIN and last 4.
    """
    run = bytearray(m.group(0))
    where = [i for i, c in enumerate(run) if 48 <= c <= 57]
    digits = bytes(run[i] for i in where).decode()
    hide: set[int] = set()
    for size in range(13, min(19, len(digits)) + 1):
        for start in range(len(digits) - size + 1):
            if luhn_ok(digits[start:start + size]):
                hide.update(range(start + 6, start + size - 4))
    for j in hide:
        run[where[j]] = ord("*")
    return bytes(run)


def _ip_match(m: re.Match[bytes]) -> bytes:
    try:
        ipaddress.ip_address(m.group(0).decode())
    except ValueError:
        return m.group(0)
    return b"[ip]"


def redact_bytes(value: bytes) -> bytes:
    """PAN-like runs, e-mails and IP addresses out of arbitrary bytes."""
    value = _DIGIT_RUN.sub(_mask_pan_match, value)
    value = _EMAIL.sub(b"[email]", value)
    value = _IPV6.sub(_ip_match, value)
    return _IPV4.sub(_ip_match, value)


def redact_text(text: str) -> str:
    """The same for text a person typed (an analyst's reason, say)."""
    return redact_bytes(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")


class Redactor:
    """Redacts and seals dead letters; holds the token key and the PII cipher."""

    def __init__(self, tokenizer: Tokenizer, cipher: FieldCipher) -> None:
        self.tokenizer = tokenizer
        self.cipher = cipher

    def _walk(self, node: Any, field: str | None = None) -> Any:
        if isinstance(node, dict):
            return {redact_text(str(k)): self._walk(v, str(k).lower()) for k, v in node.items()}
        if isinstance(node, list):
            return [self._walk(v, field) for v in node]
        if node is None or isinstance(node, bool):
            return node
        if field in _FIELDS_MASKED:
            digits = re.sub(r"[ -]", "", str(node))
            if 13 <= len(digits) <= 19 and digits.isdigit():
                return mask_pan(digits) if luhn_ok(digits) else "*" * (len(digits) - 4) + \
                    digits[-4:]
            return "[redacted]"
        if field in _FIELDS_TOKENISED:
            return "tok:" + self.tokenizer.token(str(node))
        if field in _FIELDS_DROPPED:
            return "[redacted]"
        if isinstance(node, float) and node.is_integer():
            node = int(node) if 1e12 <= abs(node) < 1e19 else node
        if isinstance(node, int):
            redacted = redact_text(str(node))
            return node if redacted == str(node) else redacted
        if isinstance(node, str):
            return redact_text(node)
        return node

    def redact(self, value: bytes) -> bytes:
        """JSON field by field (every key and string, escapes decoded); other bytes as such."""
        try:
            doc = json.loads(value)
        except ValueError:  # includes undecodable bytes
            return redact_bytes(value)
        return json.dumps(self._walk(doc), separators=(",", ":")).encode()

    def key_token(self, key: bytes | None) -> bytes | None:
        if key is None:
            return None
        return self.tokenizer.token(key.decode("utf-8", "surrogateescape")).encode()

    def protect(self, key: bytes | None, value: bytes, topic: str, partition: int,
                offset: int) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
        """(tokenised key, redacted value, extra headers) for one dead letter."""
        headers: list[tuple[str, bytes]] = []
        if len(value) <= MAX_SEALED_BYTES:
            plain = struct.pack(">i", -1 if key is None else len(key)) + (key or b"") + value
            aad = dead_letter_associated_data(topic, partition, offset)
            envelope = self.cipher.encrypt_bytes(plain, aad)
            headers.append((HEADER_ENVELOPE, envelope.model_dump_json().encode()))
        else:
            headers.append((HEADER_OMITTED, f"{len(value)} bytes, above the "
                            f"{MAX_SEALED_BYTES}-byte sealing limit; the source offset holds "
                            "it until retention".encode()))
        redacted = self.redact(value[:MAX_REDACTED_BYTES] if len(value) > MAX_REDACTED_BYTES
                               else value)
        if len(value) > MAX_REDACTED_BYTES:
            headers.append((HEADER_TRUNCATED, str(len(value)).encode()))
        return self.key_token(key), redacted, headers


def open_dead_letter(headers: list[tuple[str, bytes]] | None, cipher: FieldCipher
                     ) -> tuple[bytes | None, bytes]:
    """The original (key, value) of a dead letter, for an analyst holding the PII key.

    Raises :class:`app.security.envelope.DecryptionError` for a wrong key, a tampered
    envelope, or an envelope moved to another DLQ record, and KeyError when the record
    carries no sealed original.
    """
    h = {k: v for k, v in (headers or [])}
    envelope = PiiEnvelope.model_validate_json(h[HEADER_ENVELOPE])
    aad = dead_letter_associated_data(h["source.topic"].decode(),
                                      int(h["source.partition"]), int(h["source.offset"]))
    plain = cipher.decrypt_bytes(envelope, aad)
    (n,) = struct.unpack(">i", plain[:4])
    if n < 0:
        return None, plain[4:]
    return plain[4:4 + n], plain[4 + n:]
