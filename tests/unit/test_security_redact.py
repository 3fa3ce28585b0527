"""Dead letters: the value in clear is redacted, the original is sealed and recoverable."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.pipeline import DeadLetter, InputRecord, decode
from app.schemas import luhn_ok
from app.security.envelope import DecryptionError, FieldCipher
from app.security.redact import (
    HEADER_ENVELOPE,
    HEADER_OMITTED,
    MAX_SEALED_BYTES,
    Redactor,
    mask_pan,
    open_dead_letter,
    redact_bytes,
    redact_text,
)
from app.security.tokens import Tokenizer

PAN = "4539578763621486"  # Luhn-valid test number
PAN_15 = "378282246310005"
BAD_LUHN = PAN[:-1] + str((int(PAN[-1]) + 1) % 10)
VALID = {"transaction_id": "t1", "timestamp": "2026-03-01T12:30:00Z", "customer_id": "cust-77",
         "terminal_id": "T1", "amount": 12.5, "currency": "EUR", "card_number": PAN,
         "ip": "198.51.100.23", "device_id": "dev-9", "email": "jane.doe@example.org"}


def redactor() -> Redactor:
    return Redactor(Tokenizer(os.urandom(32)), FieldCipher({"k1": os.urandom(32)}, "k1"))


def test_text_redaction_masks_pans_emails_and_ips() -> None:
    text = (f"card {PAN} or {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]} or "
            f"{PAN_15.replace('3782', '3782-', 1)}; mail jane.doe@example.org from 10.1.2.3 "
            "and 2001:db8::42; at 12:30:00 on 2026-03-01, order 1234567890123 (not Luhn)")
    out = redact_text(text)
    for secret in (PAN, PAN[4:8] + " " + PAN[8:12], PAN_15[6:], "jane.doe", "10.1.2.3",
                   "2001:db8::42"):
        assert secret not in out
    assert mask_pan(PAN) in out and "453957******1486" in out
    assert "[email]" in out and out.count("[ip]") == 2
    assert "12:30:00" in out and "2026-03-01" in out
    assert ("1234567890123" in out) is not luhn_ok("1234567890123")


def test_json_dead_letters_lose_every_identifier_field() -> None:
    r = redactor()
    doc = {**VALID, "amount": -1, "card_number": BAD_LUHN, "notes": [f"paid with {PAN}"],
           "nested": {"pan": PAN, "ip_address": "192.0.2.1"}, "number_pan": int(PAN),
           "float_pan": float(PAN), PAN: "as a key"}
    out = r.redact(json.dumps(doc).encode())
    for secret in (PAN, BAD_LUHN, "cust-77", "dev-9", "198.51.100.23", "192.0.2.1", "jane.doe"):
        assert secret.encode() not in out, secret
    red = json.loads(out)
    assert red["card_number"] == "************" + BAD_LUHN[-4:]
    assert red["nested"]["pan"] == mask_pan(PAN) and red["number_pan"] == mask_pan(PAN)
    assert red["float_pan"] == mask_pan(PAN) and red[mask_pan(PAN)] == "as a key"
    assert red["customer_id"] == "tok:" + r.tokenizer.token("cust-77")
    assert red["amount"] == -1 and red["transaction_id"] == "t1"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_no_luhn_pan_survives_in_arbitrary_bytes(prefix: bytes, suffix: bytes) -> None:
    out = redactor().redact(prefix + b" " + PAN.encode() + b" " + suffix)
    assert PAN.encode() not in out


def test_scorer_dead_letters_are_sealed_and_open_only_for_their_position() -> None:
    r = redactor()
    raw = json.dumps({**VALID, "amount": "lots"}).encode()
    _, _, dead = decode([InputRecord(raw, b"cust-77", "transactions", 2, 41)], 4096)
    out = dead[0].to_output("transactions.dlq", r)
    headers = dict(out.headers or [])
    assert PAN.encode() not in out.value and b"cust-77" not in out.value
    assert out.key == r.tokenizer.token("cust-77").encode()
    assert b"amount" in headers["error.reason"] and PAN.encode() not in headers[HEADER_ENVELOPE]
    assert open_dead_letter(out.headers, r.cipher) == (b"cust-77", raw)

    moved = [(k, v) for k, v in out.headers or [] if k != "source.offset"]
    moved.append(("source.offset", b"42"))
    with pytest.raises(DecryptionError, match=r"another alert|tampered"):
        open_dead_letter(moved, r.cipher)
    with pytest.raises(DecryptionError):
        open_dead_letter(out.headers, FieldCipher({"k1": os.urandom(32)}, "k1"))


def test_huge_dead_letters_stay_bounded() -> None:
    r = redactor()
    raw = b'{"card_number":"' + PAN.encode() + b'","pad":"' + b"x" * (MAX_SEALED_BYTES + 10) + b'"}'
    rec = InputRecord(raw, None, "transactions", 0, 1)
    out = DeadLetter(rec, "decode", "too big").to_output("dlq", r)
    headers = dict(out.headers or [])
    assert HEADER_OMITTED in headers and HEADER_ENVELOPE not in headers
    assert len(out.value) <= 64 * 1024 and PAN.encode() not in out.value
    assert int(headers["value.truncated"]) == len(raw)
    small = DeadLetter(InputRecord(b"\xff\xfe" + PAN.encode(), None, "t", 0, 2), "decode", "x")
    out = small.to_output("dlq", r)
    assert PAN.encode() not in out.value and out.key is None
    assert open_dead_letter(out.headers, r.cipher) == (None, b"\xff\xfe" + PAN.encode())


def test_without_a_redactor_the_original_bytes_stay() -> None:
    assert redact_bytes(b"no secrets here") == b"no secrets here"
    rec = InputRecord(PAN.encode(), b"k", "t", 0, 0)
    assert DeadLetter(rec, "decode", "x").to_output("dlq").value == PAN.encode()
