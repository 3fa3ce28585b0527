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
from functools import cache
from operator import attrgetter
from typing import Any, NamedTuple, TypeVar

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import to_json

from app.audit import AuditLog, features_hashes
from app.fast_decode import fast_transactions
from app.metrics import NON_FINITE, STAGE_SECONDS
from app.schemas import Alert, AuditItem, Label, Reason, ScoreRecord, Transaction
from app.security.envelope import FieldCipher, associated_data
from app.security.keyring import KeyringWatcher
from app.security.redact import Redactor
from app.security.tokens import Tokenizer, equality_keys
from features.definitions import DEFAULTS, FEATURE_NAMES
from features.online import (
    EventBatch,
    FeatureStoreUnavailable,
    LabelBatch,
    RedisFeatureStore,
    StaleEvents,
)
from features.windows import country_keys, terminal_hash, transaction_features
from models.policy import Policy
from models.runtime import ModelRuntime, ModelWatcher, Scores

STAGE_DECODE = "decode"
STAGE_FEATURES = "features"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
MAX_REASON_CHARS = 500
N_REASONS = 3


class InputRecord(NamedTuple):
    """One consumed message, with where it came from (for DLQ headers and offsets). A named
    tuple, as `Output`: one of each per event, built in 0.6 µs instead of a frozen
    dataclass's 1.7 µs."""

    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int


class Output(NamedTuple):
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


@cache
def _list_adapter(model: type[M]) -> TypeAdapter[list[M]]:
    return TypeAdapter(list[model], config=ConfigDict(hide_input_in_errors=True))  # type: ignore[valid-type]


def _validate_together(values: Sequence[bytes], model: type[M]) -> list[M | None]:
    """Validate values in one pydantic-core call, as the JSON array ``[v0,v1,...]``; None
    where a value must be validated on its own instead (the caller then does).

    Only values whose first byte is "{", whose last byte is "}" and that hold no other "}"
    byte join the array. Then a top-level element can only end at the last byte of a value
    (every "}" byte is one), so each element spans whole values, and when the array has as
    many elements as values, each element is exactly one value, parsed as it is alone. A
    value crafted to leave a string or an array open (``{"a":"}``, ``{"a":[1}``) can only
    merge with its neighbours, which the count catches; it can never change how they parse.
    A JSON syntax error, a count that differs or an error without an item index sends every
    value to the one-by-one path, whose results and dead-letter reasons are the reference.
    """
    n = len(values)
    joined = b",".join(values)
    if (joined.count(b"}") == n and all(values)
            and all(v[0] == 0x7B and v[-1] == 0x7D for v in values)):  # b"{" ... b"}"
        todo = list(range(n))  # the usual batch: every value joins, as is
    else:
        joined = b""
        todo = [i for i, v in enumerate(values)
                if v[:1] == b"{" and v[-1:] == b"}" and v.count(b"}") == 1]
    out: list[M | None] = [None] * n
    for _attempt in range(2):  # the second try runs without the items that failed the first
        if not todo:
            break
        if not joined:
            joined = b",".join([values[i] for i in todo])
        try:
            items: list[M | None] = _list_adapter(model).validate_json(b"[" + joined + b"]")
        except ValidationError as exc:
            failed: set[int] = set()
            for err in exc.errors(include_url=False, include_context=False, include_input=False):
                loc = err["loc"]
                if not loc or not isinstance(loc[0], int) or not 0 <= loc[0] < len(todo):
                    return out  # not an item's error (e.g. JSON syntax): all one by one
                failed.add(loc[0])
            todo, joined = [i for k, i in enumerate(todo) if k not in failed], b""
            continue
        if len(items) == len(todo) == n:
            return items
        if len(items) == len(todo):
            for i, item in zip(todo, items, strict=True):
                out[i] = item
        break
    return out


def decode(
    records: Sequence[InputRecord], max_bytes: int, model: type[M] = Transaction,  # type: ignore[assignment]
    max_future_s: float = 0.0,
) -> tuple[list[M], list[InputRecord], list[DeadLetter]]:
    """Parse and validate; anything that is not a valid `model` becomes a dead letter.

    With `max_future_s` > 0, an event stamped further than that ahead of this machine's
    clock is dead-lettered too: a wrong producer clock must not poison a card's windows.

    Transactions first take msgspec's batch path (:mod:`app.fast_decode`), which accepts a
    whole batch or declines it. Otherwise well-formed objects are validated together in one
    pydantic call (:func:`_validate_together`); the rest, and any batch that call cannot
    vouch for, one by one — with the same outcome and the same reasons, in input order.
    """
    latest = datetime.now(UTC) + timedelta(seconds=max_future_s) if max_future_s > 0 else None
    values = [rec.value or b"" for rec in records]
    sizes = list(map(len, values))
    reasons: list[str | None]
    if sizes and min(sizes) > 0 and max(sizes) <= max_bytes:  # the usual batch
        reasons = [None] * len(records)
        fast = fast_transactions(values) if model is Transaction else None
        items = fast if fast is not None else _validate_together(values, model)  # type: ignore[assignment]
    else:
        reasons = [None if 0 < size <= max_bytes else "empty value" if size == 0 else
                   f"value is {size} bytes, above the {max_bytes}-byte limit" for size in sizes]
        sized = [i for i, reason in enumerate(reasons) if reason is None]
        items = [None] * len(records)
        for i, item in zip(sized, _validate_together([values[i] for i in sized], model),
                           strict=True):
            items[i] = item
    late = ([item is not None and item.timestamp > latest for item in items]
            if latest is not None else [False])
    if not any(late) and all(item is not None for item in items):
        return items, list(records), []  # type: ignore[return-value]
    txs: list[M] = []
    sources: list[InputRecord] = []
    dead: list[DeadLetter] = []
    for rec, item, reason in zip(records, items, reasons, strict=True):
        if reason is None and item is None:
            try:
                item = model.model_validate_json(rec.value)  # type: ignore[arg-type]
            except ValidationError as exc:
                reason = _describe(exc)
        if item is not None and latest is not None and item.timestamp > latest:
            reason = f"timestamp: more than {max_future_s:g}s in the future"
        if reason is not None:
            dead.append(DeadLetter(rec, STAGE_DECODE, reason))
            continue
        txs.append(item)  # type: ignore[arg-type]
        sources.append(rec)
    return txs, sources, dead


# ---- stage 2 ------------------------------------------------------------------------------

_PII_FIELDS = ("customer_id", "card_number", "device_id", "ip", "email")
_TX_COLUMNS = attrgetter("transaction_id", "terminal_id", "timestamp", "amount", "country",
                         *_PII_FIELDS)
_LABEL_COLUMNS = attrgetter("transaction_id", "customer_id", "terminal_id", "timestamp",
                            "reported_at", "is_fraud")


def _columns(rows: Sequence[Any], getter: attrgetter[Any], width: int) -> list[tuple[Any, ...]]:
    """Attribute columns of `rows` in one pass (`width` = number of attributes)."""
    return list(zip(*map(getter, rows), strict=True)) if rows else [()] * width


def _epoch_us(stamps: Sequence[datetime]) -> np.ndarray:
    """Exact integer microseconds since the epoch (a float timestamp() would round)."""
    return np.fromiter(((t - _EPOCH) // _MICROSECOND for t in stamps), dtype=np.int64,
                       count=len(stamps))


@dataclass(frozen=True)
class Pseudonymised:
    """A batch after tokenisation: the store's columns, and PII only for the envelope."""

    events: EventBatch
    customer_tokens: list[str]
    event_times: list[datetime]
    pii_columns: tuple[Sequence[str | None], ...] = field(repr=False)  # _PII_FIELDS order

    @property
    def transaction_ids(self) -> list[str]:
        return list(self.events.transaction_ids)

    @property
    def terminal_ids(self) -> list[str]:
        return self.events.terminals.tolist()

    def pii_of(self, row: int) -> dict[str, Any]:
        """The personal fields of one event, for its alert's encrypted envelope."""
        return {name: column[row] for name, column in zip(_PII_FIELDS, self.pii_columns,
                                                          strict=True)}

    @property
    def pii(self) -> list[dict[str, Any]]:
        return [self.pii_of(row) for row in range(len(self.event_times))]


def pseudonymise(txs: Sequence[Transaction], tokenizer: Tokenizer) -> Pseudonymised:
    tx_ids, terminal_ids, stamps, amounts, countries, *pii = _columns(txs, _TX_COLUMNS, 10)
    customers, devices = pii[_PII_FIELDS.index("customer_id")], pii[_PII_FIELDS.index("device_id")]
    customer_tokens = [c or "" for c in tokenizer.tokens(customers)]
    terminals = np.array(terminal_ids, dtype=object)
    events = EventBatch(
        transaction_ids=list(tx_ids),
        cards=customer_tokens,
        terminals=terminals,
        terminal_keys=terminal_hash(terminals),
        t_us=_epoch_us(stamps),
        amount=np.array(amounts, dtype=np.float64),
        device=equality_keys(tokenizer.tokens(devices)),
        country=country_keys(np.array(countries, dtype=object)),
    )
    return Pseudonymised(events, customer_tokens, list(stamps), tuple(pii))


def label_batch(labels: Sequence[Label], tokenizer: Tokenizer) -> LabelBatch:
    """Fraud reports keyed like the events they describe (card tokens, no customer ids)."""
    tx_ids, customers, terminals, stamps, reported, is_fraud = _columns(labels, _LABEL_COLUMNS, 6)
    return LabelBatch(
        transaction_ids=list(tx_ids),
        cards=[c or "" for c in tokenizer.tokens(customers)],
        terminals=list(terminals),
        t_us=_epoch_us(stamps),
        reported_us=_epoch_us(reported),
        is_fraud=np.array(is_fraud, dtype=bool),
    )


# ---- stages 3–5 ---------------------------------------------------------------------------


def enrich(batch: Pseudonymised, store: RedisFeatureStore) -> np.ndarray:
    """Features; the state write is left in flight (Redis applies it while the batch is
    scored and emitted): :meth:`Scorer.process` flushes it before it returns."""
    return store.update_many(batch.events, defer_write=True)


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


# ---- stage 6: score records ---------------------------------------------------------------

_DECISIONS = ("allow", "review", "block")
# ScoreRecord's fields in declaration order, as model_dump_json writes them; a schema change
# that this list does not follow sends every row through the model (see _score_values).
_SCORE_FIELDS = ("transaction_id", "event_time", "scored_at", "customer_token", "terminal_id",
                 "fraud_score", "anomaly_score", "decision", "model_version", "fail_open",
                 "shadow_model_version", "shadow_fraud_score")
_FAST_SCORES = tuple(ScoreRecord.model_fields) == _SCORE_FIELDS


def _json(value: Any) -> bytes:
    """pydantic's JSON for one value, as a ScoreRecord field serialises it (NaN/inf: null)."""
    return to_json(value, inf_nan_mode="null")


_KEYS = {name: (b"," if i else b"{") + _json(name) + b":" for i, name in enumerate(_SCORE_FIELDS)}


def _only(values: Sequence[Any], kind: type) -> bool:
    return set(map(type, values)) <= {kind}


def _json_items(values: list[Any], quoted: bool) -> list[bytes]:
    """:func:`_json` of every item, with one serialiser call where that is provably exact:
    floats (`quoted` False) never serialise with a comma inside, datetimes and strings
    without a quote (`quoted` True) never with a quote inside, so the array splits exactly
    at ``,`` resp. ``","``. Otherwise, or if the count differs, item by item."""
    if not values:
        return []
    if not quoted:
        parts = _json(values)[1:-1].split(b",")
    elif isinstance(values[0], str) and '"' in "".join(values):
        parts = []
    else:
        parts = [b'"' + p + b'"' for p in _json(values)[2:-2].split(b'","')]
    return parts if len(parts) == len(values) else [_json(v) for v in values]


def _score_values(
    tx_ids: Sequence[str], event_times: Sequence[datetime], scored_at: datetime,
    customer_tokens: Sequence[str], terminals: Sequence[str], scores: Scores,
    decisions: np.ndarray, version: str, fail_open: bool, shadow_version: str | None,
    shadow: np.ndarray | None,
) -> list[bytes]:
    """The `scores` values: per row the bytes of ``ScoreRecord(...).model_dump_json()``,
    serialised column by column. Inputs the model would reject or convert go through the
    model itself, so its validation errors stay as they were."""
    n = len(tx_ids)
    fraud = np.asarray(scores.fraud, dtype=np.float64)
    decision_list = (decisions.tolist() if isinstance(decisions, np.ndarray)
                     and decisions.dtype.kind == "U" else [str(d) for d in decisions])
    plain = (
        _FAST_SCORES and n == len(fraud) == len(decision_list) == len(scores.anomaly)
        and (shadow is None or len(shadow) == n)
        and type(version) is str and (shadow_version is None or type(shadow_version) is str)
        and type(scored_at) is datetime and type(fail_open) is bool
        and bool(np.all((fraud >= 0.0) & (fraud <= 1.0)))  # False for NaN too
        and set(decision_list) <= set(_DECISIONS)
        and _only(tx_ids, str) and _only(customer_tokens, str) and _only(terminals, str)
        and _only(event_times, datetime)
    )
    if not plain:
        return [_score_record_json(row, tx_ids, event_times, scored_at, customer_tokens,
                                   terminals, scores, decisions, version, fail_open,
                                   shadow_version, shadow) for row in range(n)]
    anomaly = np.asarray(scores.anomaly, dtype=np.float64).tolist()
    shadow_json = (_json_items(np.asarray(shadow, dtype=np.float64).tolist(), False)
                   if shadow is not None else [b"null"] * n)
    k = _KEYS
    after_event = k["scored_at"] + _json(scored_at) + k["customer_token"]
    after_decision = b"".join((
        k["model_version"], _json(version), k["fail_open"], _json(fail_open),
        k["shadow_model_version"], _json(shadow_version), k["shadow_fraud_score"]))
    decision_part = {d: k["decision"] + _json(d) + after_decision for d in _DECISIONS}
    tx_key, event_key, terminal_key = k["transaction_id"], k["event_time"], k["terminal_id"]
    fraud_key, anomaly_key = k["fraud_score"], k["anomaly_score"]
    return [
        b"".join((tx_key, tx, event_key, et, after_event, tok, terminal_key, term, fraud_key,
                  f, anomaly_key, a, decision_part[d], sf, b"}"))
        for tx, et, tok, term, f, a, d, sf in zip(
            _json_items(list(tx_ids), True), _json_items(list(event_times), True),
            _json_items(list(customer_tokens), True), _json_items(list(terminals), True),
            _json_items(fraud.tolist(), False), _json_items(anomaly, False),
            decision_list, shadow_json, strict=True)
    ]


def _score_record_json(
    row: int, tx_ids: Sequence[str], event_times: Sequence[datetime], scored_at: datetime,
    customer_tokens: Sequence[str], terminals: Sequence[str], scores: Scores,
    decisions: np.ndarray, version: str, fail_open: bool, shadow_version: str | None,
    shadow: np.ndarray | None,
) -> bytes:
    """One `scores` value through the model (the reference :func:`_score_values` matches)."""
    return ScoreRecord(
        transaction_id=tx_ids[row],
        event_time=event_times[row],
        scored_at=scored_at,
        customer_token=customer_tokens[row],
        terminal_id=terminals[row],
        fraud_score=float(scores.fraud[row]),
        anomaly_score=float(scores.anomaly[row]),
        decision=str(decisions[row]),  # type: ignore[arg-type]
        model_version=version,
        fail_open=fail_open,
        shadow_model_version=shadow_version,
        shadow_fraud_score=float(shadow[row]) if shadow is not None else None,
    ).model_dump_json().encode()


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
    n_labels: int = 0  # fraud reports applied with the batch (process_mixed)


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
        """The engine committed the oldest uncommitted batch's transaction (optional:
        implied by the next `process`): its audit records become the chain's durable head."""
        if self.audit is not None:
            self.audit.confirm()

    def batch_aborted(self) -> None:
        """The engine aborted a batch's transaction: forget the audit records of every
        uncommitted batch, so the chain continues from the last committed one (the engine
        reads them all again). Engines that abort must call it."""
        if self.audit is not None:
            self.audit.rollback()

    def process(self, records: Sequence[InputRecord], fail_open: bool = False,
                in_flight: int = 0) -> BatchResult:
        """Score a batch. With `fail_open`, a Redis outage does not stop scoring: features
        fall back to :func:`default_features`, feature state is not updated, and every
        output of the batch says ``fail_open: true``. `in_flight`: how many earlier batches
        the engine is still committing (their audit records stay unconfirmed)."""
        if self.audit is not None:
            self.audit.begin(in_flight)
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
                try:
                    features = enrich(batch, self.store)
                except StaleEvents as exc:  # too late to apply once: dead-letter, score the rest
                    late = set(exc.rows.tolist())
                    stale = [DeadLetter(sources[i], STAGE_FEATURES, exc.reason)
                             for i in sorted(late)]
                    dead = [*dead, *stale]
                    outputs.extend(d.to_output(self.topics.dlq, self.redactor) for d in stale)
                    txs = [t for i, t in enumerate(txs) if i not in late]
                    sources = [r for i, r in enumerate(sources) if i not in late]
                    if not txs:
                        empty = np.empty(0)
                        return BatchResult(outputs, [], empty, empty.astype(str), dead, 0,
                                           np.empty((0, len(FEATURE_NAMES))))
                    batch = pseudonymise(txs, self.tokenizer)
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
        with STAGE_SECONDS.labels("features_write").time():
            self.store.flush()  # the state is written before the engine commits the batch
        n_alerts = int((decisions != "allow").sum())
        return BatchResult(outputs, batch.transaction_ids, scores.fraud, decisions, dead,
                           n_alerts, features, scores.anomaly, batch.events.t_us, opened,
                           sources)

    def process_mixed(self, records: Sequence[InputRecord], fail_open: bool = False,
                      in_flight: int = 0) -> BatchResult:
        """A batch polled from both topics: its labels take effect first, then its
        transactions are scored in order (what the file engine and replay assume too).
        Labels cannot be applied fail-open: an outage then fails the whole batch."""
        topic = self.topics.labels
        labels = [r for r in records if r.topic == topic]
        txs = [r for r in records if r.topic != topic] if labels else records
        label_result = self.process_labels(labels) if labels else None
        result = self.process(txs, fail_open, in_flight)
        result.n_labels = len(labels)
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
                    pii=self.cipher.encrypt(batch.pii_of(row), associated_data(aid, tx_id)),
                )
                key = batch.customer_tokens[row].encode()
                out.append(Output(self.topics.alerts, key, alert.model_dump_json().encode()))
        if self.emit_scores:
            values = _score_values(tx_ids, batch.event_times, now, batch.customer_tokens,
                                   terminals, scores, decisions, version, fail_open,
                                   shadow_version, shadow)
            topic = self.topics.scores
            new = tuple.__new__  # Output(...) per row costs twice as much (namedtuple __new__)
            out.extend([new(Output, (topic, token.encode(), value, None))
                        for token, value in zip(batch.customer_tokens, values, strict=True)])
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
