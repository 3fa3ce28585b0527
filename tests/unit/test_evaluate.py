"""The handbook's metrics on hand-built cases, against a port of its pandas code, and the
`evaluate` command's refusals."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from app.cli import app
from app.sources import HANDBOOK_PATH, read_transactions
from features.definitions import FEATURE_NAMES
from models.evaluate import (
    average_precision,
    card_precision_at_k,
    detection_metrics,
    handbook_test_rows,
    utc_days,
)

runner = CliRunner()
needs_handbook = pytest.mark.skipif(not HANDBOOK_PATH.exists(),
                                    reason=f"handbook data set not found at {HANDBOOK_PATH}")


def handbook_card_precision(df: pd.DataFrame, k: int) -> float:
    """The handbook's card_precision_top_k / _day (shared_functions.py), ported as is."""
    detected: list = []
    per_day = []
    for day in sorted(df["day"].unique()):
        d = df[df["day"] == day][["p", "card", "y"]]
        d = d[~d["card"].isin(detected)]
        d = d.groupby("card").max().sort_values(by="p", ascending=False).reset_index()
        top = d.head(k)
        hits = list(top[top["y"] == 1]["card"])
        per_day.append(len(hits) / k)
        detected.extend(hits)
    return float(np.mean(per_day))


# --- Card Precision@k ------------------------------------------------------------------------

def test_card_precision_hand_built() -> None:
    # day 0: A (max 0.9, fraud), B (0.8, genuine), C (0.7, fraud); top 2 = A, B → 1/2,
    # A detected. Day 1: A dropped; C (0.6, fraud), B (0.5), D (0.1); top 2 = C, B → 1/2.
    day = [0, 0, 0, 0, 1, 1, 1, 1]
    card = ["A", "A", "B", "C", "A", "B", "C", "D"]
    y = [0, 1, 0, 1, 1, 0, 1, 0]
    p = [0.9, 0.2, 0.8, 0.7, 0.99, 0.5, 0.6, 0.1]
    mean, per_day = card_precision_at_k(day, card, y, p, k=2)
    assert per_day == [0.5, 0.5] and mean == 0.5
    # without removing detected cards, A comes back on day 1: A, C → 2/2
    _, kept = card_precision_at_k(day, card, y, p, k=2, remove_detected=False)
    assert kept == [0.5, 1.0]


def test_card_precision_uses_card_maxima_and_divides_by_k() -> None:
    # the card's max score (0.9, a genuine transaction) and max label (its other one)
    mean, per_day = card_precision_at_k([5, 5, 5], ["A", "A", "B"], [0, 1, 0],
                                        [0.9, 0.1, 0.5], k=10)
    assert per_day == [0.1] and mean == pytest.approx(0.1)


def test_card_precision_only_counts_top_k() -> None:
    _, per_day = card_precision_at_k([0, 0, 0], ["A", "B", "C"], [0, 0, 1], [0.9, 0.8, 0.1],
                                     k=2)
    assert per_day == [0.0]


def test_card_precision_matches_the_handbook_code() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    frame = pd.DataFrame({"day": rng.integers(0, 6, n), "card": rng.integers(0, 400, n),
                          "y": (rng.random(n) < 0.05).astype(int), "p": rng.random(n)})
    frame.loc[frame["y"] == 1, "p"] += 0.3  # some signal, so cards get detected
    for k in (10, 50):
        mine, _ = card_precision_at_k(frame["day"], frame["card"], frame["y"], frame["p"], k)
        assert mine == pytest.approx(handbook_card_precision(frame, k))


# --- AUC, AP, test set -------------------------------------------------------------------------

def test_average_precision_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(3000) < 0.1
    p = np.round(rng.random(3000) + 0.3 * y, 1)  # coarse scores: many ties
    assert average_precision(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert average_precision([0, 1, 0, 1], [0.1, 0.9, 0.8, 0.2]) == pytest.approx(
        (1 / 1 + 2 / 3) / 2)


def test_detection_metrics() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.2
    p = rng.random(500) + 0.5 * y
    out = detection_metrics(np.zeros(500, int), np.arange(500), y, p, k=100)
    assert set(out) == {"auc_roc", "average_precision", "card_precision_at_100",
                        "n_transactions", "n_frauds"}
    assert out["auc_roc"] == pytest.approx(roc_auc_score(y, p))
    assert out["n_transactions"] == 500 and out["n_frauds"] == int(y.sum())


def test_test_rows_leave_out_cards_known_before_each_day() -> None:
    # known_from 10, delay 2: on test day d a fraud on days 10 … d-3 makes the card known.
    day = np.array([9, 11, 20, 21, 20, 21, 22, 22, 21])
    card = np.array(["A", "B", "A", "A", "B", "B", "B", "C", "C"])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 1, 0])
    keep = handbook_test_rows(day, card, y, test_days=[20, 21, 22], known_from=10,
                              delay_days=2)
    # A's fraud is before known_from: kept; B's (day 11) is known from day 14: out;
    # C's fraud on day 22 is not known on days 21 or 22.
    assert keep.tolist() == [False, False, True, True, False, False, False, True, True]


def test_utc_days_need_aware_timestamps() -> None:
    ts = pd.Series(pd.to_datetime(["1970-01-02 23:59", "1970-01-03 00:00"]))
    with pytest.raises(ValueError):
        utc_days(ts)
    assert utc_days(ts.dt.tz_localize("UTC")).tolist() == [1, 2]


@needs_handbook
def test_handbook_baseline_test_set_has_its_published_size() -> None:
    """Chapter 3: training 2018-07-25..31, delay 7 days, test 08-08..14 → 58,264
    transactions of which 385 frauds."""
    tx, labels = read_transactions(HANDBOOK_PATH, "handbook",
                                   start=datetime(2018, 7, 25, tzinfo=UTC),
                                   end=datetime(2018, 8, 15, tzinfo=UTC))
    assert labels is not None
    day = utc_days(tx["timestamp"])
    first = int(day.min())
    keep = handbook_test_rows(day, tx["customer_id"].to_numpy(), labels["is_fraud"].to_numpy(),
                              range(first + 14, first + 21), known_from=first, delay_days=7)
    assert int(keep.sum()) == 58_264
    assert int(labels["is_fraud"].to_numpy()[keep].sum()) == 385


# --- the command ------------------------------------------------------------------------------

def model_folder(tmp_path: Path) -> Path:
    """A tiny real LightGBM model in a folder the registry accepts."""
    import lightgbm as lgb

    rng = np.random.default_rng(2)
    x = rng.random((400, len(FEATURE_NAMES)))
    y = (x[:, 0] > 0.8).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1},
                        lgb.Dataset(x, y, feature_name=list(FEATURE_NAMES)), 5)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "booster.txt").write_text(booster.model_to_string(), encoding="utf-8")
    digest = hashlib.sha256((folder / "booster.txt").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps({
        "version": "test", "features": list(FEATURE_NAMES), "files": {"booster.txt": digest},
    }), encoding="utf-8")
    return folder


def said(result: object) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(str(getattr(result, "output", "")).split())


def evaluate_args(model: Path, data: Path, start: str, end: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--data", str(data), "--format", "handbook",
            "--test-start", start, "--test-end", end, "--json"]


@pytest.mark.parametrize(("start", "end", "message"), [
    ("2018-08-14", "2018-08-08", "before"),
    ("2018-08-0x", "2018-08-14", "not a date"),
])
def test_evaluate_refuses_bad_dates(tmp_path: Path, start: str, end: str, message: str) -> None:
    result = runner.invoke(app, evaluate_args(model_folder(tmp_path), HANDBOOK_PATH, start, end))
    assert result.exit_code == 2 and message in said(result)


def test_evaluate_refuses_a_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, evaluate_args(model_folder(tmp_path), tmp_path / "none.parquet",
                                              "2018-08-08", "2018-08-14"))
    assert result.exit_code == 2 and "no such file" in said(result)


@needs_handbook
def test_evaluate_refuses_an_unknown_model(tmp_path: Path) -> None:
    result = runner.invoke(app, evaluate_args(tmp_path / "nowhere", HANDBOOK_PATH,
                                              "2018-08-08", "2018-08-14"))
    assert result.exit_code == 2 and "--model" in said(result)


@needs_handbook
def test_evaluate_refuses_an_empty_range(tmp_path: Path) -> None:
    result = runner.invoke(app, evaluate_args(model_folder(tmp_path), HANDBOOK_PATH,
                                              "2018-01-01", "2018-01-07"))
    assert result.exit_code == 2 and "no transactions" in said(result)


@needs_handbook
def test_evaluate_prints_the_five_metrics(tmp_path: Path) -> None:
    result = runner.invoke(app, evaluate_args(model_folder(tmp_path), HANDBOOK_PATH,
                                              "2018-04-10", "2018-04-10"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"auc_roc", "average_precision", "card_precision_at_100",
                        "n_transactions", "n_frauds"}
    assert 0 <= out["auc_roc"] <= 1 and out["n_frauds"] > 0


# --- the training protocol that the quality figures rest on ----------------------------------

def test_validation_fit_rows_end_a_label_delay_before_validation() -> None:
    from models.train import split_by_time

    ts = pd.Series(pd.date_range("2018-04-01", periods=40 * 24, freq="h", tz="UTC"))
    fit, valid = split_by_time(ts, valid_fraction=0.25, gap_days=7)
    assert ts[valid].min() - ts[fit].max() >= pd.Timedelta(days=7)
    assert not (fit & valid).any() and valid.sum() > 0 and fit.sum() > 0


def test_honest_rows_keep_only_labels_known_at_the_cut() -> None:
    from models.train import honest_rows

    ts = pd.Series(pd.to_datetime(["2018-08-01 23:59", "2018-08-02 00:00"], utc=True))
    assert honest_rows(ts, pd.Timestamp("2018-08-09", tz="UTC"), 7).tolist() == [True, False]


def test_genuine_cap_keeps_frauds_and_shift_restores_the_odds() -> None:
    import lightgbm as lgb

    from models.train import cap_genuine, shift_log_odds

    y = np.array([1] * 10 + [0] * 990)
    keep, rate = cap_genuine(y, 99, seed=0)
    assert keep[:10].all() and keep.sum() == 109 and rate == pytest.approx(0.1)
    assert cap_genuine(y, 5000, seed=0)[1] == 1.0

    rng = np.random.default_rng(0)
    x = rng.random((300, 2))
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1},
                        lgb.Dataset(x, (x[:, 0] > 0.7).astype(int)), 3)
    before = booster.predict(x, raw_score=True)
    shift_log_odds(booster, np.log(0.1))
    assert np.allclose(booster.predict(x, raw_score=True), before + np.log(0.1))
