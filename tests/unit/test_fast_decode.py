"""The msgspec batch path accepts only what the pydantic contract accepts, with equal values,
and it does take ordinary batches."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.fast_decode import _FIELDS, fast_transactions, luhn_all
from app.pipeline import InputRecord, decode
from app.schemas import Transaction, luhn_ok
from app.simulator import luhn_check_digits, simulate
from app.sources import transactions_to_json


def _pan(payload: str) -> str:
    """A test PAN: `payload` and its Luhn check digit."""
    digits = np.array([[int(c) for c in payload]])
    return payload + str(int(luhn_check_digits(digits)[0]))


PAN = _pan("400000000012345")  # test BIN, 16 digits
WRONG_CHECK = PAN[:-1] + str((int(PAN[-1]) + 1) % 10)
LONG_PAN = _pan("4" * 18)  # 19 digits


def _pick(*options: object) -> st.SearchStrategy[object]:
    return st.sampled_from(options)


# near-valid values per field: the valid forms, their edges and the usual mistakes
_TEXT = st.text(max_size=6) | st.text(alphabet="é𝔸\t\n \u2028\x1c@", max_size=4)
_STAMPS = _pick(
    "2026-01-01T00:00:00Z", "2026-01-01T00:00:00.1Z", "2026-01-01T00:00:00.123456Z",
    "2026-01-01T00:00:00.1234567Z", "2026-01-01T00:00:00.123456789Z",
    "2026-01-01t00:00:00z", "2026-01-01 00:00:00Z", "2026-01-01T00:00:00+01:30",
    "2026-01-01T00:00:00-23:59", "2026-01-01T00:00:00+24:00", "2026-01-01T00:00:00+05:75",
    "2026-02-29T00:00:00Z", "2024-02-29T12:00:00Z", "2026-04-31T00:00:00Z",
    "2026-01-01T23:59:60Z", "2026-01-01T24:00:00Z", "0001-01-01T00:00:00+01:00",
    "0000-01-01T00:00:00Z", "9999-12-31T23:59:59-01:00", "2026-01-01T00:00:00",
    "2026-01-01", "2026-01-01T00:00:00Z\n", "１０２６-01-01T00:00:00Z", 1767225600, None,
)
_AMOUNTS = st.floats(allow_nan=False, allow_infinity=False) | _pick(
    0, 1, 5, 1e9, 1e9 + 1e-6, 1000000000.0000001, 0.01, 5e-324, -0.0, 1e308, True, "5",
    None, 10**30, 999999999, 0.1 + 0.2)
_FIELD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "transaction_id": _pick("tx-1", "", "x" * 128, "x" * 129, 7, None) | _TEXT,
    "timestamp": _STAMPS,
    "customer_id": _pick("C1", "", "c" * 128, "c" * 129, 1.5) | _TEXT,
    "terminal_id": _pick("T1", "", "t" * 129, ["T1"]) | _TEXT,
    "amount": _AMOUNTS,
    "currency": _pick("EUR", "eur", "EURO", "EU", "E\u00c9R", None, "EUR\n") | _TEXT,
    "card_number": _pick(PAN, WRONG_CHECK, "79927398713", LONG_PAN + "0", "0" * 13,
                         "٤" + PAN[1:], int(PAN), None, PAN[:14] + "\n" + PAN[14:]),
    "merchant_category": _pick("5732", "573", "57321", "abcd", None, 5732),
    "channel": _pick("pos", "", "c" * 32, "c" * 33, None) | _TEXT,
    "country": _pick("BE", "be", "BEL", None, "B\n") | _TEXT,
    "device_id": _pick("dev-1", "", "d" * 128, "d" * 129, None) | _TEXT,
    "email": _pick("a@b", "a@b@c", "a b@c", "a\u2028@b", "a\x1c@b", "@b", "a@",
                   "x" * 250 + "@bcd", "x" * 251 + "@bcd", None) | _TEXT,
    "ip": _pick("10.0.0.1", "256.0.0.1", "01.2.3.4", "::1", "fe80::1%eth0", "2001:db8::",
                "1.2.3", "x" * 46, None, 167772161),
}


# valid values only, edges included: most generated objects are then accepted
_VALID: dict[str, st.SearchStrategy[object]] = {
    "transaction_id": _pick("tx-1", "x" * 128, "é𝔸", "a b"),
    "timestamp": _pick("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.1Z",
                       "2026-01-01T00:00:00.123456Z", "2026-01-01T00:00:00+01:30",
                       "2024-02-29T12:00:00-23:59", "9999-12-31T23:59:59+00:00",
                       "0001-01-01T00:00:00Z", "2026-01-01t00:00:00z"),
    "customer_id": _pick("C1", "c" * 128),
    "terminal_id": _pick("T1", "t" * 128),
    "amount": _pick(1, 5, 1e9, 0.01, 5e-324, 999999999, 0.1 + 0.2, 89.45)
    | st.floats(min_value=5e-324, max_value=1e9),
    "currency": _pick("EUR", "USD"),
    "card_number": _pick(PAN, LONG_PAN, None),
    "merchant_category": _pick("5732", None),
    "channel": _pick("pos", "c" * 32, None),
    "country": _pick("BE", None),
    "device_id": _pick("dev-1", "d" * 128, None),
    "email": _pick("a@b", "x" * 250 + "@bcd", "é@𝔸", None),
    "ip": _pick("10.0.0.1", "::1", "fe80::1%eth0", "2001:db8::", None),
}


@st.composite
def transaction_json(draw: st.DrawFn) -> bytes:
    doc: dict[str, object] = {}
    mostly_valid = draw(st.booleans())
    for name in _FIELDS:
        if draw(st.integers(0, 9)) == 0 and not mostly_valid:
            continue  # missing
        valid = mostly_valid and draw(st.integers(0, 19)) > 0
        doc[name] = draw(_VALID[name] if valid else _FIELD_VALUES[name])
    if draw(st.booleans()):
        doc["extra"] = draw(_pick(1, "}", [1, {"a": None}], "note"))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), separators=(",", ":"))
    if draw(st.integers(0, 15)) == 0 and "amount" in doc:  # a repeated key: the last wins
        text = text[:-1] + ',"amount":7}'
    return text.encode()


def _same(fast: object, ref: Transaction) -> None:
    for name in _FIELDS:
        got, want = getattr(fast, name), getattr(ref, name)
        assert got == want, (name, got, want)
        assert type(got) is type(want), name
    assert fast.timestamp.utcoffset().total_seconds() == 0  # type: ignore[attr-defined]
    assert math.copysign(1, fast.amount) == 1  # type: ignore[attr-defined]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(transaction_json(), min_size=1, max_size=4))
def test_accepts_only_what_the_contract_accepts_with_equal_values(batch: list[bytes]) -> None:
    items = fast_transactions(batch)
    if items is None:
        return
    assert len(items) == len(batch)
    for value, item in zip(batch, items, strict=True):
        try:
            ref = Transaction.model_validate_json(value)
        except ValidationError as exc:
            raise AssertionError(f"fast path accepted {value!r}: {exc}") from None
        _same(item, ref)


@settings(max_examples=300, deadline=None)
@given(st.lists(transaction_json(), min_size=1, max_size=6))
def test_decode_gives_the_same_outcome_on_either_path(batch: list[bytes]) -> None:
    """decode() with the fast path on equals the contract applied value by value."""
    records = [InputRecord(v, None, "transactions", 0, i) for i, v in enumerate(batch)]
    items, sources, dead = decode(records, 10_000, Transaction)
    want_ok = []
    for rec in records:
        with contextlib.suppress(ValidationError):
            want_ok.append((rec.offset, Transaction.model_validate_json(rec.value or b"")))
    assert [s.offset for s in sources] == [o for o, _ in want_ok]
    for item, (_, ref) in zip(items, want_ok, strict=True):
        _same(item, ref)
    assert len(dead) == len(records) - len(want_ok)


def test_ordinary_batches_take_the_fast_path() -> None:
    tx, _ = simulate(customers=50, terminals=100, days=3, seed=3)
    values = transactions_to_json(tx)
    items = fast_transactions(values)
    assert items is not None and len(items) == len(values)
    for value, item in zip(values, items, strict=True):
        _same(item, Transaction.model_validate_json(value))


def test_accepts_valid_edge_values() -> None:
    doc = {"transaction_id": "x" * 128, "timestamp": "2024-02-29T12:00:00.5-23:59",
           "customer_id": "é𝔸", "terminal_id": "T1", "amount": 1e9, "currency": "EUR",
           "card_number": PAN, "email": "x" * 250 + "@bcd", "ip": "fe80::1%eth0",
           "channel": "c" * 32, "unknown": [1, [2, "x"]]}
    value = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    items = fast_transactions([value, value])
    assert items is not None
    _same(items[0], Transaction.model_validate_json(value))


def test_declines_what_it_cannot_vouch_for() -> None:
    ok = (b'{"transaction_id":"t","timestamp":"2026-01-01T00:00:00Z","customer_id":"c",'
          b'"terminal_id":"x","amount":5,"currency":"EUR"}')
    assert fast_transactions([ok]) is not None
    for bad in (ok.replace(b'"t"', b'"t\\u00e9"'),  # an escape: pydantic decides
                ok.replace(b"00Z", b"00.1234567Z"),  # more than 6 fraction digits
                ok.replace(b'"EUR"', b'"EUR","n":"}"'),  # a "}" inside a value
                ok.replace(b"5,", b"0,"), b"", b"[]", b"{}"):
        assert fast_transactions([ok, bad]) is None, bad
    assert fast_transactions([]) is None


@given(st.lists(st.text(alphabet="0123456789", min_size=1, max_size=25), max_size=8))
def test_luhn_over_a_column_equals_luhn_per_card(cards: list[str]) -> None:
    want = all(luhn_ok(c) for c in cards if len(c) >= 2)
    assert luhn_all([c for c in cards if len(c) >= 2]) == want
    for card in cards:
        if len(card) >= 2:
            assert luhn_all([card]) == luhn_ok(card)


def test_fields_follow_the_contract() -> None:
    """A field added to `Transaction` must be added here too, or the fast path would
    drop it unvalidated."""
    assert list(_FIELDS) == list(Transaction.model_fields)


def test_hostile_values_are_declined_and_dead_lettered_not_raised() -> None:
    """Nesting deeper than msgspec follows raised RecursionError (a worker crash)."""
    ok = (b'{"transaction_id":"t","timestamp":"2026-01-01T00:00:00Z","customer_id":"c",'
          b'"terminal_id":"x","amount":5,"currency":"EUR"')
    hostile = [ok + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}",  # deep nesting
               ok.replace(b"5,", b"1" + b"0" * 5000 + b",") + b"}",  # a 5,001-digit amount
               ok.replace(b'"t"', b'"' + b"a" * 9000 + b'"') + b"}"]  # a 9,000-char id
    for value in hostile:
        assert fast_transactions([value, ok + b"}"]) is None
        records = [InputRecord(value, None, "transactions", 0, 0),
                   InputRecord(ok + b"}", None, "transactions", 0, 1)]
        _, sources, dead = decode(records, 100_000, Transaction)
        assert [s.offset for s in sources] == [1] and [d.record.offset for d in dead] == [0]
