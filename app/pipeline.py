"""The scoring pipeline: DESIGN.md's stages as plain functions over a batch.

1 decode + validate → 2 pseudonymise → 3 features → 4 score → 5 decide → 6 outputs.
Engines (file, confluent) feed :class:`InputRecord` batches to :meth:`Scorer.process` and
write the returned :class:`Output` records; the engine alone decides how they are committed.
Personal data (PAN, ip, device, customer id) leaves stage 2 only inside an encrypted envelope.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError

from app.audit import AuditLog, features_hashes
from app.metrics import NON_FINITE, STAGE_SECONDS
from app.schemas import Alert, AuditItem, Label, Reason, ScoreRecord, Transaction
from app.security.envelope import FieldCipher, associated_data
from app.security.keyring import KeyringWatcher
from app.security.redact import Redactor
from app.security.tokens import Tokenizer, equality_keys
from features.definitions import DEFAULTS, FEATURE_NAMES
from features.online import EventBatch, FeatureStoreUnavailable, LabelBatch, RedisFeatureStore
from features.windows import country_keys, terminal_hash, transaction_features
from models.policy import Policy
from models.runtime import ModelRuntime, ModelWatcher, Scores

STAGE_DECODE = "decode"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
MAX_REASON_CHARS = 500
N_REASONS = 3


@dataclass(frozen=True)
class InputRecord:
    """One consumed message, with where it came from (for DLQ headers and offsets)."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Output:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None


@dataclass(frozen=True)
class DeadLetter:
    record: InputRecord
    stage: str
    reason: str

    def to_output(self, topic: str, redactor: Redactor | None = None) -> Output:
        """With a `redactor` (the scorer always has one): the value redacted, the key
        tokenised, the original sealed in a header; without, the original bytes."""
        headers = [
            ("error.stage", self.stage.encode()),
            ("error.reason", self.reason[:MAX_REASON_CHARS].encode()),
            ("source.topic", self.record.topic.encode()),
            ("source.partition", str(self.record.partition).encode()),
            ("source.offset", str(self.record.offset).encode()),
        ]
        key, value = self.record.key, self.record.value or b""
        if redactor is not None:
            key, value, sealed = redactor.protect(key, value, self.record.topic,
                                                  self.record.partition, self.record.offset)
            headers.extend(sealed)
        return Output(topic, key, value, headers)


@dataclass(frozen=True)
class Topics:
    alerts: str = "alerts"
    scores: str = "scores"
    dlq: str = "transactions.dlq"
    labels: str = "fraud-labels"
    audit: str = "audit"


# ---- stage 1 ------------------------------------------------------------------------------


def _describe(exc: ValidationError) -> str:
    """Field locations and messages only: never the input, which may hold a card number."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


M = TypeVar("M", Transaction, Label)


def decode(
    records: Sequence[InputRecord], max_bytes: int, model: type[M] = Transaction,  # type: ignore[assignment]
    max_future_s: float = 0.0,
) -> tuple[list[M], list[InputRecord], list[DeadLetter]]:
    """Parse and validate; anything that is not a valid `model` becomes a dead letter.

    With `max_future_s` > 0, an event stamped further than that ahead of this machine's
    clock is dead-lettered too: a wrong producer clock must not poison a card's windows.
    """
    latest = datetime.now(UTC) + timedelta(seconds=max_future_s) if max_future_s > 0 else None
    txs: list[M] = []
    sources: list[InputRecord] = []
    dead: list[DeadLetter] = []
    for rec in records:
        if not rec.value:
            dead.append(DeadLetter(rec, STAGE_DECODE, "empty value"))
            continue
        if len(rec.value) > max_bytes:
            reason = f"value is {len(rec.value)} bytes, above the {max_bytes}-byte limit"
            dead.append(DeadLetter(rec, STAGE_DECODE, reason))
            continue
        try:
            item = model.model_validate_json(rec.value)
        except ValidationError as exc:
            dead.append(DeadLetter(rec, STAGE_DECODE, _describe(exc)))
            continue
        if latest is not None and item.timestamp > latest:
            reason = f"timestamp: more than {max_future_s:g}s in the future"
            dead.append(DeadLetter(rec, STAGE_DECODE, reason))
            continue
        txs.append(item)
        sources.append(rec)
    return txs, sources, dead


# ---- stage 2 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pseudonymised:
    """A batch after tokenisation: the store's columns, and PII only for the envelope."""

    events: EventBatch
    customer_tokens: list[str]
    event_times: list[datetime]
    pii: list[dict[str, Any]] = field(repr=False)

    @property
    def transaction_ids(self) -> list[str]:
        return list(self.events.transaction_ids)

    @property
    def terminal_ids(self) -> list[str]:
        return self.events.terminals.tolist()


def pseudonymise(txs: Sequence[Transaction], tokenizer: Tokenizer) -> Pseudonymised:
    n = len(txs)
    customer_tokens = [c or "" for c in tokenizer.tokens(t.customer_id for t in txs)]
    terminals = np.array([t.terminal_id for t in txs], dtype=object)
    events = EventBatch(
        transaction_ids=[t.transaction_id for t in txs],
        cards=customer_tokens,
        terminals=terminals,
        terminal_keys=terminal_hash(terminals),
        t_us=np.fromiter(((t.timestamp - _EPOCH) // _MICROSECOND for t in txs), dtype=np.int64,
                         count=n),
        amount=np.fromiter((t.amount for t in txs), dtype=np.float64, count=n),
        device=equality_keys(tokenizer.tokens(t.device_id for t in txs)),
        country=country_keys(np.array([t.country for t in txs], dtype=object)),
    )
    pii = [
        {"customer_id": t.customer_id, "card_number": t.card_number, "device_id": t.device_id,
         "ip": t.ip, "email": t.email}
        for t in txs
    ]
    return Pseudonymised(events, customer_tokens, [t.timestamp for t in txs], pii)


def label_batch(labels: Sequence[Label], tokenizer: Tokenizer) -> LabelBatch:
    """Fraud reports keyed like the events they describe (card tokens, no customer ids)."""
    return LabelBatch(
        transaction_ids=[lb.transaction_id for lb in labels],
        cards=[c or "" for c in tokenizer.tokens(lb.customer_id for lb in labels)],
        terminals=[lb.terminal_id for lb in labels],
        t_us=np.fromiter(((lb.timestamp - _EPOCH) // _MICROSECOND for lb in labels),
                         dtype=np.int64, count=len(labels)),
        reported_us=np.fromiter(((lb.reported_at - _EPOCH) // _MICROSECOND for lb in labels),
                                dtype=np.int64, count=len(labels)),
        is_fraud=np.fromiter((lb.is_fraud for lb in labels), dtype=bool, count=len(labels)),
    )


# ---- stages 3–5 ---------------------------------------------------------------------------


def enrich(batch: Pseudonymised, store: RedisFeatureStore) -> np.ndarray:
    return store.update_many(batch.events)


def default_features(batch: Pseudonymised) -> np.ndarray:
    """Fail-open features: the stateless ones computed, every windowed one at its default."""
    out = np.tile(DEFAULTS, (len(batch.events.amount), 1))
    transaction_features(batch.events.t_us, batch.events.amount, out)
    return out


def decide(scores: Scores, policy: Policy, batch: Pseudonymised
           ) -> tuple[np.ndarray, list[str | None]]:
    return policy.decide(scores.fraud, scores.anomaly, batch.events.amount, batch.terminal_ids)


def reasons(contributions: np.ndarray, features: np.ndarray,
            rules: Sequence[str | None] = ()) -> list[list[Reason]]:
    """The rule that forced a decision (if any), then the features that pushed the score
    up the most."""
    top = np.argsort(-contributions, axis=1)[:, :N_REASONS]
    out = []
    for i in range(len(top)):
        row = [Reason(feature=FEATURE_NAMES[j], value=float(features[i, j]),
                      contribution=round(float(contributions[i, j]), 6)) for j in top[i]]
        if i < len(rules) and rules[i]:
            row.insert(0, Reason(feature=str(rules[i]), value=1.0, contribution=0.0))
        out.append(row)
    return out


def alert_id(model_version: str, transaction_id: str) -> str:
    """Deterministic, so a redelivered or replayed event yields the same alert id."""
    digest = hashlib.sha256(f"{model_version}\x00{transaction_id}".encode()).hexdigest()
    return "al-" + digest[:24]


# ---- the whole pipeline -------------------------------------------------------------------


@dataclass
class BatchResult:
    outputs: list[Output]
    transaction_ids: list[str]
    scores: np.ndarray
    decisions: np.ndarray
    dead: list[DeadLetter]
    n_alerts: int
    features: np.ndarray
    anomaly: np.ndarray = field(default_factory=lambda: np.empty(0))
    event_us: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    fail_open: bool = False
    sources: list[InputRecord] = field(default_factory=list)  # where each scored row came from


class Scorer:
    """Runs the stages over one batch; holds the long-lived parts (store, model, keys)."""

    def __init__(
        self,
        store: RedisFeatureStore,
        model: ModelRuntime,
        tokenizer: Tokenizer,
        cipher: FieldCipher,
        policy: Policy,
        topics: Topics,
        max_event_bytes: int = 64 * 1024,
        emit_scores: bool = True,
        max_future_s: float = 0.0,
        policy_for: Callable[[ModelRuntime], Policy] | None = None,
        watcher: ModelWatcher | None = None,
        shadow: ModelRuntime | None = None,
        audit: AuditLog | None = None,
        audit_scope: str = "all",
        key_watcher: KeyringWatcher | None = None,
    ) -> None:
        """`policy_for` rebuilds the policy when `watcher` swaps in a new model version;
        a `shadow` model is scored alongside and recorded, never acted on. `audit` chains a
        record per alert (and, with `audit_scope` "all", per batch of other decisions);
        `key_watcher` swaps in a rotated PII keyring between batches."""
        self.store = store
        self.model = model
        self.tokenizer = tokenizer
        self.cipher = cipher
        self.policy = policy
        self.topics = topics
        self.max_event_bytes = max_event_bytes
        self.emit_scores = emit_scores
        self.max_future_s = max_future_s
        self.policy_for = policy_for
        self.watcher = watcher
        self.shadow = shadow
        self.redactor = Redactor(tokenizer, cipher)
        self.audit = audit
        self.audit_scope = audit_scope
        self.key_watcher = key_watcher

    def maybe_reload(self) -> bool:
        """Between batches: switch to a newly registered model version, if any."""
        if self.watcher is None:
            return False
        new = self.watcher.poll()
        if new is None:
            return False
        policy = self.policy_for(new) if self.policy_for else Policy.from_manifest(new.manifest)
        self.model, self.policy = new, policy
        return True

    def set_cipher(self, cipher: FieldCipher) -> None:
        """A rotated keyring: new envelopes use its active key from the next batch on."""
        self.cipher = cipher
        self.redactor.cipher = cipher

    def batch_committed(self) -> None:
        """The engine committed the last batch's transaction (optional: implied by the next
        `process`): its audit records become the chain's durable head."""
        if self.audit is not None:
            self.audit.confirm()

    def batch_aborted(self) -> None:
        """The engine aborted the last batch's transaction: forget its audit records, so
        the chain continues from the last committed one. Engines that abort must call it."""
        if self.audit is not None:
            self.audit.rollback()

    def process(self, records: Sequence[InputRecord], fail_open: bool = False) -> BatchResult:
        """Score a batch. With `fail_open`, a Redis outage does not stop scoring: features
        fall back to :func:`default_features`, feature state is not updated, and every
        output of the batch says ``fail_open: true``."""
        if self.audit is not None:
            self.audit.begin()
        if self.key_watcher is not None:
            self.key_watcher.poll()
        with STAGE_SECONDS.labels("decode").time():
            txs, sources, dead = decode(records, self.max_event_bytes, Transaction,
                                        self.max_future_s)
        outputs = [d.to_output(self.topics.dlq, self.redactor) for d in dead]
        if not txs:
            empty = np.empty(0)
            no_features = np.empty((0, len(FEATURE_NAMES)))
            return BatchResult(outputs, [], empty, empty.astype(str), dead, 0, no_features)
        self.maybe_reload()
        with STAGE_SECONDS.labels("pseudonymise").time():
            batch = pseudonymise(txs, self.tokenizer)
        opened = False
        with STAGE_SECONDS.labels("features").time():
            try:
                features = enrich(batch, self.store)
            except FeatureStoreUnavailable:
                if not fail_open:
                    raise
                features, opened = default_features(batch), True
        with STAGE_SECONDS.labels("score").time():
            before = self.model.non_finite_rows
            scores = self.model.score(features)
            NON_FINITE.inc(self.model.non_finite_rows - before)
            decisions, rules = decide(scores, self.policy, batch)
            shadow = self.shadow.score(features).fraud if self.shadow is not None else None
        with STAGE_SECONDS.labels("emit").time():
            outputs.extend(self._emit(batch, features, scores, decisions, rules, shadow, opened))
            if self.audit is not None:
                outputs.extend(self._audit_decisions(batch, features, scores, decisions, opened))
        n_alerts = int((decisions != "allow").sum())
        return BatchResult(outputs, batch.transaction_ids, scores.fraud, decisions, dead,
                           n_alerts, features, scores.anomaly, batch.events.t_us, opened,
                           sources)

    def process_mixed(self, records: Sequence[InputRecord], fail_open: bool = False
                      ) -> BatchResult:
        """A batch polled from both topics: its labels take effect first, then its
        transactions are scored in order (what the file engine and replay assume too).
        Labels cannot be applied fail-open: an outage then fails the whole batch."""
        labels = [r for r in records if r.topic == self.topics.labels]
        txs = [r for r in records if r.topic != self.topics.labels]
        label_result = self.process_labels(labels) if labels else None
        result = self.process(txs, fail_open)
        if label_result is not None:
            result.outputs[:0] = label_result.outputs
            result.dead[:0] = label_result.dead
        return result

    def process_labels(self, records: Sequence[InputRecord]) -> BatchResult:
        """Apply fraud reports to feature state; malformed ones are dead-lettered."""
        labels, _, dead = decode(records, self.max_event_bytes, Label)
        if labels:
            self.store.apply_labels(label_batch(labels, self.tokenizer))
        empty = np.empty(0)
        return BatchResult([d.to_output(self.topics.dlq, self.redactor) for d in dead], [], empty,
                           empty.astype(str), dead, 0, np.empty((0, len(FEATURE_NAMES))))

    def _emit(
        self, batch: Pseudonymised, features: np.ndarray, scores: Scores,
        decisions: np.ndarray, rules: list[str | None], shadow: np.ndarray | None,
        fail_open: bool = False,
    ) -> list[Output]:
        now = datetime.now(UTC)
        version = self.model.version
        shadow_version = self.shadow.version if self.shadow is not None else None
        tx_ids, terminals = batch.transaction_ids, batch.terminal_ids
        out: list[Output] = []
        flagged = np.flatnonzero(decisions != "allow")
        if flagged.size:
            why = reasons(self.model.contributions_many(features[flagged]), features[flagged],
                          [rules[i] for i in flagged])
            for row, reason_list in zip(flagged, why, strict=True):
                tx_id = tx_ids[row]
                aid = alert_id(version, tx_id)
                alert = Alert(
                    alert_id=aid,
                    transaction_id=tx_id,
                    event_time=batch.event_times[row],
                    scored_at=now,
                    customer_token=batch.customer_tokens[row],
                    terminal_id=terminals[row],
                    fraud_score=float(scores.fraud[row]),
                    anomaly_score=float(scores.anomaly[row]),
                    decision=str(decisions[row]),  # type: ignore[arg-type]
                    model_version=version,
                    fail_open=fail_open,
                    reasons=reason_list,
                    pii=self.cipher.encrypt(batch.pii[row], associated_data(aid, tx_id)),
                )
                key = batch.customer_tokens[row].encode()
                out.append(Output(self.topics.alerts, key, alert.model_dump_json().encode()))
        if self.emit_scores:
            for row, tx_id in enumerate(tx_ids):
                record = ScoreRecord(
                    transaction_id=tx_id,
                    event_time=batch.event_times[row],
                    scored_at=now,
                    customer_token=batch.customer_tokens[row],
                    terminal_id=terminals[row],
                    fraud_score=float(scores.fraud[row]),
                    anomaly_score=float(scores.anomaly[row]),
                    decision=str(decisions[row]),  # type: ignore[arg-type]
                    model_version=version,
                    fail_open=fail_open,
                    shadow_model_version=shadow_version,
                    shadow_fraud_score=float(shadow[row]) if shadow is not None else None,
                )
                key = batch.customer_tokens[row].encode()
                out.append(Output(self.topics.scores, key, record.model_dump_json().encode()))
        return out

    def _audit_decisions(self, batch: Pseudonymised, features: np.ndarray, scores: Scores,
                         decisions: np.ndarray, fail_open: bool = False) -> list[Output]:
        """One record per alert; with scope "all", the other decisions in batched records."""
        if self.audit is None:
            return []
        audit, version = self.audit, self.model.version
        why = "fail-open: scored with default features" if fail_open else None
        actor = f"service:{audit.writer_id}"
        key = audit.writer_id.encode()
        tx_ids = batch.transaction_ids
        flagged = np.flatnonzero(decisions != "allow")
        hashes = features_hashes(features[flagged], version)
        out = []
        for i, inputs_hash in zip(flagged, hashes, strict=True):
            decision, score = str(decisions[i]), float(scores.fraud[i])
            item = AuditItem(transaction_id=tx_ids[i], decision=decision,  # type: ignore[arg-type]
                             score=score, inputs_hash=inputs_hash)
            line = audit.record(
                actor=actor, action="decision.alert", outcome="success", object_type="alert",
                object_id=alert_id(version, tx_ids[i]), inputs_hash=inputs_hash,
                model_version=version, score=score, decision=decision, items=[item], reason=why)
            out.append(Output(self.topics.audit, key, line))
        if self.audit_scope == "all":
            rows = np.flatnonzero(decisions == "allow")
            lines = audit.decisions(actor, version, [tx_ids[i] for i in rows],
                                    decisions[rows].tolist(), scores.fraud[rows].tolist(),
                                    features[rows], why)
            out.extend(Output(self.topics.audit, key, line) for line in lines)
        return out
