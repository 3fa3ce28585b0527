"""Detection quality on the handbook's baseline protocol: train 2018-07-25..31, 7-day
delay, test 2018-08-08..14; LightGBM on the handbook's 15 features and on all 23.

    .venv/bin/python scripts/handbook_benchmark.py
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from app.sources import HANDBOOK_PATH, read_transactions
from features.definitions import FEATURE_NAMES
from features.offline import compute_features
from models.metrics import average_precision, roc_auc
from models.train import TrainConfig, train_lightgbm

HANDBOOK_15 = [n for n in FEATURE_NAMES if n in {
    "amount", "is_weekend", "is_night"} or n.startswith(("card_count_", "card_mean_amount_",
                                                          "terminal_count_", "terminal_risk_"))]


def card_precision_at_k(day: np.ndarray, card: np.ndarray, y: np.ndarray, p: np.ndarray,
                        k: int = 100) -> float:
    """Per day: the k cards with the highest score; share of them with a fraud that day."""
    frame = pd.DataFrame({"day": day, "card": card, "y": y, "p": p})
    per_card = frame.groupby(["day", "card"]).agg(p=("p", "max"), y=("y", "max")).reset_index()
    top = per_card.sort_values(["day", "p"], ascending=[True, False]).groupby("day").head(k)
    return float(top.groupby("day")["y"].mean().mean())


def main() -> None:
    tx, labels = read_transactions(HANDBOOK_PATH, "handbook")
    assert labels is not None
    feats = compute_features(tx, labels)
    y = labels["is_fraud"].to_numpy()
    ts = tx["timestamp"]
    train = ((ts >= datetime(2018, 7, 25, tzinfo=UTC)) & (ts < datetime(2018, 8, 1, tzinfo=UTC)))
    test = ((ts >= datetime(2018, 8, 8, tzinfo=UTC)) & (ts < datetime(2018, 8, 15, tzinfo=UTC)))
    train, test = train.to_numpy(), test.to_numpy()
    out = {}
    for name, columns in (("handbook_15", HANDBOOK_15), ("fraudscore_23", list(FEATURE_NAMES))):
        x = feats.copy()
        for c in FEATURE_NAMES:
            if c not in columns:
                x[c] = 0.0  # same model shape, feature switched off
        model = train_lightgbm(x[train], y[train], ts[train], TrainConfig())
        p = model.booster.predict(x[test].to_numpy(np.float32),
                                  num_iteration=model.booster.best_iteration)
        out[name] = {
            "auc": round(roc_auc(y[test], p), 4),
            "average_precision": round(average_precision(y[test], p), 4),
            "card_precision_at_100": round(card_precision_at_k(
                ts[test].dt.floor("D").to_numpy(), tx["customer_id"].to_numpy()[test],
                y[test], p), 4),
        }
    print(json.dumps({"train": "2018-07-25..31", "test": "2018-08-08..14",
                      "test_rows": int(test.sum()), "results": out}))


if __name__ == "__main__":
    main()
