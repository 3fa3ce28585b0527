"""Transaction and label frames on disk and on the wire.

One job: file formats. Parquet (as written by `write_frame`), JSON lines of the Kafka wire form,
the public Fraud Detection Handbook data set, and producing wire records to Kafka. Every reader
returns frames that honour the columnar contract (column order, dtypes, UTC, sort order), so
downstream code never has to re-check them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.json as pajson
import pyarrow.parquet as pq
from confluent_kafka import Producer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

TRANSACTION_COLUMNS: tuple[str, ...] = (
    "transaction_id",
    "timestamp",
    "customer_id",
    "terminal_id",
    "amount",
    "currency",
    "card_number",
    "merchant_category",
    "channel",
    "country",
    "device_id",
    "ip",
)
REQUIRED_TRANSACTION_COLUMNS: tuple[str, ...] = TRANSACTION_COLUMNS[:6]
OPTIONAL_TRANSACTION_COLUMNS: tuple[str, ...] = TRANSACTION_COLUMNS[6:]
LABEL_COLUMNS: tuple[str, ...] = (
    "transaction_id",
    "customer_id",
    "terminal_id",
    "timestamp",
    "is_fraud",
    "reported_at",
    "scenario",
)
LABEL_WIRE_COLUMNS: tuple[str, ...] = LABEL_COLUMNS[:-1]
CHANNELS: tuple[str, ...] = ("pos", "ecom", "atm")

_TS = pa.timestamp("ns", tz="UTC")
TRANSACTIONS_SCHEMA = pa.schema(
    [
        ("transaction_id", pa.string()),
        ("timestamp", _TS),
        ("customer_id", pa.string()),
        ("terminal_id", pa.string()),
        ("amount", pa.float64()),
        ("currency", pa.string()),
        ("card_number", pa.string()),
        ("merchant_category", pa.string()),
        ("channel", pa.string()),
        ("country", pa.string()),
        ("device_id", pa.string()),
        ("ip", pa.string()),
    ]
)
LABELS_SCHEMA = pa.schema(
    [
        ("transaction_id", pa.string()),
        ("customer_id", pa.string()),
        ("terminal_id", pa.string()),
        ("timestamp", _TS),
        ("is_fraud", pa.bool_()),
        ("reported_at", _TS),
        ("scenario", pa.string()),
    ]
)

HANDBOOK_PATH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "handbook"
    / "transactions_2018-04-01_2018-08-31.parquet"
)
HANDBOOK_COLUMNS: tuple[str, ...] = (
    "TRANSACTION_ID",
    "TX_DATETIME",
    "CUSTOMER_ID",
    "TERMINAL_ID",
    "TX_AMOUNT",
    "TX_FRAUD",
    "TX_FRAUD_SCENARIO",
)
HANDBOOK_SCENARIOS: tuple[str, ...] = (
    "genuine",
    "amount_outlier",
    "compromised_terminal",
    "compromised_card",
)
GENUINE = "genuine"
UNKNOWN_FRAUD_SCENARIO = "unknown"
DEFAULT_LABEL_DELAY_DAYS = 7.0

Format = Literal["auto", "jsonl", "parquet", "handbook"]

_NS_PER_DAY = 86_400 * 10**9
_US_PER_DAY = 86_400 * 10**6
_JSON_BATCH_ROWS = 262_144
_SMALL_FILE_BYTES = 65_536
_RFC3339 = r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
_RFC3339_TEMPLATE = b'"YYYY-MM-DDTHH:MM:SS.ffffffZ"'
_CURRENCY = r"^[A-Z]{3}$"
_JSONL_SUFFIXES = (".jsonl", ".json")


class SourceError(ValueError):
    """A source does not hold valid frames; the message names the file and, for JSONL, the line."""


class ProduceError(RuntimeError):
    """Kafka did not acknowledge every record, so the topic must not be assumed complete."""


# --------------------------------------------------------------------------------------------
# Arrow <-> frame conversion: the single place where the contract's dtypes are enforced.


def strings_from_chars(chars: np.ndarray) -> pa.Array:
    """Build an Arrow string array from an (n, width) ASCII uint8 matrix, with no per-row Python.

    Fixed-width text (ids, card numbers, timestamps) is cheapest to compose as a byte matrix.
    """
    matrix = np.ascontiguousarray(chars, dtype=np.uint8)
    rows, width = matrix.shape
    offsets = np.arange(rows + 1, dtype=np.int64) * width
    return pa.LargeStringArray.from_buffers(
        rows, pa.py_buffer(offsets), pa.py_buffer(matrix.tobytes())
    ).cast(pa.string())


def put_digits(chars: np.ndarray, column: int, values: np.ndarray, width: int) -> None:
    """Write zero-padded decimal `values` into `chars[:, column:column + width]` in place."""
    remaining = np.asarray(values, dtype=np.int64).copy()
    for offset in range(width - 1, -1, -1):
        chars[:, column + offset] = remaining % 10 + ord("0")
        remaining //= 10


def transactions_from_arrow(table: pa.Table, origin: str = "transactions") -> pd.DataFrame:
    """Validate an Arrow table against the transactions contract and return the frame."""
    table = _conform(table, TRANSACTIONS_SCHEMA, origin)
    _raise_row_error(_transaction_row_error(table), origin)
    return _sorted_by_time(table).to_pandas()


def labels_from_arrow(table: pa.Table, origin: str = "labels") -> pd.DataFrame:
    """Validate an Arrow table against the labels contract and return the frame."""
    table = _conform(table, LABELS_SCHEMA, origin)
    _raise_row_error(_label_row_error(table), origin)
    return _sorted_by_time(table).to_pandas()


def _conform(table: pa.Table, schema: pa.Schema, origin: str) -> pa.Table:
    """Select the contract's columns in order and cast them to the contract's types."""
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SourceError(f"{origin}: missing columns {missing}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if pa.types.is_timestamp(column.type) and column.type.tz is None:
            raise SourceError(f"{origin}: column {field.name!r} has no time zone (must be UTC)")
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SourceError(
                f"{origin}: column {field.name!r} is not {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=schema)


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    """Index of the first true value (nulls count as false), or None."""
    hits = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
    return int(hits[0]) if hits.size else None


def _earliest(errors: Sequence[tuple[int, str] | None]) -> tuple[int, str] | None:
    """The error on the earliest row, so messages point at the first bad record."""
    found = [error for error in errors if error is not None]
    return min(found, key=lambda error: error[0]) if found else None


def _null_error(table: pa.Table, names: Sequence[str]) -> tuple[int, str] | None:
    """First row with a required field missing."""
    errors = []
    for name in names:
        row = _first_true(pc.is_null(table.column(name)))
        errors.append(None if row is None else (row, f"missing required field {name!r}"))
    return _earliest(errors)


def _duplicate_error(table: pa.Table) -> tuple[int, str] | None:
    """First row whose transaction_id already appeared earlier."""
    ids = table.column("transaction_id")
    if len(pc.unique(ids)) == len(ids):
        return None
    duplicated = pd.Series(ids.to_numpy(zero_copy_only=False)).duplicated().to_numpy()
    row = int(np.flatnonzero(duplicated)[0])
    return row, f"duplicate transaction_id {ids[row].as_py()!r}"


def _transaction_row_error(table: pa.Table) -> tuple[int, str] | None:
    """First contract violation in a transactions table as (row, reason)."""
    amount = table.column("amount")
    bad_amount = pc.invert(pc.and_(pc.is_finite(amount), pc.greater(amount, 0.0)))
    bad_currency = pc.invert(pc.match_substring_regex(table.column("currency"), _CURRENCY))
    channel = table.column("channel")
    bad_channel = pc.and_(pc.is_valid(channel), pc.invert(pc.is_in(channel, pa.array(CHANNELS))))
    checks = [
        _null_error(table, REQUIRED_TRANSACTION_COLUMNS),
        _mask_error(bad_amount, "amount must be a finite number > 0"),
        _mask_error(bad_currency, "currency must be an ISO 4217 code like 'EUR'"),
        _mask_error(bad_channel, f"channel must be one of {list(CHANNELS)}"),
    ]
    return _earliest([*checks, _duplicate_error(table)])


def _label_row_error(table: pa.Table) -> tuple[int, str] | None:
    """First contract violation in a labels table as (row, reason)."""
    early = pc.less(table.column("reported_at"), table.column("timestamp"))
    checks = [
        _null_error(table, LABEL_COLUMNS),
        _mask_error(early, "reported_at is before timestamp"),
    ]
    return _earliest([*checks, _duplicate_error(table)])


def _mask_error(mask: pa.ChunkedArray | pa.Array, reason: str) -> tuple[int, str] | None:
    row = _first_true(mask)
    return None if row is None else (row, reason)


def _raise_row_error(error: tuple[int, str] | None, origin: str) -> None:
    if error is not None:
        raise SourceError(f"{origin}: row {error[0]}: {error[1]}")


def _sorted_by_time(table: pa.Table) -> pa.Table:
    """Order rows by (timestamp, transaction_id), skipping the sort when already ordered."""
    if table.num_rows < 2:
        return table
    stamps = table.column("timestamp").cast(pa.int64()).to_numpy()
    steps = np.diff(stamps)
    ordered = not (steps < 0).any()
    ties = np.flatnonzero(steps == 0)
    if ordered and ties.size:
        ids = table.column("transaction_id")
        ordered = pc.all(pc.less(ids.take(ties), ids.take(ties + 1))).as_py()
    if ordered:
        return table
    keys = [("timestamp", "ascending"), ("transaction_id", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def _frame_to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """Convert a contract frame to Arrow, refusing naive timestamps and missing columns."""
    missing = [name for name in schema.names if name not in df.columns]
    if missing:
        raise ValueError(f"frame is missing columns {missing}")
    for field in schema:
        if pa.types.is_timestamp(field.type) and not isinstance(
            df[field.name].dtype, pd.DatetimeTZDtype
        ):
            raise ValueError(f"column {field.name!r} must be a UTC-aware datetime column")
    table = pa.Table.from_pandas(df.loc[:, list(schema.names)], preserve_index=False)
    return _conform(table.replace_schema_metadata(None), schema, "frame")


# --------------------------------------------------------------------------------------------
# Readers.


def read_transactions(
    path: Path | str,
    fmt: Format = "auto",
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read a transactions file as (transactions frame, labels frame or None).

    Only the handbook carries labels inline; `start` (inclusive) and `end` (exclusive) are
    UTC-aware bounds on the event time.
    """
    path = Path(path)
    bounds = _bounds_ns(start, end)
    kind = _detect_format(path) if fmt == "auto" else fmt
    if kind == "handbook":
        return _read_handbook(path, bounds, label_delay_days)
    if kind == "parquet":
        table = _read_parquet(path, TRANSACTIONS_SCHEMA, bounds)
        return transactions_from_arrow(table, str(path)), None
    if kind == "jsonl":
        return _read_jsonl(path, TRANSACTIONS_SCHEMA, _transaction_row_error, bounds), None
    raise ValueError(f"unknown format {fmt!r}")


def read_handbook(
    path: Path | str = HANDBOOK_PATH,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    label_delay_days: float = DEFAULT_LABEL_DELAY_DAYS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the Fraud Detection Handbook parquet as (transactions, labels) frames."""
    return _read_handbook(Path(path), _bounds_ns(start, end), label_delay_days)


def read_labels(
    path: Path | str, *, start: datetime | None = None, end: datetime | None = None
) -> pd.DataFrame:
    """Read a labels file (`write_labels` parquet, or JSON lines of the label wire form).

    The wire form has no scenario, so JSONL labels get "genuine" or "unknown" unless a line
    carries an explicit `scenario` key.
    """
    path = Path(path)
    bounds = _bounds_ns(start, end)
    kind = _detect_format(path)
    if kind == "parquet":
        return labels_from_arrow(_read_parquet(path, LABELS_SCHEMA, bounds), str(path))
    if kind == "jsonl":
        return _read_jsonl(path, LABELS_SCHEMA, _label_row_error, bounds)
    raise SourceError(f"{path}: the handbook holds transactions; use read_transactions")


def _detect_format(path: Path) -> Literal["jsonl", "parquet", "handbook"]:
    """Pick the reader from the suffix; a parquet with handbook columns is the handbook."""
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix != ".parquet":
        raise SourceError(f"{path}: cannot tell the format from suffix {suffix!r}")
    try:
        names = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{path}: not a readable parquet file: {exc}") from exc
    return "handbook" if {"TX_DATETIME", "TX_FRAUD"} <= names else "parquet"


def _bounds_ns(start: datetime | None, end: datetime | None) -> tuple[int | None, int | None]:
    """Turn optional UTC-aware bounds into epoch nanoseconds."""
    return _epoch_ns(start, "start"), _epoch_ns(end, "end")


def _epoch_ns(moment: datetime | None, name: str) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")
    return int(pd.Timestamp(moment).tz_convert("UTC").value)


def _time_filter(
    column: str, bounds: tuple[int | None, int | None], kind: pa.DataType
) -> pc.Expression | None:
    """A pyarrow dataset expression for start <= column < end, or None without bounds."""
    expression = None
    start, end = bounds
    if start is not None:
        expression = pads.field(column) >= pa.scalar(start, type=kind)
    if end is not None:
        upper = pads.field(column) < pa.scalar(end, type=kind)
        expression = upper if expression is None else expression & upper
    return expression


def _read_parquet(path: Path, schema: pa.Schema, bounds: tuple[int | None, int | None]) -> pa.Table:
    """Read the contract columns of a parquet file, pushing the time filter into pyarrow."""
    try:
        names = pq.read_schema(path).names
        columns = [name for name in schema.names if name in names]
        return pq.read_table(path, columns=columns, filters=_time_filter("timestamp", bounds, _TS))
    except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SourceError(f"{path}: cannot read parquet: {exc}") from exc


def _read_handbook(
    path: Path, bounds: tuple[int | None, int | None], label_delay_days: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Map the handbook's columns onto the transactions and labels contracts."""
    naive = pa.timestamp("ns")
    try:
        raw = pq.read_table(
            path, columns=list(HANDBOOK_COLUMNS), filters=_time_filter("TX_DATETIME", bounds, naive)
        )
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"{path}: cannot read handbook parquet: {exc}") from exc
    rows = raw.num_rows
    stamps = raw.column("TX_DATETIME").cast(naive).cast(pa.int64()).cast(_TS)
    ids = {name: raw.column(source).cast(pa.string()) for name, source in _HANDBOOK_IDS.items()}
    missing = pa.nulls(rows, pa.string())
    transactions = pa.table(
        {
            "transaction_id": ids["transaction_id"],
            "timestamp": stamps,
            "customer_id": ids["customer_id"],
            "terminal_id": ids["terminal_id"],
            "amount": _handbook_amounts(raw.column("TX_AMOUNT")),
            "currency": pa.repeat(pa.scalar("EUR"), rows),
            **{name: missing for name in OPTIONAL_TRANSACTION_COLUMNS},
        }
    )
    labels = pa.table(
        {
            "transaction_id": ids["transaction_id"],
            "customer_id": ids["customer_id"],
            "terminal_id": ids["terminal_id"],
            "timestamp": stamps,
            "is_fraud": pc.not_equal(raw.column("TX_FRAUD"), 0),
            "reported_at": _shift_days(stamps, label_delay_days),
            "scenario": _handbook_scenarios(raw.column("TX_FRAUD_SCENARIO"), path),
        }
    )
    return transactions_from_arrow(transactions, str(path)), labels_from_arrow(labels, str(path))


_HANDBOOK_IDS = {
    "transaction_id": "TRANSACTION_ID",
    "customer_id": "CUSTOMER_ID",
    "terminal_id": "TERMINAL_ID",
}


def _handbook_amounts(amounts: pa.ChunkedArray) -> pa.ChunkedArray:
    """The handbook has 33 genuine 0.00 amounts; the contract wants > 0, so they become 0.01.

    Raising them by one cent keeps every row (and the published baseline's row set) intact.
    """
    values = amounts.cast(pa.float64())
    return pc.if_else(pc.equal(values, 0.0), pa.scalar(0.01), values)


def _shift_days(stamps: pa.ChunkedArray, days: float) -> pa.Array:
    """Add a non-negative delay in days to UTC timestamps, rounding the delay up to a ns."""
    if not days >= 0:
        raise ValueError("label_delay_days must be >= 0")
    shifted = stamps.cast(pa.int64()).to_numpy() + int(np.ceil(days * _NS_PER_DAY))
    return pa.array(shifted, type=pa.int64()).cast(_TS)


def _handbook_scenarios(codes: pa.ChunkedArray, path: Path) -> pa.Array:
    """Map TX_FRAUD_SCENARIO codes 0..3 to scenario names."""
    values = codes.to_numpy()
    if values.size and (values.min() < 0 or values.max() >= len(HANDBOOK_SCENARIOS)):
        raise SourceError(f"{path}: TX_FRAUD_SCENARIO outside 0..{len(HANDBOOK_SCENARIOS) - 1}")
    return pa.array(HANDBOOK_SCENARIOS).take(pa.array(values))


# --------------------------------------------------------------------------------------------
# JSON lines reading.


def _wire_schema(schema: pa.Schema) -> pa.Schema:
    """Schema of the wire form: timestamps arrive as RFC 3339 strings."""
    return pa.schema(
        [
            (field.name, pa.string() if pa.types.is_timestamp(field.type) else field.type)
            for field in schema
        ]
    )


def _read_jsonl(
    path: Path,
    schema: pa.Schema,
    row_error: Callable[[pa.Table], tuple[int, str] | None],
    bounds: tuple[int | None, int | None],
) -> pd.DataFrame:
    """Parse JSON lines with pyarrow, then validate with vectorised checks.

    Per-line Python work only happens on the error path, to name the offending line.
    """
    wire = _wire_schema(schema)
    table = _parse_jsonl(path, wire)
    converted = []
    for field in schema:
        column = table.column(field.name)
        if pa.types.is_timestamp(field.type):
            column = _parse_timestamps(column, field.name, path)
        converted.append(column)
    table = pa.Table.from_arrays(converted, schema=schema)
    if schema is LABELS_SCHEMA:
        table = _default_scenarios(table)
    error = row_error(table)
    if error is not None:
        _raise_at_row(path, error)
    table = table.filter(_bounds_mask(table.column("timestamp"), bounds))
    return _sorted_by_time(table).to_pandas()


def _parse_jsonl(path: Path, wire: pa.Schema) -> pa.Table:
    """Parse the whole file in Arrow; on failure, find and name the first bad line."""
    try:
        if path.stat().st_size < _SMALL_FILE_BYTES and not path.read_bytes().strip():
            return wire.empty_table()
        options = pajson.ParseOptions(explicit_schema=wire, unexpected_field_behavior="error")
        table = pajson.read_json(path, parse_options=options)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc}") from exc
    except pa.ArrowInvalid as exc:
        located = _first_bad_line(path, wire)
        if located is None:
            raise SourceError(f"{path}: invalid JSON lines: {exc}") from exc
        raise SourceError(f"{path}: line {located[0]}: {located[1]}") from exc
    return table.select(wire.names)


def _first_bad_line(path: Path, wire: pa.Schema) -> tuple[int, str] | None:
    """Scan line by line (error path only) for the first line Arrow could not accept."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                return number, f"invalid JSON ({exc})"
            reason = _record_error(record, wire)
            if reason is not None:
                return number, reason
    return None


def _record_error(record: object, wire: pa.Schema) -> str | None:
    """Why one decoded JSON value does not fit the wire schema, or None."""
    if not isinstance(record, dict):
        return "expected a JSON object"
    for key, value in record.items():
        if key not in wire.names:
            return f"unexpected key {key!r}"
        if value is None:
            continue
        kind = wire.field(key).type
        if pa.types.is_string(kind) and not isinstance(value, str):
            return f"field {key!r} must be a string"
        if pa.types.is_floating(kind) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            return f"field {key!r} must be a number"
        if pa.types.is_boolean(kind) and not isinstance(value, bool):
            return f"field {key!r} must be true or false"
    return None


def _parse_timestamps(column: pa.ChunkedArray, name: str, path: Path) -> pa.ChunkedArray:
    """Parse RFC 3339 strings (zone required) to UTC nanoseconds, naming the first bad line."""
    wrong = pc.invert(pc.match_substring_regex(column, _RFC3339))
    row = _first_true(wrong)
    if row is None:
        try:
            return column.cast(_TS)
        except pa.ArrowInvalid:
            parsed = pd.to_datetime(
                pd.Series(column.to_numpy(zero_copy_only=False), dtype=object),
                utc=True,
                format="ISO8601",
                errors="coerce",
            )
            row = _first_true(pa.array(parsed.isna().to_numpy() & column.is_valid().to_numpy()))
            row = 0 if row is None else row
    _raise_at_row(
        path, (row, f"{name} must be an RFC 3339 timestamp with zone, got {column[row].as_py()!r}")
    )


def _raise_at_row(path: Path, error: tuple[int, str]) -> NoReturn:
    """Raise SourceError naming the line that holds data row `error[0]`."""
    lines = _data_line_numbers(path)
    row, reason = error
    line = int(lines[row]) if row < lines.size else row + 1
    raise SourceError(f"{path}: line {line}: {reason}")


def _data_line_numbers(path: Path) -> np.ndarray:
    """1-based line numbers of the non-blank lines (error path only)."""
    with path.open("rb") as handle:
        return np.array(
            [number for number, raw in enumerate(handle, start=1) if raw.strip()], dtype=np.int64
        )


def _default_scenarios(table: pa.Table) -> pa.Table:
    """Fill missing scenarios: the wire form carries only is_fraud."""
    fallback = pc.if_else(table.column("is_fraud"), UNKNOWN_FRAUD_SCENARIO, GENUINE)
    filled = pc.coalesce(table.column("scenario"), fallback)
    return table.set_column(table.schema.get_field_index("scenario"), "scenario", filled)


def _bounds_mask(stamps: pa.ChunkedArray, bounds: tuple[int | None, int | None]) -> pa.Array:
    """start <= stamp < end over epoch nanoseconds."""
    values = stamps.cast(pa.int64()).to_numpy()
    keep = np.ones(values.size, dtype=bool)
    if bounds[0] is not None:
        keep &= values >= bounds[0]
    if bounds[1] is not None:
        keep &= values < bounds[1]
    return pa.array(keep)


# --------------------------------------------------------------------------------------------
# Wire form.


def transactions_to_json(df: pd.DataFrame) -> list[bytes]:
    """The Kafka wire form of each transaction: one UTF-8 JSON object per row, None omitted."""
    return _json_records(_frame_to_arrow(df, TRANSACTIONS_SCHEMA))


def labels_to_json(df: pd.DataFrame) -> list[bytes]:
    """The wire form of each label (no scenario: consumers only learn is_fraud)."""
    table = _frame_to_arrow(df, LABELS_SCHEMA)
    return _json_records(table.select(list(LABEL_WIRE_COLUMNS)))


def customer_keys(df: pd.DataFrame) -> list[bytes]:
    """Kafka keys (UTF-8 customer ids) so a customer's events stay in one partition."""
    return pa.array(df["customer_id"].to_numpy(dtype=object)).cast(pa.binary()).to_pylist()


def _json_records(table: pa.Table) -> list[bytes]:
    """One bytes object per row; the per-row work is Arrow's list conversion only."""
    records: list[bytes] = []
    for rows in _json_batches(table):
        records.extend(rows.cast(pa.binary()).to_pylist())
    return records


def _json_batches(table: pa.Table) -> Iterator[pa.Array]:
    """Compose JSON objects column by column in Arrow, in batches to bound memory."""
    for start in range(0, table.num_rows, _JSON_BATCH_ROWS):
        batch = table.slice(start, _JSON_BATCH_ROWS)
        parts: list[Any] = ["{"]
        for index, field in enumerate(batch.schema):
            prefix = ("," if index else "") + json.dumps(field.name) + ":"
            values = _json_values(batch.column(index).combine_chunks())
            parts.append(pc.binary_join_element_wise(prefix, values, ""))
        parts.append("}")
        yield pc.binary_join_element_wise(*parts, "", null_handling="replace", null_replacement="")


def _json_values(values: pa.Array) -> pa.Array:
    """JSON text of each value of one column; nulls stay null so the key is omitted."""
    kind = values.type
    if pa.types.is_timestamp(kind):
        return _rfc3339_quoted(values)
    if pa.types.is_floating(kind):
        return _two_decimals(values)
    if pa.types.is_boolean(kind):
        return pc.if_else(values, "true", "false")
    return _json_strings(values)


def _json_strings(values: pa.Array) -> pa.Array:
    """Quote strings; only values that need escaping go through json.dumps."""
    if not _may_need_escape(values):
        return pc.binary_join_element_wise('"', values, '"', "")
    return pa.array(
        [
            None if text is None else json.dumps(text, ensure_ascii=False)
            for text in values.to_pylist()
        ],
        type=pa.string(),
    )


def _may_need_escape(values: pa.Array) -> bool:
    """Scan the raw UTF-8 bytes for quotes, backslashes and control characters.

    Reading the data buffer with numpy is far cheaper than a regex per value; bytes of null
    slots can only cause a false positive, which merely takes the slow, exact path.
    """
    if len(values) == 0:
        return False
    offsets_buffer, data_buffer = values.buffers()[1:3]
    if data_buffer is None:
        return False
    offset_type = np.int64 if pa.types.is_large_string(values.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)
    first, last = offsets[values.offset], offsets[values.offset + len(values)]
    data = np.frombuffer(data_buffer, dtype=np.uint8)[first:last]
    return bool(((data < 0x20) | (data == ord('"')) | (data == ord("\\"))).any())


def _rfc3339_quoted(stamps: pa.Array) -> pa.Array:
    """'"YYYY-MM-DDTHH:MM:SS.ffffffZ"' per timestamp (truncated to microseconds)."""
    micros = stamps.cast(pa.int64()).to_numpy(zero_copy_only=False) // 1000
    days, in_day = np.divmod(micros, _US_PER_DAY)
    unique_days, day_index = np.unique(days, return_inverse=True)
    dates = np.datetime_as_string(unique_days.astype("datetime64[D]"), unit="D")
    if dates.size and np.strings.str_len(dates).max() != 10:
        raise ValueError("timestamps must fall in years 0000..9999")
    date_chars = dates.astype("S10").view(np.uint8).reshape(-1, 10)
    chars = np.empty((micros.size, len(_RFC3339_TEMPLATE)), dtype=np.uint8)
    chars[:] = np.frombuffer(_RFC3339_TEMPLATE, dtype=np.uint8)
    chars[:, 1:11] = date_chars[day_index.reshape(-1)]
    seconds, fraction = np.divmod(in_day, 1_000_000)
    put_digits(chars, 12, seconds // 3600, 2)
    put_digits(chars, 15, seconds // 60 % 60, 2)
    put_digits(chars, 18, seconds % 60, 2)
    put_digits(chars, 21, fraction, 6)
    return strings_from_chars(chars)


def _two_decimals(amounts: pa.Array) -> pa.Array:
    """Amounts as JSON numbers with exactly two decimals, e.g. 12.30."""
    values = amounts.to_numpy(zero_copy_only=False)
    if not np.isfinite(values).all():
        raise ValueError("amounts must be finite to be written as JSON")
    cents = np.rint(np.abs(values) * 100).astype(np.int64)
    whole = pa.array(cents // 100).cast(pa.string())
    fraction = np.empty((cents.size, 2), dtype=np.uint8)
    put_digits(fraction, 0, cents % 100, 2)
    sign = pc.if_else(pa.array(values < 0), "-", "")
    return pc.binary_join_element_wise(sign, whole, ".", strings_from_chars(fraction), "")


# --------------------------------------------------------------------------------------------
# Writers.


def write_frame(df: pd.DataFrame, path: Path | str) -> None:
    """Write a transactions (or labels) frame as `.parquet` (zstd) or `.jsonl` (wire form)."""
    if set(df.columns) == set(LABEL_COLUMNS):
        write_labels(df, path)
        return
    path = Path(path)
    if _is_jsonl(path):
        _write_lines(_frame_to_arrow(df, TRANSACTIONS_SCHEMA), path)
    else:
        _write_parquet(_frame_to_arrow(df, TRANSACTIONS_SCHEMA), path)


def write_labels(df: pd.DataFrame, path: Path | str) -> None:
    """Write a labels frame as `.parquet` (all columns) or `.jsonl` (label wire form)."""
    path = Path(path)
    if _is_jsonl(path):
        _write_lines(_frame_to_arrow(df, LABELS_SCHEMA).select(list(LABEL_WIRE_COLUMNS)), path)
    else:
        _write_parquet(_frame_to_arrow(df, LABELS_SCHEMA), path)


def _is_jsonl(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return True
    if suffix == ".parquet":
        return False
    raise ValueError(f"{path}: unsupported suffix {suffix!r} (use .parquet or .jsonl)")


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write atomically so readers never see a half-written file."""
    temporary = path.with_name(path.name + ".tmp")
    pq.write_table(table, temporary, compression="zstd")
    os.replace(temporary, path)


def _write_lines(table: pa.Table, path: Path) -> None:
    """Write the wire form, one record per line, atomically and straight from Arrow buffers."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        for rows in _json_batches(table):
            lines = pc.binary_join_element_wise(rows, "\n", "").cast(pa.large_string())
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)
            data = lines.buffers()[2]
            first, last = offsets[lines.offset], offsets[lines.offset + len(lines)]
            handle.write(memoryview(data)[first:last])
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------
# Kafka.


def produce(
    values: list[bytes],
    keys: list[bytes],
    bootstrap: str,
    topic: str,
    rate: float | None,
    extra_config: dict[str, str] | None = None,
    progress: bool = True,
    flush_timeout_s: float = 60.0,
) -> int:
    """Send keyed records to Kafka, optionally paced to `rate` events/s; return the count sent.

    Idempotent, acks=all producer; raises ProduceError if any record was not acknowledged.
    """
    if len(values) != len(keys):
        raise ValueError(f"{len(values)} values but {len(keys)} keys")
    if rate is not None and not rate > 0:
        raise ValueError("rate must be > 0 events/s")
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "linger.ms": 5,
        "acks": "all",
        "enable.idempotence": True,
        **(extra_config or {}),
    }
    producer = Producer(config)
    failures: list[str] = []

    def on_delivery(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    chunk = _chunk_size(rate)
    began = time.monotonic()
    with _progress_bar(progress, len(values), topic) as advance:
        for low in range(0, len(values), chunk):
            high = min(low + chunk, len(values))
            for index in range(low, high):
                _send(producer, topic, values[index], keys[index], on_delivery)
            producer.poll(0)
            advance(high - low)
            if rate is not None:
                _pace(began, high / rate)
    undelivered = producer.flush(flush_timeout_s)
    if undelivered:
        raise ProduceError(f"{undelivered} records to {topic!r} still unacknowledged after flush")
    if failures:
        raise ProduceError(
            f"{len(failures)} of {len(values)} records to {topic!r} failed; first: {failures[0]}"
        )
    return len(values)


def _chunk_size(rate: float | None) -> int:
    """Records per pacing step: about ten steps a second when paced."""
    if rate is None:
        return 10_000
    return max(1, min(10_000, int(rate / 10)))


def _send(
    producer: Any, topic: str, value: bytes, key: bytes, on_delivery: Callable[..., None]
) -> None:
    """Produce one record, waiting for queue space instead of failing on BufferError."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)


def _pace(began: float, due_s: float) -> None:
    """Sleep until `due_s` after `began` (monotonic), if ahead of schedule."""
    ahead = began + due_s - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)


@contextmanager
def _progress_bar(enabled: bool, total: int, topic: str) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n)` callback, backed by a rich progress bar when enabled."""
    if not enabled:
        yield lambda _count: None
        return
    columns = (
        TextColumn(f"producing to {topic}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("produce", total=total)
        yield lambda count: bar.advance(task, count)
