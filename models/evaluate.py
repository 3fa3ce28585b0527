"""Detection quality exactly as the Fraud Detection Handbook measures it.

Le Borgne et al., *Reproducible Machine Learning for Credit Card Fraud Detection*:
``Chapter_References/shared_functions.py`` (functions ``get_train_test_set``,
``card_precision_top_k_day``, ``card_precision_top_k``, ``performance_assessment``), used
from chapter 3 ("Baseline fraud detection system") and chapter 4 ("Precision top-k metrics").

- **Test set** (:func:`handbook_test_rows`): on each test day d, transactions of cards with a
  fraud on a day in [known_from, d − delay − 1] are left out: investigators already know
  those cards (``known_from`` is the first training day in the handbook's baseline).
- **AUC ROC** and **average precision** over the remaining transactions, as scikit-learn's
  ``roc_auc_score`` and ``average_precision_score`` compute them (ties share a threshold).
- **Card Precision@k** (:func:`card_precision_at_k`): per test day, in date order, drop the
  cards detected on earlier test days, take each card's maximum score and label, rank the
  cards by score, and count the share of the top k with a fraud (always divided by k); the
  frauds among those k are "detected". The result is the mean over days.

Days are UTC calendar days (the handbook's ``TX_TIME_DAYS``). Ties in a card's rank are
broken by card id, as the handbook's ``groupby`` orders cards before sorting by score.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from features.definitions import FEATURE_NAMES
from models.metrics import roc_auc

DAY_NS = 86_400 * 1_000_000_000


class EvaluationError(ValueError):
    """The period or the model cannot be evaluated; the message says why."""


def utc_days(timestamps: pd.Series) -> np.ndarray:
    """Day index (days since the epoch, UTC) of UTC-aware timestamps."""
    if timestamps.dt.tz is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    ns = timestamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return ns.astype(np.int64) // DAY_NS


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision Σ (Rₙ − Rₙ₋₁)·Pₙ over distinct score thresholds.

    Equal scores form one threshold, as in scikit-learn, so the value does not depend on
    the order of tied rows (tree models give many ties).
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last_of_tie = np.r_[ps[1:] != ps[:-1], True]
    tp = np.cumsum(ys)[last_of_tie]
    flagged = np.arange(1, len(ys) + 1)[last_of_tie]
    precision = tp / flagged
    recall_step = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(recall_step * precision))


def card_precision_at_k(
    day: np.ndarray, card: np.ndarray, y: np.ndarray, p: np.ndarray, k: int = 100,
    remove_detected: bool = True,
) -> tuple[float, list[float]]:
    """Mean daily Card Precision@k and the per-day values (handbook ``card_precision_top_k``).

    Cards found in an earlier day's top k with a fraud are dropped from later days: their
    fraud is known, so alerting on them again would not help an investigator.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    frame = pd.DataFrame({"day": np.asarray(day), "card": np.asarray(card),
                          "y": np.asarray(y).astype(np.int8), "p": np.asarray(p, np.float64)})
    detected: set = set()
    per_day: list[float] = []
    for _, rows in frame.groupby("day", sort=True):
        if detected:
            rows = rows[~rows["card"].isin(detected)]
        cards = rows.groupby("card", sort=True).agg(p=("p", "max"), y=("y", "max"))
        top = cards.sort_values("p", ascending=False, kind="mergesort").head(k)
        hits = top.index[top["y"].to_numpy() == 1]
        per_day.append(len(hits) / k)
        if remove_detected:
            detected.update(hits)
    mean = float(np.mean(per_day)) if per_day else float("nan")
    return mean, per_day


def handbook_test_rows(
    day: np.ndarray, card: np.ndarray, y: np.ndarray, test_days: Sequence[int] | np.ndarray,
    known_from: int, delay_days: int = 7,
) -> np.ndarray:
    """Mask of the test rows the handbook keeps (``get_train_test_set``).

    A row on test day d is kept unless its card has a fraud on a day in
    [known_from, d − delay_days − 1]: that fraud's label has arrived before d, so the card
    is already blocked. `day`, `card`, `y` must cover the days from `known_from` on.
    """
    day = np.asarray(day, dtype=np.int64)
    y = np.asarray(y).astype(bool)
    codes, _ = pd.factorize(np.asarray(card))
    in_test = np.isin(day, np.asarray(test_days, dtype=np.int64))
    counted = y & (day >= known_from)
    first_fraud = np.full(int(codes.max(initial=-1)) + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_fraud, codes[counted], day[counted])
    known = first_fraud[codes] <= day - delay_days - 1
    return in_test & ~known


def detection_metrics(
    day: np.ndarray, card: np.ndarray, y: np.ndarray, p: np.ndarray, k: int = 100
) -> dict[str, float | int]:
    """The handbook's three metrics on an already filtered test set, plus its size."""
    y = np.asarray(y).astype(bool)
    if len(y) == 0:
        raise ValueError("no test transactions")
    cp, _ = card_precision_at_k(day, card, y, p, k)
    return {
        "auc_roc": roc_auc(y, p),
        "average_precision": average_precision(y, p),
        f"card_precision_at_{k}": cp,
        "n_transactions": len(y),
        "n_frauds": int(y.sum()),
    }


def score_with_booster(booster_file: Path, features: pd.DataFrame) -> np.ndarray:
    """Scores of a LightGBM text model on features in FEATURE_NAMES order."""
    import lightgbm as lgb

    try:
        booster = lgb.Booster(model_file=str(booster_file))
    except lgb.basic.LightGBMError as exc:
        raise EvaluationError(f"{booster_file}: not a LightGBM model ({exc})") from None
    if booster.num_feature() != len(FEATURE_NAMES):
        raise EvaluationError(f"{booster_file}: the model takes {booster.num_feature()} "
                              f"features, this build computes {len(FEATURE_NAMES)}")
    return booster.predict(features[list(FEATURE_NAMES)].to_numpy(np.float64))


def evaluate_period(
    booster_file: Path, tx: pd.DataFrame, labels: pd.DataFrame, test_start: datetime,
    test_end: datetime, delay_days: int = 7, known_days: int = 7, k: int = 100,
) -> dict[str, float | int]:
    """Score the days [test_start, test_end) of `tx` and measure them as the handbook does.

    Features are computed point in time over the whole history given (the label-rate
    features read every earlier label); cards with a fraud in the `known_days` before the
    delay period are left out as in the handbook's baseline (its training week).
    """
    from features.offline import compute_features

    start_day, end_day = (int(pd.Timestamp(t).value // DAY_NS) for t in (test_start, test_end))
    if end_day <= start_day:
        raise EvaluationError("the test period is empty: its end is not after its start")
    history = (tx["timestamp"] < test_end).to_numpy()
    day = utc_days(tx["timestamp"])[history]
    card = tx["customer_id"].to_numpy()[history]
    is_fraud = labels.drop_duplicates("transaction_id").set_index("transaction_id")["is_fraud"]
    y = is_fraud.reindex(tx["transaction_id"][history]).fillna(False).to_numpy(dtype=bool)
    test = handbook_test_rows(day, card, y, range(start_day, end_day),
                              start_day - delay_days - known_days, delay_days)
    if not test.any():
        raise EvaluationError("no transactions to evaluate in the test period")
    if not y[test].any():
        raise EvaluationError("no frauds in the test period: AUC and AP are undefined")
    features = compute_features(tx[history], labels)
    p = score_with_booster(booster_file, features[test])
    return detection_metrics(day[test], card[test], y[test], p, k)
