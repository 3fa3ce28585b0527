"""File formats and the wire form: round trips, strict parsing, the handbook adapter, producing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import app.sources as sources
from app.simulator import simulate
from app.sources import (
    LABEL_COLUMNS,
    LABEL_WIRE_COLUMNS,
    REQUIRED_TRANSACTION_COLUMNS,
    TRANSACTION_COLUMNS,
    ProduceError,
    SourceError,
    customer_keys,
    labels_to_json,
    produce,
    read_handbook,
    read_labels,
    read_transactions,
    transactions_to_json,
    write_frame,
    write_labels,
)

HANDBOOK = sources.HANDBOOK_PATH
needs_handbook = pytest.mark.skipif(
    not HANDBOOK.exists(), reason=f"handbook data set not found at {HANDBOOK}"
)
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate(customers=200, terminals=400, days=7, seed=3)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_transactions_round_trip(frames, tmp_path, suffix) -> None:
    path = tmp_path / f"tx{suffix}"
    write_frame(frames[0], path)
    back, labels = read_transactions(path)
    assert labels is None
    pd.testing.assert_frame_equal(back, frames[0])


def test_labels_round_trip_parquet(frames, tmp_path) -> None:
    write_labels(frames[1], tmp_path / "labels.parquet")
    pd.testing.assert_frame_equal(read_labels(tmp_path / "labels.parquet"), frames[1])


def test_labels_round_trip_jsonl_loses_only_the_scenario(frames, tmp_path) -> None:
    write_frame(frames[1], tmp_path / "labels.jsonl")  # write_frame dispatches on columns
    back = read_labels(tmp_path / "labels.jsonl")
    expected = frames[1].assign(
        scenario=np.where(frames[1]["is_fraud"], sources.UNKNOWN_FRAUD_SCENARIO, "genuine")
    )
    expected["scenario"] = expected["scenario"].astype(back["scenario"].dtype)
    pd.testing.assert_frame_equal(back, expected)


def test_time_filter_on_parquet_and_jsonl(frames, tmp_path) -> None:
    start = datetime(2026, 1, 3, tzinfo=UTC)
    end = datetime(2026, 1, 5, tzinfo=UTC)
    stamps = frames[0]["timestamp"]
    expected = frames[0][(stamps >= start) & (stamps < end)].reset_index(drop=True)
    for suffix in (".parquet", ".jsonl"):
        write_frame(frames[0], tmp_path / f"tx{suffix}")
        back, _ = read_transactions(tmp_path / f"tx{suffix}", start=start, end=end)
        pd.testing.assert_frame_equal(back, expected)
    with pytest.raises(ValueError, match="timezone-aware"):
        read_transactions(tmp_path / "tx.jsonl", start=datetime(2026, 1, 3))


def test_transaction_wire_form(frames) -> None:
    transactions = frames[0]
    records = transactions_to_json(transactions)
    assert len(records) == len(transactions)
    for raw, (_, row) in zip(records[:500], transactions.head(500).iterrows(), strict=True):
        decoded = json.loads(raw.decode("utf-8"))
        assert set(REQUIRED_TRANSACTION_COLUMNS) <= decoded.keys() <= set(TRANSACTION_COLUMNS)
        present = {name for name in TRANSACTION_COLUMNS if not pd.isna(row[name])}
        assert decoded.keys() == present
        assert RFC3339_UTC.fullmatch(decoded["timestamp"])
        assert pd.Timestamp(decoded["timestamp"]) == row["timestamp"]
        assert re.search(rb'"amount":\d+\.\d{2}[,}]', raw)
        assert decoded["amount"] == row["amount"]
    pos = transactions.index[transactions["channel"] == "pos"][0]
    assert b"device_id" not in records[pos] and b"ip" not in records[pos]


def test_label_wire_form(frames) -> None:
    records = labels_to_json(frames[1])
    decoded = [json.loads(raw) for raw in records]
    assert all(tuple(item) == LABEL_WIRE_COLUMNS for item in decoded)
    assert all(isinstance(item["is_fraud"], bool) for item in decoded)
    assert all(RFC3339_UTC.fullmatch(item["reported_at"]) for item in decoded)
    assert [item["is_fraud"] for item in decoded] == frames[1]["is_fraud"].tolist()


def test_strings_needing_escapes_survive_the_wire(frames, tmp_path) -> None:
    odd = frames[0].head(3).copy()
    odd["merchant_category"] = odd["merchant_category"].astype(object)
    odd.loc[odd.index[0], "device_id"] = 'dev "quoted" \\ back\nslash'
    odd.loc[odd.index[1], "device_id"] = "dév-ünicode-✓"
    write_frame(odd, tmp_path / "odd.jsonl")
    back, _ = read_transactions(tmp_path / "odd.jsonl")
    assert back["device_id"].tolist()[:2] == odd["device_id"].tolist()[:2]
    assert json.loads(transactions_to_json(odd)[0])["device_id"] == odd["device_id"].iloc[0]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"transaction_id": "x", "timestamp": ', "invalid JSON"),
        ('{"transaction_id": "x", "amount": "12.00"}', "amount"),
        ('{"transaction_id": "x", "colour": "red"}', "unexpected key"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(frames, tmp_path, bad_line, reason) -> None:
    good = [raw.decode() for raw in transactions_to_json(frames[0].head(3))]
    path = write_lines(tmp_path / "bad.jsonl", [good[0], "", good[1], bad_line, good[2]])
    with pytest.raises(SourceError, match=rf"bad\.jsonl: line 4: .*{reason}"):
        read_transactions(path)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("timestamp", "2026-01-01T10:00:00", "RFC 3339"),
        ("timestamp", "2026-13-01T10:00:00Z", "RFC 3339"),
        ("amount", -1.5, "amount"),
        ("customer_id", None, "customer_id"),
        ("channel", "phone", "channel"),
    ],
)
def test_invalid_values_name_the_line(frames, tmp_path, field, value, reason) -> None:
    good = [json.loads(raw) for raw in transactions_to_json(frames[0].head(4))]
    good[2][field] = value
    path = write_lines(tmp_path / "bad.jsonl", ["", *[json.dumps(item) for item in good]])
    with pytest.raises(SourceError, match=rf"line 4: .*{reason}"):
        read_transactions(path)


def test_duplicate_ids_rejected(frames, tmp_path) -> None:
    doubled = pd.concat([frames[0].head(3), frames[0].head(1)], ignore_index=True)
    write_frame(doubled, tmp_path / "dup.parquet")
    with pytest.raises(SourceError, match="duplicate transaction_id"):
        read_transactions(tmp_path / "dup.parquet")
    assert issubclass(SourceError, ValueError)


def test_unsorted_input_is_sorted(frames, tmp_path) -> None:
    shuffled = frames[0].sample(frac=1.0, random_state=0)
    path = write_lines(
        tmp_path / "shuffled.jsonl", [raw.decode() for raw in transactions_to_json(shuffled)]
    )
    pd.testing.assert_frame_equal(read_transactions(path)[0], frames[0])


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_empty_frame_round_trip(frames, tmp_path, suffix) -> None:
    empty = frames[0].iloc[:0]
    write_frame(empty, tmp_path / f"empty{suffix}")
    back, _ = read_transactions(tmp_path / f"empty{suffix}")
    pd.testing.assert_frame_equal(back, empty.reset_index(drop=True), check_index_type=False)


def test_naive_timestamps_refused_on_write(frames, tmp_path) -> None:
    naive = frames[0].assign(timestamp=frames[0]["timestamp"].dt.tz_localize(None))
    with pytest.raises(ValueError, match="UTC-aware"):
        write_frame(naive, tmp_path / "naive.parquet")


def test_customer_keys(frames) -> None:
    keys = customer_keys(frames[0])
    assert keys[:3] == [value.encode() for value in frames[0]["customer_id"].head(3)]


@needs_handbook
def test_handbook_week_maps_to_the_contract() -> None:
    start = datetime(2018, 8, 8, tzinfo=UTC)
    end = start + timedelta(days=7)
    transactions, labels = read_transactions(HANDBOOK, fmt="handbook", start=start, end=end)
    assert labels is not None
    assert len(transactions) > 0
    assert tuple(transactions.columns) == TRANSACTION_COLUMNS
    assert tuple(labels.columns) == LABEL_COLUMNS
    assert str(transactions["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert str(labels["reported_at"].dtype) == "datetime64[ns, UTC]"
    assert transactions["amount"].dtype == np.float64 and (transactions["amount"] > 0).all()
    assert transactions["timestamp"].between(start, end, inclusive="left").all()
    assert transactions["transaction_id"].str.fullmatch(r"\d+").all()
    assert (transactions["currency"] == "EUR").all()
    assert transactions[list(TRANSACTION_COLUMNS[6:])].isna().all().all()
    assert labels["transaction_id"].tolist() == transactions["transaction_id"].tolist()
    assert (labels["reported_at"] - labels["timestamp"] == pd.Timedelta(days=7)).all()
    assert set(labels["scenario"]) <= set(sources.HANDBOOK_SCENARIOS)
    assert (labels["is_fraud"] == (labels["scenario"] != "genuine")).all()
    assert 0.001 <= labels["is_fraud"].mean() <= 0.03
    outliers = transactions.loc[labels["scenario"] == "amount_outlier", "amount"]
    assert (outliers > 220).all()


@needs_handbook
def test_handbook_detected_automatically() -> None:
    start = datetime(2018, 4, 1, tzinfo=UTC)
    auto, auto_labels = read_transactions(HANDBOOK, start=start, end=start + timedelta(days=1))
    explicit, _ = read_handbook(HANDBOOK, start=start, end=start + timedelta(days=1))
    pd.testing.assert_frame_equal(auto, explicit)
    assert auto_labels is not None


class FakeProducer:
    """Stands in for confluent_kafka.Producer: queues records, reports deliveries on poll."""

    instances: list[FakeProducer] = []  # noqa: RUF012 - test bookkeeping

    def __init__(self, config: dict[str, object]) -> None:
        self.config = config
        self.pending: list[tuple[bytes, bytes, object]] = []
        self.sent: list[tuple[bytes, bytes]] = []
        self.full_once = True
        self.fail_keys: set[bytes] = set()
        FakeProducer.instances.append(self)

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery) -> None:
        if self.full_once and len(self.pending) == 2:
            self.full_once = False
            raise BufferError("queue full")
        self.pending.append((key, value, on_delivery))

    def poll(self, _timeout: float = 0) -> int:
        delivered = len(self.pending)
        for key, value, callback in self.pending:
            error = "broker down" if key in self.fail_keys else None
            if error is None:
                self.sent.append((key, value))
            callback(error, None)
        self.pending.clear()
        return delivered

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0


def test_produce_sends_everything_with_safe_config(monkeypatch) -> None:
    monkeypatch.setattr(sources, "Producer", FakeProducer)
    values = [f"v{i}".encode() for i in range(25)]
    keys = [f"k{i}".encode() for i in range(25)]
    sent = produce(values, keys, "localhost:9092", "transactions", rate=5_000, progress=False)
    producer = FakeProducer.instances[-1]
    assert sent == 25
    assert producer.sent == list(zip(keys, values, strict=True))
    assert producer.config["acks"] == "all"
    assert producer.config["enable.idempotence"] is True
    assert producer.config["linger.ms"] == 5


def test_produce_raises_when_deliveries_fail(monkeypatch) -> None:
    class Failing(FakeProducer):
        def __init__(self, config: dict[str, object]) -> None:
            super().__init__(config)
            self.fail_keys = {b"k1"}

    monkeypatch.setattr(sources, "Producer", Failing)
    with pytest.raises(ProduceError, match="1 of 3 records"):
        produce([b"a", b"b", b"c"], [b"k0", b"k1", b"k2"], "x:1", "t", rate=None, progress=False)
    with pytest.raises(ValueError):
        produce([b"a"], [], "x:1", "t", rate=None, progress=False)
