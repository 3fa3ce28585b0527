"""Audit chains: every kind of tampering is detected; aborts and restarts keep them whole."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import fakeredis
import numpy as np
import pytest

from app.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    AuditSigner,
    canonical,
    file_records,
    last_in_file,
    verify,
    write_to_file,
)
from app.pipeline import InputRecord, Scorer, Topics
from app.security.envelope import FieldCipher
from app.security.tokens import Tokenizer
from features.definitions import FEATURE_NAMES
from features.online import RedisFeatureStore
from models.policy import Policy
from models.runtime import Scores

KEY = os.urandom(32)
SIGNER = AuditSigner({"a1": KEY}, "a1")
PAN = "4539578763621486"


def chain(n: int, writer: str = "w1") -> list[bytes]:
    log = AuditLog(writer, SIGNER, origin="test")
    return [log.record(actor="svc", action="decision.alert", outcome="success",
                       object_type="alert", object_id=f"al-{i}", score=i / 10)
            for i in range(n)]


def check(lines: list[bytes], anchors: list[bytes] = (), **kw: bool) -> str | None:  # type: ignore[assignment]
    report = verify([(f"f:{i}", raw) for i, raw in enumerate(lines)], SIGNER,
                    [(f"a:{i}", raw) for i, raw in enumerate(anchors)], **kw)
    return report.first_break()


def test_a_clean_chain_verifies() -> None:
    lines = chain(6) + chain(3, "w2")
    assert check(lines) is None
    docs = [json.loads(x) for x in lines]
    assert docs[0]["prev_hash"] == GENESIS and docs[1]["prev_hash"] == docs[0]["hash"]
    assert all(set(d) >= {"actor", "action", "occurred_at", "outcome", "origin", "object_id"}
               for d in docs)


def test_edit_delete_swap_insert_are_detected() -> None:
    lines = chain(6)
    edited = json.loads(lines[2])
    edited["score"] = 0.0
    assert "edited" in str(check([*lines[:2], json.dumps(edited).encode(), *lines[3:]]))
    assert "records 3..3 deleted" in str(check(lines[:3] + lines[4:]))
    assert "out of order" in str(check([*lines[:2], lines[3], lines[2], *lines[4:]]))
    assert "duplicated or inserted" in str(check([*lines[:4], lines[2], *lines[4:]]))
    assert "not a valid audit record" in str(check([*lines[:3], b"{garbage", *lines[3:]]))
    foreign = chain(6)  # same writer, other chain: its records do not link
    assert "replaced" in str(check([*lines[:3], foreign[3], *lines[4:]]))


def test_re_chaining_without_the_key_is_detected() -> None:
    lines = chain(6)
    docs = [json.loads(x) for x in lines]
    del docs[2]  # drop a record, then repair seq and links with a key of one's own
    attacker = os.urandom(32)
    for i, doc in enumerate(docs):
        doc["seq"] = i
        doc["prev_hash"] = GENESIS if i == 0 else docs[i - 1]["hash"]
        if i >= 2:
            doc["hash"] = hmac.new(attacker, canonical(doc), hashlib.sha256).hexdigest()
    assert "forged/re-chained" in str(check([json.dumps(d).encode() for d in docs]))
    for doc in docs[2:]:  # an unkeyed SHA-256 chain does no better
        doc["hash"] = hashlib.sha256(canonical(doc)).hexdigest()
    assert "forged/re-chained" in str(check([json.dumps(d).encode() for d in docs]))


def test_truncation_detected_against_anchors_and_at_the_start() -> None:
    lines = chain(8)
    assert check(lines[:5]) is None  # the chain alone cannot know its end was cut
    assert "truncated: an anchor shows seq 5" in str(check(lines[:5], anchors=lines))
    checkpoint = json.dumps({"ts": "…", "level": "INFO", "msg": "audit checkpoint " + json.dumps(
        {"writer_id": "w1", "seq": 6, "hash": json.loads(lines[6])["hash"]})}).encode()
    assert "anchor shows seq 6" in str(check(lines[:5], anchors=[checkpoint]))
    assert check(lines, anchors=[checkpoint]) is None
    assert "differs from the anchor" in str(check(chain(8), anchors=[checkpoint]))
    assert "starts at seq 2" in str(check(lines[2:]))
    assert check(lines[2:], allow_truncated_start=True) is None
    assert "no record" not in str(check([], anchors=[checkpoint]))
    assert "anchor shows seq 6" in str(check([], anchors=[checkpoint]))


def test_rollback_forgets_an_aborted_batch_and_the_file_gets_only_committed(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog("w1", SIGNER, file=path)
    committed = [log.record(actor="a", action="x", outcome="success", object_type="t",
                            object_id=str(i)) for i in range(3)]
    log.begin()  # the next batch: the previous one committed
    log.record(actor="a", action="x", outcome="success", object_type="t", object_id="lost")
    log.rollback()  # its transaction aborted
    retried = log.record(actor="a", action="x", outcome="success", object_type="t",
                         object_id="3")
    log.close()
    assert check([*committed, retried]) is None
    assert [raw for _, raw in file_records(path)] == [*committed, retried]
    # a restart continues the chain from the file
    again = AuditLog("w1", SIGNER, recover=lambda: last_in_file(path, "w1"), file=path)
    more = again.record(actor="a", action="x", outcome="success", object_type="t",
                        object_id="4")
    again.confirm()
    assert json.loads(more)["seq"] == 4 and check([raw for _, raw in file_records(path)]) is None


def test_pipelined_batches_confirm_oldest_first_and_an_abort_forgets_both(
        tmp_path: Path) -> None:
    """The confluent engine scores batch N+1 while N commits: N+1's begin must not confirm
    N, a commit confirms only the oldest batch, and an abort forgets every uncommitted one."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog("w1", SIGNER, file=path)

    def rec(name: str) -> bytes:
        return log.record(actor="a", action="x", outcome="success", object_type="t",
                          object_id=name)

    log.begin()
    n0 = rec("n0")
    log.begin(in_flight=1)  # n0 still committing
    assert not path.exists()
    rec("n1")
    log.confirm()  # n0 committed; n1 still pending
    assert [raw for _, raw in file_records(path)] == [n0]
    log.begin(in_flight=1)
    rec("n2-lost")
    log.rollback()  # n1's commit failed: n1 and n2 are read again
    log.begin()
    again = [rec("n1"), rec("n2")]
    log.close()
    assert [json.loads(r)["seq"] for r in again] == [1, 2] and check([n0, *again]) is None
    assert [raw for _, raw in file_records(path)] == [n0, *again]


def test_restart_refuses_a_tampered_or_foreign_head(tmp_path: Path) -> None:
    head = json.loads(chain(2)[-1])
    head["score"] = 9.9
    with pytest.raises(AuditError, match="does not verify"):
        AuditLog("w1", SIGNER, recover=lambda: head).head  # noqa: B018
    with pytest.raises(AuditError, match=r"not .w2."):
        AuditLog("w2", SIGNER, recover=lambda: json.loads(chain(1)[0])).head  # noqa: B018
    path = tmp_path / "a.jsonl"
    for i in range(3):
        write_to_file(path, "analyst:x@h", SIGNER, actor="x", action="alert.decrypt",
                      outcome="success", object_type="alert", object_id=f"al-{i}",
                      reason="case 1")
    assert check([raw for _, raw in file_records(path)]) is None


class StubModel:
    """The model interface the scorer uses; scores grow with the amount."""

    version = "stub-1"
    non_finite_rows = 0

    def score(self, features: np.ndarray) -> Scores:
        amount = features[:, FEATURE_NAMES.index("amount")]
        fraud = np.where(amount > 500, 0.95, np.where(amount > 200, 0.6, 0.05))
        return Scores(fraud, np.zeros(len(fraud)), fraud)

    def contributions_many(self, features: np.ndarray) -> np.ndarray:
        return np.zeros_like(features)


def events(start: int, n: int) -> list[InputRecord]:
    out = []
    for i in range(start, start + n):
        doc = {"transaction_id": f"t{i}", "timestamp": f"2026-03-01T12:{i % 60:02d}:00Z",
               "customer_id": f"c{i % 7}", "terminal_id": f"T{i % 5}",
               "amount": [20.0, 300.0, 900.0][i % 3], "currency": "EUR",
               "card_number": PAN, "ip": "203.0.113.5", "email": f"u{i}@example.org"}
        out.append(InputRecord(json.dumps(doc).encode(), f"c{i % 7}".encode(),
                               "transactions", 0, i))
    return out


@pytest.mark.parametrize("scope", ["all", "alerts"])
def test_scorer_audits_every_alert_and_batches_other_decisions(scope: str,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    scorer = Scorer(
        store=RedisFeatureStore(fakeredis.FakeRedis()), model=StubModel(),  # type: ignore[arg-type]
        tokenizer=Tokenizer(os.urandom(32)), cipher=FieldCipher({"k": os.urandom(32)}, "k"),
        policy=Policy(0.5, 0.9), topics=Topics(audit="aud"),
        audit=AuditLog("scorer-worker-0", SIGNER, file=path), audit_scope=scope,
    )
    first = scorer.process([*events(0, 30), InputRecord(b"{bad", b"c1", "transactions", 0, 99)])
    scorer.batch_committed()
    aborted = scorer.process(events(30, 30))
    scorer.batch_aborted()
    retried = scorer.process(events(30, 30))
    scorer.batch_committed()
    assert any(o.topic == "aud" for o in aborted.outputs)
    committed = [o for r in (first, retried) for o in r.outputs if o.topic == "aud"]
    docs = [json.loads(o.value) for o in committed]
    alerts = [d for d in docs if d["action"] == "decision.alert"]
    assert len(alerts) == int(first.n_alerts + retried.n_alerts) == 40
    assert all(d["object_id"].startswith("al-") and len(d["items"]) == 1 for d in alerts)
    batched = [i["transaction_id"] for d in docs if d["action"] == "decision.score"
               for i in d["items"]]
    assert len(batched) == (20 if scope == "all" else 0)
    assert all(o.key == b"scorer-worker-0" for o in committed)
    assert check([o.value for o in committed]) is None
    assert [raw for _, raw in file_records(path)] == [o.value for o in committed]
    blob = b"\n".join(o.value for o in committed)
    assert PAN.encode() not in blob and b"203.0.113.5" not in blob and b"example.org" not in blob
