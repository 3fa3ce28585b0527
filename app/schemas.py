"""Topic values as pydantic models: the wire contract of DESIGN.md ("Contracts").

Every value that crosses Kafka is declared here once. The JSON Schema files under
``schemas/`` are generated from these models (``fraudscore schemas --write``) and a test
fails when they drift, so producers in other languages can validate against the same text.

Validation error messages never echo the input value: a rejected card number must not
reach a DLQ header or a log line.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
)

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
)


def _require_rfc3339(value: Any) -> Any:
    """Accept only RFC 3339 strings with a zone: epoch numbers and naive times are ambiguous."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("must be an RFC 3339 timestamp with a zone, e.g. 2026-01-01T12:00:00Z")
    return value


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: a ValueError becomes a reason
        raise ValueError("timestamp out of range once converted to UTC") from None


_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")  # 2·d with its digits summed


def luhn_ok(digits: str) -> bool:
    """True when `digits` is all ASCII digits (at least two) and passes the Luhn checksum."""
    if len(digits) < 2 or not digits.isascii() or not digits.isdigit():
        return False
    # every second digit from the right doubled; byte sums run in C (48 = ord("0"))
    raw = digits.encode()
    return (sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_DOUBLED)) - 48 * len(raw)) % 10 == 0


def _check_pan(value: str) -> str:
    if not luhn_ok(value):
        raise ValueError("card number fails the Luhn check")
    return value


# exactly the dotted quads `ipaddress` accepts (0–255, no leading zeros): the common case
# without its slower parser
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}", re.ASCII)


def _check_ip(value: str) -> str:
    if _IPV4.fullmatch(value):
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("must be an IPv4 or IPv6 address") from None
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_require_rfc3339), AfterValidator(_to_utc)]
Id = Annotated[str, Field(min_length=1, max_length=128)]
Pan = Annotated[str, Field(pattern=r"^[0-9]{12,19}$"), AfterValidator(_check_pan)]
Amount = Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False, strict=True)]
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Decision = Literal["allow", "review", "block"]


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)


class Transaction(_Value):
    """`transactions` value; key = customer_id. Unknown fields are ignored (forward compatible)."""

    transaction_id: Id
    timestamp: Timestamp
    customer_id: Id
    terminal_id: Id
    amount: Amount
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    card_number: Pan | None = None
    merchant_category: Annotated[str, Field(pattern=r"^[0-9]{4}$")] | None = None
    channel: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] | None = None
    device_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    ip: Annotated[str, Field(max_length=45), AfterValidator(_check_ip)] | None = None


class Label(_Value):
    """`fraud-labels` value: a (possibly late) fraud report for one transaction."""

    transaction_id: Id
    customer_id: Id
    terminal_id: Id
    timestamp: Timestamp
    is_fraud: StrictBool
    reported_at: Timestamp


class Reason(BaseModel):
    """One feature's share of a decision (a tree-model contribution in log-odds)."""

    feature: str
    value: float
    contribution: float


class PiiEnvelope(BaseModel):
    """AES-256-GCM ciphertext of the personal fields an analyst may need; base64 strings."""

    kid: str
    nonce: str
    ciphertext: str


class ScoreRecord(BaseModel):
    """`scores` value: one per scored event; no personal data (token, not PAN)."""

    transaction_id: str
    event_time: datetime
    scored_at: datetime
    customer_token: str
    terminal_id: str
    fraud_score: Score
    anomaly_score: float | None = Field(
        default=None, description="neural anomaly score; null until a neural model is deployed"
    )
    decision: Decision
    model_version: str
    fail_open: bool = Field(default=False, description="scored with default features")
    shadow_model_version: str | None = Field(
        default=None, description="a shadow model scored alongside, not acted on")
    shadow_fraud_score: float | None = None


class Alert(ScoreRecord):
    """`alerts` value: a scored event whose decision is review or block."""

    alert_id: str
    reasons: list[Reason]
    pii: PiiEnvelope


class DeadLetterHeaders(BaseModel):
    """Headers of a `transactions.dlq` record. The value is the original with card numbers
    masked (BIN + last 4), e-mails and IPs removed and identifier fields tokenised; the key
    is the original key's token; the original key and bytes are in `original.envelope`."""

    model_config = ConfigDict(populate_by_name=True)

    error_stage: str = Field(alias="error.stage")
    error_reason: str = Field(alias="error.reason")
    source_topic: str = Field(alias="source.topic")
    source_partition: int = Field(alias="source.partition")
    source_offset: int = Field(alias="source.offset")
    original_envelope: PiiEnvelope | None = Field(
        default=None, alias="original.envelope",
        description="AES-256-GCM of the original key and value (JSON), bound to the source "
                    "topic, partition and offset")
    original_omitted: str | None = Field(
        default=None, alias="original.omitted", description="why the original was not sealed")
    value_truncated: int | None = Field(
        default=None, alias="value.truncated",
        description="the original's length when the redacted value was cut short")


class AuditItem(BaseModel):
    """One decision inside an audit record (no personal data: ids, scores, hashes)."""

    transaction_id: str
    decision: Decision
    score: float
    inputs_hash: str | None = None


class AuditRecord(BaseModel):
    """`audit` value: one decision or analyst access, hash-chained per writer.

    The PCI DSS 10.2.2 fields: who (`actor`), what (`action`), when (`occurred_at`),
    success or failure (`outcome`), where from (`origin`), affected object (`object_type`,
    `object_id`). `hash` is HMAC-SHA256 under the audit key `key_id` over the canonical JSON
    of every other field, `prev_hash` the hash of the writer's previous record.
    """

    writer_id: str
    seq: int = Field(ge=0)
    occurred_at: datetime
    actor: str
    action: str
    outcome: Literal["success", "failure", "denied"]
    origin: str
    object_type: str = ""
    object_id: str
    reason: str | None = Field(default=None, description="why (analyst access), redacted")
    inputs_hash: str | None = None
    model_version: str | None = None
    score: float | None = None
    decision: Decision | None = None
    items: list[AuditItem] = Field(
        default_factory=list, description="the decisions this record covers")
    key_id: str = ""
    prev_hash: str
    hash: str


TOPIC_VALUES: dict[str, type[BaseModel]] = {
    "transaction": Transaction,
    "label": Label,
    "score": ScoreRecord,
    "alert": Alert,
    "dead_letter_headers": DeadLetterHeaders,
    "audit_record": AuditRecord,
}

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


def json_schemas() -> dict[str, str]:
    """File name → JSON Schema text, as committed under ``schemas/``."""
    out: dict[str, str] = {}
    for name, model in TOPIC_VALUES.items():
        mode = "validation" if model in (Transaction, Label) else "serialization"
        schema = model.model_json_schema(mode=mode, by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_json_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in json_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
