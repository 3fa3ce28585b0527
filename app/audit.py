"""Audit trail: HMAC-keyed hash chains, one per writer, and their verification.

Chain design (SECURITY.md, "Audit log", says the same for reviewers):

- **One chain per writer.** A writer is one transactional producer: the scorer worker's
  ``transactional.id`` or one analyst on one host. Kafka fences a second producer with the
  same id, so no two processes ever append to the same chain at once.
- **Each record** carries ``seq`` (0, 1, 2, …), ``prev_hash`` (the previous record's hash;
  64 zeros for seq 0) and ``hash`` = HMAC-SHA256(audit key ``key_id``, canonical JSON of
  every other field). Without the key nobody can edit, insert or re-chain records.
- **Transactions.** The scorer's records are outputs of its batch, committed in the batch's
  Kafka transaction. The chain head advances tentatively while a batch is built;
  :meth:`AuditLog.rollback` (the engine calls it when it aborts) puts it back, and the next
  batch implicitly confirms the previous one (or the engine calls :meth:`AuditLog.confirm`
  after its commit). Only confirmed records reach the local copy (the audit file).
- **Restarts.** The head is recovered lazily, on the first batch, i.e. after
  ``init_transactions`` has fenced any zombie and resolved its open transaction: the last
  committed record of this writer is read back from the audit topic (``read_committed``,
  scanning backwards from the end), its HMAC checked, and the chain continues from it.
  Where no topic is used, the last record of the audit file plays that part.
- **Truncation.** Deleting the newest records of a chain leaves a valid shorter chain; it is
  detectable only against something kept elsewhere. Every ``checkpoint_s`` the writer logs
  a checkpoint (writer, seq, hash; the hash is itself a MAC over the seq), and any record
  copy (the audit file, a SIEM export) serves as one too: ``fraudscore audit verify
  --anchor FILE`` then reports a chain that ends before a checkpoint, or disagrees with it.
  Records written after the last checkpoint and deleted from every copy are not detectable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from app.schemas import AuditItem, AuditRecord

log = logging.getLogger("fraudscore.audit")

GENESIS = "0" * 64
_DEFAULTS = {name: f.get_default(call_default_factory=True)
             for name, f in AuditRecord.model_fields.items() if not f.is_required()}
ITEMS_PER_RECORD = 500
SCOPES = ("all", "alerts", "off")


class AuditError(RuntimeError):
    """The audit trail cannot be written or continued; the message says why."""


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes the MAC covers: every field but `hash`, sorted keys, no spaces."""
    body = {k: v for k, v in doc.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class AuditSigner:
    """HMAC-SHA256 under the active audit key; checks records of any key it holds."""

    def __init__(self, keys: dict[str, bytes], active: str) -> None:
        if active not in keys:
            raise ValueError(f"audit key id {active!r} is not among the audit keys")
        self._keys = dict(keys)
        self.active = active

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def sign(self, canonical_bytes: bytes) -> str:
        """The MAC of a record's canonical bytes under the active key."""
        return hmac.new(self._keys[self.active], canonical_bytes, hashlib.sha256).hexdigest()

    def mac(self, doc: dict[str, Any]) -> str:
        """The MAC a record should carry, under the key it names."""
        key = self._keys.get(str(doc.get("key_id")))
        if key is None:
            raise KeyError(doc.get("key_id"))
        return hmac.new(key, canonical(doc), hashlib.sha256).hexdigest()

    def check(self, doc: dict[str, Any]) -> bool:
        try:
            return hmac.compare_digest(self.mac(doc), str(doc.get("hash", "")))
        except KeyError:
            return False


def default_origin() -> str:
    return f"{socket.gethostname()}/pid:{os.getpid()}"


def features_hash(rows: np.ndarray, model_version: str) -> str:
    """One hash over a block of feature rows (float64, little-endian, row-major)."""
    digest = hashlib.sha256(model_version.encode() + b"\x00")
    digest.update(np.ascontiguousarray(rows, dtype="<f8").tobytes())
    return "sha256:" + digest.hexdigest()


def features_hashes(features: np.ndarray, model_version: str) -> list[str]:
    """What the model saw, per row, hashed: ties each decision to replayed features."""
    rows = np.ascontiguousarray(features, dtype="<f8")
    prefix = model_version.encode() + b"\x00"
    sha = hashlib.sha256
    return ["sha256:" + sha(prefix + rows[i].tobytes()).hexdigest() for i in range(len(rows))]


@dataclass(frozen=True)
class Pending:
    """A record built for the current batch; `line` is exactly what the topic gets."""

    seq: int
    hash: str
    line: bytes


class AuditLog:
    """One writer's chain: builds signed records, tracks the head across commit/abort.

    `recover` returns the writer's last durable record (a dict) or None for a new chain;
    it is called once, before the first record. `file` receives a copy of every confirmed
    record (append-only, one JSON line each).
    """

    def __init__(self, writer_id: str, signer: AuditSigner,
                 recover: Callable[[], dict[str, Any] | None] | None = None,
                 file: Path | None = None, checkpoint_s: float = 60.0,
                 origin: str | None = None) -> None:
        self.writer_id = writer_id
        self.signer = signer
        self.origin = origin or default_origin()
        self._recover = recover
        self._file = file
        self._checkpoint_s = checkpoint_s
        self._last_checkpoint = time.monotonic()
        self._head: tuple[int, str] | None = None  # (next seq, last hash); None: not read
        self._confirmed: tuple[int, str] | None = None
        self._pending: list[list[Pending]] = []  # per batch not yet committed, oldest first

    # -- head ------------------------------------------------------------------------------

    def _ensure_head(self) -> tuple[int, str]:
        if self._head is not None:
            return self._head
        last = self._recover() if self._recover is not None else None
        if last is None:
            head = (0, GENESIS)
        else:
            if last.get("writer_id") != self.writer_id:
                raise AuditError(f"recovered a record of writer {last.get('writer_id')!r}, "
                                 f"not {self.writer_id!r}")
            if not self.signer.check(last):
                raise AuditError(
                    f"the last audit record of writer {self.writer_id!r} (seq "
                    f"{last.get('seq')}) does not verify with the audit keys "
                    f"{self.signer.key_ids}: it was tampered with, or the audit key changed "
                    "without keeping the old one; run `fraudscore audit verify`")
            head = (int(last["seq"]) + 1, str(last["hash"]))
            log.info("audit chain %s continues at seq %d", self.writer_id, head[0])
        self._head = self._confirmed = head
        return head

    @property
    def head(self) -> tuple[int, str]:
        """(next seq, hash of the last record), counting records not yet confirmed."""
        return self._ensure_head()

    # -- records ---------------------------------------------------------------------------

    def record(self, *, actor: str, action: str, outcome: str, object_type: str,
               object_id: str, items: Sequence[AuditItem | dict[str, Any]] = (),
               **extra: Any) -> bytes:
        """Sign and chain one record; returns the JSON value for the audit topic.

        The fields are checked against :class:`AuditRecord`, the items are not (our own code
        builds them, on the hot path); the stored line is the canonical JSON the MAC covers,
        with the hash appended.
        """
        unknown = extra.keys() - AuditRecord.model_fields.keys()
        if unknown:
            raise TypeError(f"not audit record fields: {sorted(unknown)}")
        seq, prev_hash = self._ensure_head()
        body: dict[str, Any] = {
            **_DEFAULTS, **extra, "writer_id": self.writer_id, "seq": seq,
            "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "actor": actor, "action": action, "outcome": outcome, "origin": self.origin,
            "object_type": object_type, "object_id": object_id, "key_id": self.signer.active,
            "prev_hash": prev_hash, "hash": "",
        }
        AuditRecord.model_validate(body)
        body["items"] = [i.model_dump() if isinstance(i, AuditItem) else i for i in items]
        del body["hash"]
        signed = canonical(body)
        digest = self.signer.sign(signed)
        line = signed[:-1] + b',"hash":"' + digest.encode() + b'"}'
        if not self._pending:
            self._pending.append([])
        self._pending[-1].append(Pending(seq, digest, line))
        self._head = (seq + 1, digest)
        return line

    def decisions(self, actor: str, model_version: str, transaction_ids: Sequence[str],
                  decisions: Sequence[str], scores: Sequence[float],
                  features: np.ndarray, reason: str | None = None) -> list[bytes]:
        """Scored events batched into records of at most ITEMS_PER_RECORD decisions; each
        record's `inputs_hash` covers its rows' features in item order (cheaper than one
        hash per item, and just as checkable by replaying them)."""
        out = []
        for start in range(0, len(transaction_ids), ITEMS_PER_RECORD):
            stop = min(start + ITEMS_PER_RECORD, len(transaction_ids))
            items = [{"transaction_id": transaction_ids[i], "decision": decisions[i],
                      "score": float(scores[i])} for i in range(start, stop)]
            out.append(self.record(
                actor=actor, action="decision.score", outcome="success",
                object_type="transactions",
                object_id=f"{transaction_ids[start]}+{stop - start - 1}",
                model_version=model_version, items=items,
                inputs_hash=features_hash(features[start:stop], model_version), reason=reason))
        return out

    # -- transaction boundaries ------------------------------------------------------------

    def begin(self, in_flight: int = 0) -> None:
        """A new batch starts: the batches before it committed, except the last
        `in_flight` ones, whose transactions an engine is still committing."""
        while len(self._pending) > in_flight:
            self.confirm()
        self._pending.append([])

    def confirm(self) -> None:
        """The oldest pending batch's transaction committed: copy its records to the file,
        move the confirmed head past them."""
        pending = self._pending.pop(0) if self._pending else []
        if pending and self._file is not None:
            append_lines(self._file, [p.line for p in pending])
        if pending:
            self._confirmed = (pending[-1].seq + 1, pending[-1].hash)
        if self._confirmed and time.monotonic() - self._last_checkpoint >= self._checkpoint_s:
            self._last_checkpoint = time.monotonic()
            seq, prev = self._confirmed
            if seq > 0:
                log.info("audit checkpoint %s", json.dumps(
                    {"writer_id": self.writer_id, "seq": seq - 1, "hash": prev}))

    def rollback(self) -> None:
        """A batch's transaction aborted: its records, and those of any batch after it,
        never happened; rewind the head to the last committed record."""
        self._pending = []
        self._head = self._confirmed

    def close(self) -> None:
        """Shutdown after the last batch committed: confirm what is pending."""
        while self._pending:
            self.confirm()


# ---- files ------------------------------------------------------------------------------


def append_lines(path: Path, lines: Sequence[bytes]) -> None:
    """Append under an exclusive lock, one write, fsync: the file only ever grows."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"".join(line + b"\n" for line in lines))
        os.fsync(fd)
    finally:
        os.close(fd)


def write_to_file(path: Path, writer_id: str, signer: AuditSigner, **fields: Any) -> bytes:
    """One record appended to an audit file, its chain continued from the file itself.

    The file lock is held from reading the head to appending, so two processes writing for
    the same writer cannot fork its chain.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        chain = AuditLog(writer_id, signer, recover=lambda: last_in_file(path, writer_id))
        line = chain.record(**fields)
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return line


def file_records(path: Path) -> Iterator[tuple[str, bytes]]:
    """(position, raw line) for every non-empty line."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip(b"\r\n")
            if line:
                yield f"{path.name}:{lineno}", line


def last_in_file(path: Path, writer_id: str) -> dict[str, Any] | None:
    """The writer's last record in an audit file (the file's recovery source)."""
    if not path.exists():
        return None
    last = None
    for _, raw in file_records(path):
        with contextlib.suppress(ValueError):
            doc = json.loads(raw)
            if isinstance(doc, dict) and doc.get("writer_id") == writer_id:
                last = doc
    return last


# ---- verification -----------------------------------------------------------------------


@dataclass
class ChainReport:
    writer_id: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    chains: dict[str, ChainReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # records no chain can own

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.chains.values())

    def first_break(self) -> str | None:
        if self.problems:
            return self.problems[0]
        for c in self.chains.values():
            if c.problems:
                return f"writer {c.writer_id}: {c.problems[0]}"
        return None


def _anchors(sources: Iterable[tuple[str, bytes]]) -> dict[str, dict[int, str]]:
    """writer → {seq: hash} from audit records or logged checkpoints (JSON lines)."""
    out: dict[str, dict[int, str]] = {}
    for _, raw in sources:
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("msg"), str) \
                and doc["msg"].startswith("audit checkpoint "):
            try:
                doc = json.loads(doc["msg"].removeprefix("audit checkpoint "))
            except ValueError:
                continue
        if isinstance(doc, dict) and {"writer_id", "seq", "hash"} <= doc.keys():
            with contextlib.suppress(TypeError, ValueError):
                out.setdefault(str(doc["writer_id"]), {})[int(doc["seq"])] = str(doc["hash"])
    return out


def verify(records: Iterable[tuple[str, bytes]], signer: AuditSigner,
           anchors: Iterable[tuple[str, bytes]] = (),
           allow_truncated_start: bool = False) -> VerifyReport:
    """Check every chain in `records` (given in stored order) and against `anchors`.

    Detected: an edited, forged or re-chained record (MAC), a deleted, inserted, duplicated
    or reordered record (seq and prev_hash), a deleted start (seq 0 missing, unless
    `allow_truncated_start` for topics whose retention drops old records), and a deleted
    end where an anchor (checkpoint, another copy) shows records beyond it.
    """
    report = VerifyReport()
    by_writer: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for where, raw in records:
        try:
            doc = json.loads(raw)
            AuditRecord.model_validate(doc)
        except (ValueError, ValidationError):
            report.problems.append(f"{where}: not a valid audit record (edited or corrupted)")
            continue
        by_writer.setdefault(doc["writer_id"], []).append((where, doc))
    for writer, docs in by_writer.items():
        report.chains[writer] = _verify_chain(writer, docs, signer, allow_truncated_start)
    for writer, points in _anchors(anchors).items():
        chain = report.chains.setdefault(writer, ChainReport(writer))
        seen = {int(d["seq"]): str(d["hash"]) for _, d in by_writer.get(writer, [])}
        for seq in sorted(points):
            if seq in seen and seen[seq] != points[seq]:
                chain.problems.append(f"seq {seq} differs from the anchor: the chain was "
                                      "rewritten after the anchor was taken")
                break
            if seq not in seen and (chain.last_seq is None or seq > chain.last_seq):
                chain.problems.append(
                    f"truncated: an anchor shows seq {seq} (hash {points[seq][:12]}…), but "
                    f"the chain ends at seq {chain.last_seq}")
                break
    return report


def _partition_of(where: str) -> str | None:
    """`topic[p]` of a `topic[p]@offset` position; None for file lines."""
    head, at, offset = where.rpartition("@")
    return head if at and offset.isdigit() and head.endswith("]") else None


def _verify_chain(writer: str, docs: list[tuple[str, dict[str, Any]]], signer: AuditSigner,
                  allow_truncated_start: bool) -> ChainReport:
    rep = ChainReport(writer, records=len(docs))
    if len({_partition_of(where) for where, _ in docs}) > 1:  # spread over partitions
        docs = sorted(docs, key=lambda wd: int(wd[1]["seq"]))
        rep.notes.append("records span several partitions; checked in seq order")
    all_seqs = {int(doc["seq"]) for _, doc in docs}
    prev: dict[str, Any] | None = None
    for where, doc in docs:
        seq = int(doc["seq"])
        if doc.get("key_id") not in signer.key_ids:
            rep.problems.append(f"{where} (seq {seq}): signed with unknown audit key "
                                f"{doc.get('key_id')!r}")
        elif not signer.check(doc):
            rep.problems.append(f"{where} (seq {seq}): hash does not match the record: edited, "
                                "or forged/re-chained without the audit key")
        if prev is None:
            rep.first_seq = seq
            if seq != 0 or doc["prev_hash"] != GENESIS:
                msg = (f"{where}: chain starts at seq {seq}, not 0: earlier records were "
                       "deleted")
                if allow_truncated_start:
                    rep.notes.append(msg + " (allowed: retention)")
                else:
                    rep.problems.append(msg + " (if retention removed them, pass "
                                        "--allow-truncated-start)")
        else:
            pseq = int(prev["seq"])
            if seq <= pseq:
                rep.problems.append(f"{where}: seq {seq} after seq {pseq}: records reordered, "
                                    "duplicated or inserted")
            elif seq > pseq + 1:
                what = "out of order (they come later)" if pseq + 1 in all_seqs else "deleted"
                rep.problems.append(f"{where}: seq {seq} after seq {pseq}: records "
                                    f"{pseq + 1}..{seq - 1} {what}")
            elif doc["prev_hash"] != prev["hash"]:
                rep.problems.append(f"{where} (seq {seq}): prev_hash is not the previous "
                                    "record's hash: a record was replaced here")
        prev = doc
        rep.last_seq = seq if rep.last_seq is None else max(rep.last_seq, seq)
    return rep
