"""The simulator's contract: deterministic, realistic enough, every fraud scenario present."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.schemas import luhn_ok as luhn_valid
from app.simulator import FraudRates, luhn_check_digits, simulate
from app.sources import LABEL_COLUMNS, TRANSACTION_COLUMNS, write_frame, write_labels

SCENARIOS = {
    "amount_outlier",
    "compromised_terminal",
    "compromised_card",
    "card_testing",
    "account_takeover",
}


def reference_luhn_valid(number: str) -> bool:
    """Textbook Luhn, written independently of the vectorised implementation."""
    if len(number) < 2 or not number.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = int(char)
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate(customers=2000, terminals=4000, days=30, seed=11)


def test_same_seed_gives_identical_frames_and_files(tmp_path) -> None:
    first = simulate(customers=300, terminals=600, days=10, seed=5)
    second = simulate(customers=300, terminals=600, days=10, seed=5)
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    for name, run in (("a", first), ("b", second)):
        write_frame(run[0], tmp_path / f"{name}.parquet")
        write_frame(run[0], tmp_path / f"{name}.jsonl")
        write_labels(run[1], tmp_path / f"{name}-labels.parquet")
    for suffix in (".parquet", ".jsonl", "-labels.parquet"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()


def test_different_seed_gives_different_frames() -> None:
    first, _ = simulate(customers=300, terminals=600, days=10, seed=5)
    other, _ = simulate(customers=300, terminals=600, days=10, seed=6)
    assert not first.equals(other)
    assert set(first["transaction_id"]).isdisjoint(other["transaction_id"])


def test_columns_and_dtypes_follow_the_contract(frames) -> None:
    transactions, labels = frames
    assert tuple(transactions.columns) == TRANSACTION_COLUMNS
    assert tuple(labels.columns) == LABEL_COLUMNS
    assert str(transactions["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert str(labels["reported_at"].dtype) == "datetime64[ns, UTC]"
    assert transactions["amount"].dtype == np.float64
    assert labels["is_fraud"].dtype == bool
    assert transactions["transaction_id"].is_unique
    assert set(transactions["channel"]) == {"pos", "ecom", "atm"}
    assert (transactions["currency"] == "EUR").all()
    assert transactions["merchant_category"].str.fullmatch(r"\d{4}").all()
    assert transactions["country"].str.fullmatch(r"[A-Z]{2}").all()


def test_rows_sorted_by_time_then_id_within_the_period(frames) -> None:
    transactions, _ = frames
    resorted = transactions.sort_values(["timestamp", "transaction_id"], kind="stable")
    assert resorted.index.equals(transactions.index)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert transactions["timestamp"].min() >= start
    assert transactions["timestamp"].max() < start + timedelta(days=30)
    hours = transactions["timestamp"].dt.hour
    assert (hours.between(9, 15)).mean() > 2 * (hours < 6).mean()


def test_amounts_positive_with_two_decimals(frames) -> None:
    amount = frames[0]["amount"].to_numpy()
    assert (amount > 0).all()
    np.testing.assert_allclose(np.round(amount, 2), amount, rtol=0, atol=1e-9)


def test_card_numbers_are_16_digit_luhn_valid_test_pans(frames) -> None:
    cards = frames[0]["card_number"]
    assert cards.notna().all()
    assert cards.str.fullmatch(r"4000\d{12}").all()
    unique = cards.unique()
    assert all(reference_luhn_valid(card) and luhn_valid(card) for card in unique)
    per_customer = frames[0].groupby("customer_id")["card_number"].nunique()
    assert (per_customer == 1).all()
    assert len(unique) == frames[0]["customer_id"].nunique()


def test_luhn_valid_on_known_numbers() -> None:
    classic = "79927398713"
    assert reference_luhn_valid(classic)
    assert luhn_valid(classic)
    for position in range(len(classic)):
        for digit in "0123456789":
            altered = classic[:position] + digit + classic[position + 1 :]
            assert luhn_valid(altered) == reference_luhn_valid(altered)
            if altered != classic:
                assert not luhn_valid(altered)
    for junk in ("", "7", "7992739871a", "7992 7398 713", "٧٩٩٢٧٣٩٨٧١٣"):
        assert not luhn_valid(junk)


@given(st.text(alphabet="0123456789", min_size=2, max_size=24))
def test_luhn_valid_matches_reference(number: str) -> None:
    assert luhn_valid(number) == reference_luhn_valid(number)


@given(st.lists(st.integers(0, 9), min_size=1, max_size=20))
def test_check_digit_makes_payload_valid(payload: list[int]) -> None:
    check = luhn_check_digits(np.array([payload]))[0]
    assert reference_luhn_valid("".join(map(str, payload)) + str(check))


def test_every_scenario_present_at_a_plausible_rate(frames) -> None:
    _, labels = frames
    counts = labels["scenario"].value_counts()
    assert set(counts.index) == SCENARIOS | {"genuine"}
    assert (labels["is_fraud"] == (labels["scenario"] != "genuine")).all()
    assert 0.005 <= labels["is_fraud"].mean() <= 0.05
    for scenario in SCENARIOS:
        assert counts[scenario] > 0, scenario


def test_outliers_exceed_220(frames) -> None:
    transactions, labels = frames
    assert (transactions.loc[labels["scenario"] == "amount_outlier", "amount"] > 220).all()


def test_card_testing_bursts_are_small_ecom_amounts_within_minutes(frames) -> None:
    transactions, labels = frames
    rows = transactions[labels["scenario"] == "card_testing"].sort_values(
        ["card_number", "timestamp"], kind="stable"
    )
    assert rows["amount"].between(0.5, 3.0).all()
    assert (rows["channel"] == "ecom").all()
    gap = rows.groupby("card_number")["timestamp"].diff()
    burst = (gap.isna() | (gap > pd.Timedelta(minutes=5))).cumsum()
    bursts = rows.groupby(burst).agg(
        size=("amount", "size"),
        span=("timestamp", lambda stamps: stamps.max() - stamps.min()),
        terminals=("terminal_id", "nunique"),
        devices=("device_id", "nunique"),
    )
    assert len(bursts) >= 3
    assert bursts["size"].between(5, 15).all()
    assert (bursts["span"] <= pd.Timedelta(minutes=10)).all()
    assert (bursts["terminals"] == 1).all()
    assert (bursts["devices"] == 1).all()


def test_account_takeover_uses_a_new_device_abroad(frames) -> None:
    transactions, labels = frames
    takeover = labels["scenario"] == "account_takeover"
    assert transactions.loc[takeover, ["device_id", "ip"]].notna().all().all()
    with_device = transactions[transactions["device_id"].notna()].assign(takeover=takeover)
    first_use = with_device.groupby(["card_number", "device_id"], sort=False)["takeover"].first()
    used_by_takeover = (
        with_device[with_device["takeover"]].set_index(["card_number", "device_id"]).index.unique()
    )
    assert first_use.loc[used_by_takeover].all(), "takeover device seen earlier on the card"
    genuine = transactions[labels["scenario"] == "genuine"]
    home = genuine.groupby("card_number")["country"].agg(lambda c: c.mode().iloc[0])
    rows = transactions[takeover & transactions["card_number"].isin(home.index)]
    assert len(rows) > 0
    assert (rows["country"].to_numpy() != home.loc[rows["card_number"]].to_numpy()).all()
    genuine_ips = set(transactions.loc[~takeover, "ip"].dropna())
    assert genuine_ips.isdisjoint(rows["ip"])


def test_labels_one_per_transaction_and_delayed() -> None:
    transactions, labels = simulate(
        customers=300, terminals=600, days=10, seed=8, label_delay_days=3.5
    )
    assert labels["transaction_id"].tolist() == transactions["transaction_id"].tolist()
    assert labels["timestamp"].equals(transactions["timestamp"])
    assert (labels["customer_id"] == transactions["customer_id"]).all()
    delay = labels["reported_at"] - labels["timestamp"]
    fraud = labels["is_fraud"].to_numpy()
    assert (delay[~fraud] == pd.Timedelta(days=3.5)).all()
    assert (delay[fraud] >= pd.Timedelta(days=0.7)).all()
    assert (delay[fraud] <= pd.Timedelta(days=3.5)).all()
    assert delay[fraud].std() > pd.Timedelta(hours=6)


def test_fraud_can_be_switched_off() -> None:
    none = FraudRates(
        amount_outlier=0,
        compromised_terminals=0,
        compromised_cards=0,
        card_testing=0,
        account_takeover=0,
    )
    _, labels = simulate(customers=200, terminals=400, days=5, seed=1, fraud=none)
    assert not labels["is_fraud"].any()


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        simulate(customers=10, terminals=10, days=1, seed=1, start=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        simulate(customers=0, terminals=10, days=1, seed=1)
    with pytest.raises(ValueError):
        FraudRates(card_testing=-1)


def test_one_million_transactions_simulate_in_under_60_seconds() -> None:
    began = time.perf_counter()
    transactions, labels = simulate(customers=10_000, terminals=20_000, days=50, seed=3)
    elapsed = time.perf_counter() - began
    assert len(transactions) >= 950_000
    assert len(labels) == len(transactions)
    assert elapsed < 60, f"{len(transactions)} rows took {elapsed:.1f} s"
