"""The batched pipeline stages give exactly what the one-row-at-a-time reference gives.

decode validates a batch in one pydantic call; pseudonymise/label_batch build columns in one
pass; the `scores` values are serialised column by column. Each is checked here against the
straightforward per-row code it replaced: same items, same dead letters and reasons, same
columns, same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import pickle
import types
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app import pipeline
from app.fast_decode import FastTransaction
from app.pipeline import (
    STAGE_DECODE,
    InputRecord,
    Output,
    Scorer,
    Topics,
    _describe,
    _score_values,
    _validate_together,
    decode,
    label_batch,
    pseudonymise,
)
from app.schemas import Label, ScoreRecord, Transaction, luhn_ok
from app.security.tokens import Tokenizer, equality_keys
from features.windows import country_keys, terminal_hash
from models.runtime import Scores

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def luhn_complete(prefix: str) -> str:
    """A generated test card number: `prefix` plus its Luhn check digit."""
    return next(prefix + d for d in "0123456789" if luhn_ok(prefix + d))


PANS = [luhn_complete(f"40000000000{n:04d}") for n in (11, 22, 33)]
BAD_PAN = PANS[0][:-1] + str((int(PANS[0][-1]) + 1) % 10)


def tx_doc(i: int, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "transaction_id": f"tx-{i}",
        "timestamp": f"2026-03-01T12:{i % 60:02d}:00.{i % 1000:03d}Z",
        "customer_id": f"c-{i % 7}",
        "terminal_id": f"t-{i % 5}",
        "amount": 10.5 + i,
        "currency": "EUR",
    }
    if i % 2:
        doc.update(card_number=PANS[i % 3], country="BE", channel="pos",
                   merchant_category="5411")
    if i % 3 == 0:
        doc.update(device_id=f"dev-{i % 4}", ip=f"10.0.0.{i % 250}", email=f"u{i}@example.org")
    doc.update(changes)
    return doc


def good(i: int, **changes: object) -> bytes:
    return json.dumps(tx_doc(i, **changes), separators=(",", ":")).encode()


def recs(values: list[bytes | None], topic: str = "transactions") -> list[InputRecord]:
    return [InputRecord(v, b"k", topic, 0, i) for i, v in enumerate(values)]


def reference_decode(records, max_bytes, model=Transaction, max_future_s=0.0):  # type: ignore[no-untyped-def]
    """The per-record decode the batched one replaced (verbatim semantics)."""
    latest = datetime.now(UTC) + timedelta(seconds=max_future_s) if max_future_s > 0 else None
    txs, sources, dead = [], [], []
    for rec in records:
        if not rec.value:
            dead.append((rec.offset, "empty value"))
            continue
        if len(rec.value) > max_bytes:
            dead.append((rec.offset, f"value is {len(rec.value)} bytes, above the "
                                     f"{max_bytes}-byte limit"))
            continue
        try:
            item = model.model_validate_json(rec.value)
        except ValidationError as exc:
            dead.append((rec.offset, _describe(exc)))
            continue
        if latest is not None and item.timestamp > latest:
            dead.append((rec.offset, f"timestamp: more than {max_future_s:g}s in the future"))
            continue
        txs.append(item)
        sources.append(rec.offset)
    return txs, sources, dead


def assert_same_as_reference(values: list[bytes | None], max_bytes: int = 4096,
                             model: type = Transaction, max_future_s: float = 0.0) -> None:
    records = recs(values)
    txs, sources, dead = decode(records, max_bytes, model, max_future_s)
    ref_txs, ref_sources, ref_dead = reference_decode(records, max_bytes, model, max_future_s)
    # transactions may come from the msgspec batch path: equal field by field
    names = list(model.model_fields)
    assert [[getattr(t, f) for f in names] for t in txs] == \
        [[getattr(t, f) for f in names] for t in ref_txs]
    assert all(type(t) in (model, FastTransaction) for t in txs)
    assert [s.offset for s in sources] == ref_sources
    assert [(d.record.offset, d.reason) for d in dead] == ref_dead
    assert all(d.stage == STAGE_DECODE for d in dead)
    assert len(txs) + len(dead) == len(records)


# ---- decode --------------------------------------------------------------------------------


def test_a_clean_batch_is_validated_in_one_call() -> None:
    values = [good(i) for i in range(40)]
    together = _validate_together(values, Transaction)
    assert all(item is not None for item in together)
    assert together == [Transaction.model_validate_json(v) for v in values]
    assert_same_as_reference(values)


def test_bad_records_keep_their_reasons_and_good_neighbours_pass() -> None:
    values: list[bytes | None] = [
        good(0), None, b"", b"not json", b"\xff\xfe\xfd", b"[1,2]", b"null", good(1),
        good(2, amount=-1), good(3, timestamp="2026-03-01T12:30:00"),
        good(4, card_number=BAD_PAN),  # Luhn
        good(5, ip="999.1.1.1"), b'{"a":1}', good(6, currency="eur", amount="x"),
        b'{"padding":"' + b"x" * 5000 + b'"}', good(7), b"  " + good(8) + b"\n", good(9),
        good(10, terminal_id="T}1"), good(11, extra={"nested": 1}), good(12, extra=[1, 2]),
        b'{"transaction_id":"tx-13",}', good(14),
    ]
    assert_same_as_reference(values)
    txs, _, dead = decode(recs(values), 4096)
    assert [t.transaction_id for t in txs] == [
        "tx-0", "tx-1", "tx-7", "tx-8", "tx-9", "tx-10", "tx-11", "tx-12", "tx-14"]
    assert "amount" in dead[6].reason and "card number" in dead[8].reason


def test_luhn_failures_and_utc_offsets_in_a_batch_keep_the_reference_outcome() -> None:
    """A failing card number among good neighbours gets Transaction's own reason, a +02:00
    time its UTC value, in the one-call batch path as one by one."""
    bad_pan = PANS[0][:-1] + str((int(PANS[0][-1]) + 1) % 10)
    values: list[bytes | None] = [
        good(1), good(3, card_number=bad_pan), good(4, timestamp="2026-03-01T14:05:00+02:00"),
        good(5), good(6, card_number="4" * 19), good(7, timestamp="2026-03-01T12:00:00-00:00")]
    assert_same_as_reference(values)
    txs, _, dead = decode(recs(values), 4096)
    assert [d.record.offset for d in dead] == [1, 4]
    assert all("Luhn" in d.reason for d in dead)
    assert txs[1].timestamp == datetime(2026, 3, 1, 12, 5, tzinfo=UTC)


def test_a_syntax_error_anywhere_falls_back_to_one_by_one() -> None:
    for bad in (b'{"a":1', b'{"a" 1}', b'{"a":"\xff"}', b'{"a":1}}', b"{}}", b"{"):
        values = [good(0), bad, good(1)]
        assert_same_as_reference(values)
        txs, _, dead = decode(recs(values), 4096)
        assert len(txs) == 2 and [d.record.offset for d in dead] == [1]


# Values crafted to change how their neighbours parse once joined into one JSON array.
INJECTIONS = [
    b"1],[2",
    b'1],[{"a":1}',
    b'{"a":1}],[{"b":2}',
    b'{"a":1},{"b":2}',  # two objects in one value
    b'{"a":1} {"b":2}',
    b'{"a":1}garbage',
    b'{"x":"}',  # leaves a string open: swallows the next value's start
    b'{"x":[{"y":1}',  # leaves an array open
    b'{"x":[1}',
    b'{"x":1,"y":{"z":1}',
    b'1]}',
    b']}',
    b'"}',
    b'{"x":"\\"}',
    b"}",
    b"{",
    b",",
    b"]",
]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_a_value_cannot_change_how_its_neighbours_parse(bad: bytes) -> None:
    for values in ([good(0), bad, good(1)], [bad, good(0)], [good(0), bad],
                   [good(0), bad, bad, good(1), bad, good(2)]):
        assert_same_as_reference(values)  # type: ignore[arg-type]


def test_merged_values_that_validate_together_are_caught_by_the_count() -> None:
    # {"x":"} leaves a string open; the next value closes it and completes a valid
    # transaction, so together they parse as ONE valid element of the array.
    fields = good(5)[1:]  # '"transaction_id":...}' without the opening brace
    opener, closer = b'{"x":"}', b'{","y":1,' + fields
    joined = json.loads(b"[" + opener + b"," + closer + b"]")
    assert len(joined) == 1 and Transaction.model_validate(joined[0]).transaction_id == "tx-5"
    values = [good(0), opener, closer, good(1)]
    assert_same_as_reference(values)
    assert _validate_together(values, Transaction) == [None] * 4  # count differs: no verdict
    txs, _, dead = decode(recs(values), 4096)
    assert [t.transaction_id for t in txs] == ["tx-0", "tx-1"]
    assert [d.record.offset for d in dead] == [1, 2]

    # A merged pair and a value holding two transactions would even out the count (and all
    # four elements validate): the two-transaction value holds a second "}", so it never
    # joins the array.
    split = good(8) + b"," + good(9)
    values = [opener, closer, split, good(1)]
    assert len(json.loads(b"[" + b",".join(values) + b"]")) == len(values)
    assert_same_as_reference(values)
    assert _validate_together(values, Transaction) == [None] * 4


def test_items_with_validation_errors_are_retried_without_them() -> None:
    values = [good(i) if i % 4 else good(i, amount=0) for i in range(20)]
    together = _validate_together(values, Transaction)
    assert [item is None for item in together] == [i % 4 == 0 for i in range(20)]
    assert_same_as_reference(values)


def test_future_events_and_labels() -> None:
    now = datetime.now(UTC).isoformat()
    values = [good(0, timestamp="2999-01-01T00:00:00Z"), good(1, timestamp=now), None,
              good(2, timestamp="2999-01-01T00:00:00Z"), good(3, timestamp=now)]
    assert_same_as_reference(values, max_future_s=300)
    _, sources, dead = decode(recs(values), 4096, max_future_s=300)
    assert [s.offset for s in sources] == [1, 4] and [d.record.offset for d in dead] == [0, 2, 3]

    labels = [json.dumps({"transaction_id": f"tx-{i}", "customer_id": "c", "terminal_id": "t",
                          "timestamp": "2026-03-01T12:00:00Z", "is_fraud": i % 2 == 0,
                          "reported_at": "2026-03-02T12:00:00+02:00"}).encode()
              for i in range(5)]
    labels[2] = labels[2].replace(b"false", b'"no"').replace(b"true", b'"no"')
    assert_same_as_reference([*labels, b"{}", good(0)], model=Label)


def test_too_large_values_never_reach_the_parser() -> None:
    values = [good(0), good(1, padding="y" * 500), good(2)]
    assert_same_as_reference(values, max_bytes=400)


FRAGMENTS = [*INJECTIONS, b'{"x":"},{', b'{","a":1}', b'{"a":[', b'[{"a":1}]', b'"s"',
             b"{}", b'{"a":"}"}', b'{"a":"\\u007d"}', b" ", b"\n", b"\xff", b"0", b"-"]


@st.composite
def batches(draw: st.DrawFn) -> list[bytes | None]:
    out: list[bytes | None] = []
    for i in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 5))
        if kind <= 1:
            out.append(good(i))
        elif kind == 2:
            out.append(draw(st.sampled_from(FRAGMENTS)))
        elif kind == 3:  # a good record's own bytes, cut and glued to a fragment
            raw = good(i)
            cut = draw(st.integers(0, len(raw)))
            piece = draw(st.sampled_from(FRAGMENTS))
            out.append(raw[:cut] + piece if draw(st.booleans()) else piece + raw[cut:])
        elif kind == 4:
            key = draw(st.sampled_from(sorted(tx_doc(i))))
            value = draw(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=8)))
            out.append(good(i, **{key: value}))
        else:
            out.append(draw(st.one_of(st.none(), st.binary(max_size=40))))
    return out


@settings(max_examples=300, deadline=None)
@given(batches())
def test_decode_equals_the_one_by_one_reference(values: list[bytes | None]) -> None:
    assert_same_as_reference(values)


# ---- pseudonymise / label_batch / tokens ---------------------------------------------------


def test_tokens_equal_hmac_sha256_for_every_key_length() -> None:
    for n in (16, 32, 63, 64, 65, 128):
        key = os.urandom(n)
        tokenizer = Tokenizer(key)
        for value in ("", "c-1", "é€😀", "x" * 200):
            expected = hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]
            assert tokenizer.token(value) == expected
        assert tokenizer.tokens(["c-1", None, float("nan"), "c-1"]) == [
            tokenizer.token("c-1"), None, None, tokenizer.token("c-1")]
        assert pickle.loads(pickle.dumps(tokenizer)).token("c-9") == tokenizer.token("c-9")


def test_token_memo_stays_bounded_and_exact() -> None:
    key = os.urandom(32)
    tokenizer = Tokenizer(key, memo_size=5)
    values = [f"c-{i % 23}" for i in range(200)]
    for _ in range(3):  # the memo fills, empties and refills: tokens never change
        assert tokenizer.tokens(values) == [
            hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:32] for v in values]
        assert len(tokenizer._memo) <= 5 + 23  # at most one batch's values past the bound
    assert pickle.loads(pickle.dumps(tokenizer))._memo == {}


def test_pseudonymise_equals_the_per_row_reference() -> None:
    txs = [Transaction.model_validate_json(good(i)) for i in range(30)]
    tokenizer = Tokenizer(os.urandom(32))
    batch = pseudonymise(txs, tokenizer)
    cards = [c or "" for c in tokenizer.tokens(t.customer_id for t in txs)]
    terminals = np.array([t.terminal_id for t in txs], dtype=object)
    ev = batch.events
    assert list(ev.transaction_ids) == [t.transaction_id for t in txs]
    assert list(ev.cards) == cards == batch.customer_tokens
    assert ev.terminals.dtype == object and ev.terminals.tolist() == terminals.tolist()
    np.testing.assert_array_equal(ev.terminal_keys, terminal_hash(terminals))
    assert ev.t_us.dtype == np.int64 and ev.t_us.tolist() == [
        (t.timestamp - EPOCH) // US for t in txs]
    assert ev.amount.dtype == np.float64 and ev.amount.tolist() == [t.amount for t in txs]
    np.testing.assert_array_equal(
        ev.device, equality_keys(tokenizer.tokens(t.device_id for t in txs)))
    assert ev.device.dtype == np.uint32 and ev.country.dtype == np.uint32
    np.testing.assert_array_equal(
        ev.country, country_keys(np.array([t.country for t in txs], dtype=object)))
    assert list(batch.event_times) == [t.timestamp for t in txs]
    pii = [{"customer_id": t.customer_id, "card_number": t.card_number,
            "device_id": t.device_id, "ip": t.ip, "email": t.email} for t in txs]
    assert batch.pii == pii and [batch.pii_of(i) for i in range(30)] == pii
    assert batch.transaction_ids == [t.transaction_id for t in txs]
    assert batch.terminal_ids == [t.terminal_id for t in txs]
    assert "card_number" not in repr(batch) and PANS[1] not in repr(batch)


def test_label_batch_equals_the_per_row_reference() -> None:
    labels = [Label(transaction_id=f"tx-{i}", customer_id=f"c-{i % 3}", terminal_id=f"t-{i}",
                    timestamp=datetime(2026, 3, 1, 12, i, 0, 1234 * i, tzinfo=UTC),
                    is_fraud=i % 2 == 0,
                    reported_at=datetime(2026, 3, 2, tzinfo=timezone(timedelta(hours=2))))
              for i in range(9)]
    tokenizer = Tokenizer(os.urandom(32))
    lb = label_batch(labels, tokenizer)
    assert list(lb.transaction_ids) == [x.transaction_id for x in labels]
    assert list(lb.cards) == [tokenizer.token(x.customer_id) for x in labels]
    assert list(lb.terminals) == [x.terminal_id for x in labels]
    assert lb.t_us.dtype == np.int64 and lb.t_us.tolist() == [
        (x.timestamp - EPOCH) // US for x in labels]
    assert lb.reported_us.tolist() == [(x.reported_at - EPOCH) // US for x in labels]
    assert lb.is_fraud.dtype == bool and lb.is_fraud.tolist() == [x.is_fraud for x in labels]
    empty = label_batch([], tokenizer)
    assert len(empty.transaction_ids) == 0 and empty.t_us.dtype == np.int64


# ---- score values --------------------------------------------------------------------------

ODD = [0.0, 1.0, -0.0, 0.5, 1 / 3, 0.1 + 0.2, 1e-7, 5e-324, 2.2250738585072014e-308,
       0.9999999999999999, 1e-300, 0.123456789012345678]
ANOMALY = [float("nan"), float("inf"), -float("inf"), -1.5, 1e300, 1e16, 123456789.0, 0.0,
           -0.0, 2.5e-5, 0.1, 7.0]
STRINGS = ["tx-1", "", 'q"uote', "back\\slash", '","', '\\","', 'a\\",', "tab\there",
           "nl\n", "\x00\x1f\x7f", "é€😀\u2028", "{}[],:", "x" * 128, "%s%b"]


def reference_score(row: int, tx_ids, event_times, scored_at, tokens, terminals,  # type: ignore[no-untyped-def]
                    scores, decisions, version, fail_open, shadow_version, shadow) -> bytes:
    return ScoreRecord(
        transaction_id=tx_ids[row], event_time=event_times[row], scored_at=scored_at,
        customer_token=tokens[row], terminal_id=terminals[row],
        fraud_score=float(scores.fraud[row]), anomaly_score=float(scores.anomaly[row]),
        decision=str(decisions[row]), model_version=version, fail_open=fail_open,
        shadow_model_version=shadow_version,
        shadow_fraud_score=float(shadow[row]) if shadow is not None else None,
    ).model_dump_json().encode()


def check_scores(tx_ids: list[str], terminals: list[str], fraud: np.ndarray,
                 anomaly: np.ndarray, decisions: np.ndarray, shadow: np.ndarray | None,
                 fail_open: bool, event_times: list[datetime] | None = None,
                 version: str = "fs-1", shadow_version: str | None = "fs-0") -> list[bytes]:
    n = len(tx_ids)
    tokens = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(n)]
    if event_times is None:
        event_times = [datetime(2026, 3, 1, tzinfo=UTC) + timedelta(microseconds=7 ** i % 10**9)
                       for i in range(n)]
    scored_at = datetime.now(UTC)
    scores = Scores(fraud, anomaly, fraud)
    shadow_version = shadow_version if shadow is not None else None
    args = (tx_ids, event_times, scored_at, tokens, terminals, scores, decisions, version,
            fail_open, shadow_version, shadow)
    got = _score_values(*args)
    assert got == [reference_score(row, *args) for row in range(n)]
    return got


@pytest.mark.parametrize("fail_open", [False, True])
@pytest.mark.parametrize("with_shadow", [False, True])
def test_score_values_are_byte_identical_to_the_model(fail_open: bool, with_shadow: bool) -> None:
    n = len(ODD)
    shadow = np.array(ANOMALY[::-1]) if with_shadow else None
    decisions = np.array(["allow", "review", "block"] * (n // 3))
    tx_ids = [f"tx-{i}" for i in range(n)]
    terminals = [f"T{i:06d}" for i in range(n)]
    got = check_scores(tx_ids, terminals, np.array(ODD), np.array(ANOMALY), decisions, shadow,
                       fail_open)
    doc = json.loads(got[2])  # fraud -0.0, anomaly -inf
    assert doc["fail_open"] is fail_open and doc["anomaly_score"] is None
    assert b'"fraud_score":-0.0,' in got[2] and math.copysign(1.0, doc["fraud_score"]) == -1.0
    assert (doc["shadow_model_version"] == "fs-0") is with_shadow
    # odd strings, each in turn, and all of them together
    m = len(STRINGS)
    for i in range(m):
        ids = [f"tx-{j}" for j in range(m)]
        ids[i] = STRINGS[i]
        check_scores(ids, ids[::-1], np.full(m, 0.25), np.zeros(m), np.array(["allow"] * m),
                     np.resize(shadow, m) if shadow is not None else None, fail_open)
    check_scores(STRINGS, STRINGS[::-1], np.linspace(0, 1, m), np.linspace(-1, 1, m),
                 np.array(["block"] * m), None, fail_open)


def test_score_values_other_dtypes_times_and_versions() -> None:
    n = 6
    ids = [f"tx-{i}" for i in range(n)]
    f32 = np.array([0.1, 0.2, 0.3, 0.7, 0.0, 1.0], dtype=np.float32)
    decisions = np.array(["allow"] * n, dtype=object)
    times = [datetime(2026, 3, 1, 12, 0, 0, 0, tzinfo=UTC),
             datetime(2026, 3, 1, 12, 0, 0, 500000, tzinfo=UTC),
             datetime(2026, 3, 1, 13, 0, 0, 1, tzinfo=timezone(timedelta(hours=1))),
             datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
             datetime(1970, 1, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))]
    check_scores(ids, ids, f32, f32.astype(np.float16), decisions, f32, False, times)
    check_scores(ids, ids, f32.astype(np.float64), np.arange(n), decisions, None, True, times,
                 version='v"%1\\', shadow_version=None)
    check_scores(ids[:1], ids[:1], np.array([0.5]), np.array([0.5]), np.array(["review"]),
                 None, False)
    assert _score_values([], [], datetime.now(UTC), [], [], Scores(np.empty(0), np.empty(0),
                         np.empty(0)), np.empty(0, dtype=str), "v", False, None, None) == []


@pytest.mark.parametrize("fraud, decision", [
    (float("nan"), "allow"), (1.5, "allow"), (-0.1, "allow"), (float("inf"), "block"),
    (0.5, "maybe"),
])
def test_values_the_model_rejects_still_raise_its_error(fraud: float, decision: str) -> None:
    n = 3
    args = ([f"tx-{i}" for i in range(n)], [datetime.now(UTC)] * n, datetime.now(UTC),
            ["tok"] * n, ["t"] * n, Scores(np.array([0.2, fraud, 0.3]), np.zeros(n), np.zeros(n)),
            np.array(["allow", decision, "allow"]), "v1", False, None, None)
    with pytest.raises(ValidationError) as got:
        _score_values(*args)
    with pytest.raises(ValidationError) as expected:
        [reference_score(row, *args) for row in range(n)]
    assert got.value.errors(include_url=False, include_input=False) == \
        expected.value.errors(include_url=False, include_input=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=6),
                          st.floats(0.0, 1.0), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from(["allow", "review", "block"])),
                min_size=1, max_size=12),
       st.booleans(), st.booleans())
def test_score_values_match_the_model_for_any_strings_and_floats(
        rows: list[tuple[str, str, float, float, str]], fail_open: bool, with_shadow: bool
) -> None:
    ids, terminals, fraud, anomaly, decisions = (list(c) for c in zip(*rows, strict=True))
    try:
        for s in ids + terminals:
            s.encode()
    except UnicodeEncodeError:
        return  # lone surrogates: the model cannot serialise them either
    check_scores(ids, terminals, np.array(fraud), np.array(anomaly), np.array(decisions),
                 np.array(anomaly) if with_shadow else None, fail_open)


def test_emit_outputs_equal_the_per_row_model_outputs() -> None:
    txs = [Transaction.model_validate_json(good(i, transaction_id=s))
           for i, s in enumerate(STRINGS) if s]
    batch = pseudonymise(txs, Tokenizer(os.urandom(32)))
    n = len(txs)
    rng = np.random.default_rng(3)
    scores = Scores(rng.random(n), rng.random(n), rng.random(n))
    decisions = np.array(["allow"] * n)
    for shadow_model, shadow in ((None, None), (types.SimpleNamespace(version="fs-0"),
                                               rng.random(n))):
        for fail_open in (False, True):
            fake = types.SimpleNamespace(model=types.SimpleNamespace(version="fs-1"),
                                         shadow=shadow_model, topics=Topics(),
                                         emit_scores=True)
            out = Scorer._emit(fake, batch, np.zeros((n, 3)), scores, decisions,  # type: ignore[arg-type]
                               [None] * n, shadow, fail_open)
            assert len(out) == n and all(isinstance(o, Output) for o in out)
            assert [o.topic for o in out] == ["scores"] * n
            assert [o.key for o in out] == [t.encode() for t in batch.customer_tokens]
            assert all(o.headers is None for o in out)
            for row, o in enumerate(out):
                record = ScoreRecord.model_validate_json(o.value)
                assert record.model_dump_json().encode() == o.value
                assert record.transaction_id == txs[row].transaction_id
                assert record.event_time == txs[row].timestamp
                assert record.shadow_fraud_score == (None if shadow is None
                                                     else float(shadow[row]))
                assert record.fail_open is fail_open


def test_the_fast_path_follows_the_score_record_fields() -> None:
    assert pipeline._FAST_SCORES, "ScoreRecord's fields changed: update _SCORE_FIELDS"
