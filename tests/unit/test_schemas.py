"""Transaction validation: what is accepted, what goes to the DLQ, and schema drift."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.pipeline import InputRecord, decode
from app.schemas import SCHEMA_DIR, Transaction, json_schemas, luhn_ok

VALID = {
    "transaction_id": "tx-1",
    "timestamp": "2026-03-01T12:30:00.250Z",
    "customer_id": "c-42",
    "terminal_id": "t-7",
    "amount": 12.5,
    "currency": "EUR",
}


def _luhn_complete(prefix: str) -> str:
    for d in "0123456789":
        if luhn_ok(prefix + d):
            return prefix + d
    raise AssertionError("unreachable")


def parse(**changes: object) -> Transaction:
    doc = {**VALID, **changes}
    doc = {k: v for k, v in doc.items() if v is not _DROP}
    return Transaction.model_validate_json(json.dumps(doc))


_DROP = object()


def test_valid_minimal_event_parses_to_utc() -> None:
    tx = parse(timestamp="2026-03-01T13:30:00+01:00")
    assert tx.timestamp == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert tx.amount == 12.5


def test_optional_fields_and_unknown_fields() -> None:
    pan = _luhn_complete("400000123456789")
    tx = parse(card_number=pan, country="BE", merchant_category="5411", channel="pos",
               device_id="dev-1", ip="192.0.2.10", extra_field={"ignored": True})
    assert tx.card_number == pan and tx.country == "BE"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("transaction_id", _DROP),
        ("customer_id", _DROP),
        ("amount", _DROP),
        ("timestamp", _DROP),
        ("amount", 0),
        ("amount", -5.0),
        ("amount", 1e10),
        ("amount", "12.50"),
        ("amount", None),
        ("customer_id", 42),
        ("currency", "euro"),
        ("timestamp", "2026-03-01T12:30:00"),  # no zone
        ("timestamp", "2026-03-01"),
        ("timestamp", "yesterday"),
        ("timestamp", 1767225600),  # epoch numbers are ambiguous
        ("timestamp", "2026-02-30T00:00:00Z"),
        ("transaction_id", ""),
        ("transaction_id", "x" * 129),
        ("country", "BEL"),
        ("ip", "999.1.1.1"),
    ],
)
def test_invalid_fields_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        parse(**{field: value})


def test_nan_and_infinite_amounts_are_rejected() -> None:
    for token in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        raw = json.dumps(VALID).replace("12.5", "AMOUNT").encode().replace(b"AMOUNT", token)
        with pytest.raises(ValidationError):
            Transaction.model_validate_json(raw)
    assert math.isinf(float("1e400"))


def test_luhn_failure_is_rejected_without_echoing_the_number() -> None:
    pan = _luhn_complete("400000123456789")
    bad = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    with pytest.raises(ValidationError) as info:
        parse(card_number=bad)
    assert "Luhn" in str(info.value)
    assert bad not in str(info.value)


def rec(value: bytes | None, offset: int = 0) -> InputRecord:
    return InputRecord(value, b"k", "transactions", 0, offset)


def test_decode_sends_every_kind_of_bad_input_to_the_dlq() -> None:
    good = json.dumps(VALID).encode()
    bad = [
        None,
        b"",
        b"not json",
        b"\xff\xfe\xfd",  # not UTF-8
        b"[1,2]",
        b"null",
        json.dumps({**VALID, "amount": -1}).encode(),
        json.dumps({**VALID, "timestamp": "2026-03-01T12:30:00"}).encode(),
        b'{"padding":"' + b"x" * (1024 * 1024) + b'"}',  # 1 MB
    ]
    txs, sources, dead = decode([rec(good, 0)] + [rec(b, i + 1) for i, b in enumerate(bad)],
                                max_bytes=64 * 1024)
    assert len(txs) == 1 and sources[0].offset == 0
    assert [d.record.offset for d in dead] == list(range(1, len(bad) + 1))
    reasons = [d.reason for d in dead]
    assert reasons[0] == "empty value" and reasons[1] == "empty value"
    assert "above the 65536-byte limit" in reasons[-1]
    assert "amount" in reasons[6]
    assert "timestamp" in reasons[7]


def test_dlq_headers_carry_the_source_and_keep_the_bytes() -> None:
    raw = b"\x00\x01garbage"
    _, _, dead = decode([rec(raw, 17)], max_bytes=1024)
    out = dead[0].to_output("transactions.dlq")
    headers = dict(out.headers or [])
    assert out.value == raw and out.key == b"k"
    assert headers["source.offset"] == b"17" and headers["error.stage"] == b"decode"
    assert headers["source.topic"] == b"transactions" and headers["error.reason"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_never_raises_and_accounts_for_every_record(value: bytes) -> None:
    txs, _, dead = decode([rec(value)], max_bytes=1024)
    assert len(txs) + len(dead) == 1


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(VALID)),
                       st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20))))
def test_decode_handles_arbitrary_field_values(doc: dict[str, object]) -> None:
    raw = json.dumps({**VALID, **doc}).encode()
    txs, _, dead = decode([rec(raw)], max_bytes=4096)
    assert len(txs) + len(dead) == 1


def test_committed_json_schemas_match_the_models() -> None:
    for name, text in json_schemas().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{path} missing: run `fraudscore schemas`"
        assert path.read_text() == text, f"{path} is stale: run `fraudscore schemas`"


def test_transaction_schema_requires_the_contract_fields() -> None:
    schema = json.loads((SCHEMA_DIR / "transaction.schema.json").read_text())
    assert set(schema["required"]) == {
        "transaction_id", "timestamp", "customer_id", "terminal_id", "amount", "currency"
    }


def test_events_from_the_future_are_dead_lettered() -> None:
    future = json.dumps({**VALID, "timestamp": "2999-01-01T00:00:00Z"}).encode()
    now = json.dumps({**VALID, "timestamp": datetime.now(UTC).isoformat()}).encode()
    txs, _, dead = decode([rec(future, 0), rec(now, 1)], max_bytes=4096, max_future_s=300)
    assert len(txs) == 1 and dead[0].record.offset == 0
    assert "in the future" in dead[0].reason


def _luhn_reference(digits: str) -> bool:
    """The textbook algorithm, digit by digit."""
    if len(digits) < 2 or not all(c in "0123456789" for c in digits):
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


@settings(max_examples=2000)
@given(st.text(alphabet="0123456789", max_size=22) | st.text(max_size=6))
def test_luhn_matches_the_textbook_algorithm(digits: str) -> None:
    assert luhn_ok(digits) == _luhn_reference(digits)
