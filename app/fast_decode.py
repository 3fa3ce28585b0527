"""Transactions decoded a batch at a time with msgspec: the decode stage's fast path.

`app.schemas.Transaction` (pydantic) is the contract and the reference. Its per-field
checks cost some 17 µs per event, most of it regular expressions and Python validators
run one value at a time. Here msgspec parses the batch's JSON into plain typed objects
(about 1.6 µs per event), then each constrained column is checked in one call over the
whole column: one regular expression over the column's values joined by newlines, lengths
by ``map(len)``, amounts in numpy.

This path only ever accepts: any value it cannot vouch for makes it decline the whole
batch (:func:`fast_transactions` returns None), and the caller validates with pydantic,
whose results and dead-letter reasons are unchanged. It declines, among others, any
backslash escape, timestamps outside the plain RFC 3339 form (``T``, ``Z`` or ``±hh:mm``,
at most 6 fraction digits) and anything msgspec refuses. What it accepts, pydantic accepts
too, with equal values (`tests/unit/test_fast_decode.py` compares them on generated
input).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np

from app.schemas import _check_ip


class FastTransaction(msgspec.Struct, gc=False):
    """Field for field what `Transaction` holds once validated; `timestamp` is decoded as
    the raw string and replaced by its UTC datetime once the column passed."""

    transaction_id: str
    timestamp: Any
    customer_id: str
    terminal_id: str
    amount: float
    currency: str
    card_number: str | None = None
    merchant_category: str | None = None
    channel: str | None = None
    country: str | None = None
    device_id: str | None = None
    email: str | None = None
    ip: str | None = None


_FIELDS = tuple(FastTransaction.__struct_fields__)
_COLUMNS = attrgetter(*_FIELDS)
_DECODER = msgspec.json.Decoder(list[FastTransaction])

# A column passes when its values joined by "\n" (one after each) match `(?:P\n)*` for
# the field's pattern P, and it holds exactly one "\n" per value (none inside a value).
# Each P is at least as strict as the contract's: ASCII digits ([0-9], not \d); for
# e-mail Python's \s, a superset of the Rust regex \s that pydantic uses.
_TS = (r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])T(?:[01][0-9]|2[0-3])"
       r":[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])")
_PATTERNS = {
    "timestamp": _TS,
    "currency": r"[A-Z]{3}",
    "card_number": r"[0-9]{12,19}",
    "merchant_category": r"[0-9]{4}",
    "country": r"[A-Z]{2}",
    "email": r"[^@\s]+@[^@\s]+",
}
_COLUMN_RE = {name: re.compile(rf"(?:{p}\n)*") for name, p in _PATTERNS.items()}
# (min, max) characters, as the contract's Field(min_length, max_length)
_LENGTHS = {"transaction_id": (1, 128), "customer_id": (1, 128), "terminal_id": (1, 128),
            "channel": (1, 32), "device_id": (1, 128), "email": (0, 254), "ip": (0, 45)}


def _matches(name: str, values: Sequence[str]) -> bool:
    text = "\n".join(values) + "\n"
    return text.count("\n") == len(values) and _COLUMN_RE[name].fullmatch(text) is not None


def _lengths_ok(values: Sequence[str], low: int, high: int) -> bool:
    sizes = list(map(len, values))
    return min(sizes) >= low and max(sizes) <= high


_DOUBLED = np.array([0, 2, 4, 6, 8, 1, 3, 5, 7, 9], dtype=np.int64)  # 2·d, digits summed


def luhn_all(cards: Sequence[str]) -> bool:
    """`app.schemas.luhn_ok` of every card, in numpy over the column; the cards must be
    non-empty ASCII digit strings already (the column's pattern checked that)."""
    if not cards:
        return True
    digits = np.frombuffer("".join(cards).encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    lengths = np.fromiter(map(len, cards), dtype=np.int64, count=len(cards))
    ends = np.cumsum(lengths)
    from_right = np.repeat(ends, lengths) - 1 - np.arange(len(digits))
    d = np.where(from_right % 2 == 1, _DOUBLED[digits], digits)
    return bool(np.all(np.add.reduceat(d, ends - lengths) % 10 == 0))


def fast_transactions(values: Sequence[bytes]) -> list[FastTransaction] | None:
    """The batch's transactions, validated as `Transaction` would, or None when this path
    cannot vouch for every value (the caller then validates with pydantic)."""
    n = len(values)
    if n == 0:
        return None
    joined = b",".join(values)
    # each value one JSON object whose only "}" is its last byte: the array's elements
    # are then exactly the values (see app.pipeline._validate_together); no escapes
    if (joined.count(b"}") != n or b"\\" in joined
            or not all(v[:1] == b"{" and v[-1:] == b"}" for v in values)):
        return None
    try:
        items = _DECODER.decode(b"[" + joined + b"]")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None  # RecursionError: nesting deeper than msgspec follows (hostile input)
    if len(items) != n:
        return None
    columns = dict(zip(_FIELDS, zip(*map(_COLUMNS, items), strict=True), strict=True))
    stamps = columns["timestamp"]
    if not all(type(s) is str for s in stamps) or not _matches("timestamp", stamps):
        return None
    amount = np.fromiter(columns["amount"], dtype=np.float64, count=n)
    if not bool(np.all((amount > 0) & (amount <= 1e9))):  # False for NaN and inf too
        return None
    for name, (low, high) in _LENGTHS.items():
        present = [v for v in columns[name] if v is not None]
        if present and not _lengths_ok(present, low, high):
            return None
    for name in _PATTERNS:
        present = [v for v in columns[name] if v is not None]
        if present and name != "timestamp" and not _matches(name, present):
            return None
    if not luhn_all([v for v in columns["card_number"] if v is not None]):
        return None
    try:
        for ip in columns["ip"]:
            if ip is not None:
                _check_ip(ip)
        utc = [datetime.fromisoformat(s).astimezone(UTC) for s in stamps]
    except (ValueError, OverflowError):  # no such day, or out of datetime's range
        return None
    for item, when in zip(items, utc, strict=True):
        item.timestamp = when
    return items
