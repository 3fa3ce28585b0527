"""How far fraudscore's hour-bucket terminal windows are from the handbook's exact ones,
on the handbook's test week (2018-08-08..14).

    .venv/bin/python scripts/handbook_terminal_buckets.py
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from app.sources import HANDBOOK_PATH, read_transactions
from features.definitions import DAY_US, TERMINAL_WINDOWS_DAYS
from features.offline import compute_features, micros

DELAY_US = 7 * DAY_US


def exact_terminal(tx: pd.DataFrame) -> dict[str, np.ndarray]:
    """The handbook's definition: transactions in (t - 7d - w, t - 7d], continuous time."""
    term, _ = pd.factorize(tx["terminal_id"])
    t = micros(tx["timestamp"])
    fraud = tx["is_fraud"].to_numpy(dtype=np.int64)
    span = int(t.max() - t.min()) + 60 * DAY_US
    key = term.astype(np.int64) * span + (t - t.min() + 40 * DAY_US)
    order = np.argsort(key, kind="stable")
    skey = key[order]
    cf = np.concatenate(([0], np.cumsum(fraud[order])))
    out = {}
    for w in TERMINAL_WINDOWS_DAYS:
        hi = np.searchsorted(skey, key - DELAY_US, side="right")
        lo = np.searchsorted(skey, key - DELAY_US - w * DAY_US, side="right")
        count = hi - lo
        out[f"terminal_count_{w}d"] = count.astype(np.float64)
        out[f"terminal_risk_{w}d"] = np.divide(cf[hi] - cf[lo], count,
                                               out=np.zeros(len(t)), where=count > 0)
    return out


def main() -> None:
    tx, labels = read_transactions(HANDBOOK_PATH, "handbook")
    assert labels is not None
    ours = compute_features(tx, labels)
    exact = exact_terminal(tx.assign(is_fraud=labels["is_fraud"].to_numpy()))
    week = ((tx["timestamp"] >= datetime(2018, 8, 8, tzinfo=UTC))
            & (tx["timestamp"] < datetime(2018, 8, 15, tzinfo=UTC))).to_numpy()
    report = {}
    for name, values in exact.items():
        a, b = ours[name].to_numpy()[week], values[week]
        report[name] = {"mean_exact": round(float(b.mean()), 4),
                        "mean_buckets": round(float(a.mean()), 4),
                        "mean_abs_diff": round(float(np.abs(a - b).mean()), 4),
                        "share_differing": round(float((a != b).mean()), 4)}
    print(json.dumps({"test_week_rows": int(week.sum()), "features": report}, indent=1))


if __name__ == "__main__":
    main()
