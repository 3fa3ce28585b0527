"""Every feature, declared once: training, streaming and replay all read this table.

Card windows are exact over event time, current transaction included: a window of 1 day
at time t covers the card's earlier transactions in (t - 1 day, t]. Terminal windows follow
the Fraud Detection Handbook (windows ending ``TERMINAL_DELAY`` before the event, so their
labels are known) on hour buckets: the window of w days at hour H covers hours
[H - 168 - 24·w, H - 168). Offline and online use the same buckets, so they agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Entity = Literal["transaction", "card", "terminal"]

SECOND_US = 1_000_000
MINUTE_US = 60 * SECOND_US
HOUR_US = 60 * MINUTE_US
DAY_US = 24 * HOUR_US

CARD_WINDOWS_DAYS = (1, 7, 30)
HANDBOOK_TERMINAL_WINDOWS_DAYS = (1, 7, 30)
# fraudscore's own: 3 days tells a run of frauds (a compromised terminal) from one card's
# fraud there; 21 days tells a compromise still under way from one that has run its course
OWN_TERMINAL_WINDOWS_DAYS = (3, 21)
TERMINAL_WINDOWS_DAYS = (1, 3, 7, 21, 30)  # every delayed terminal window the store keeps
TERMINAL_DELAY_HOURS = 7 * 24
CARD_LOOKBACK_US = 30 * DAY_US  # the longest card window: older events are never read
BURST_WINDOW_US = 10 * MINUTE_US
RECENT_WINDOW_US = 14 * DAY_US  # a card's recent spending, against its baseline before that
SMALL_AMOUNT = 5.0  # card-testing probes are tiny amounts
SECONDS_SINCE_CAP = 30 * 86_400.0  # "no previous transaction" reads as a month
NIGHT_LAST_HOUR = 6


@dataclass(frozen=True)
class Feature:
    """One model input: name, the entity whose state it reads, its window and default."""

    name: str
    entity: Entity
    window: str | None
    default: float
    description: str
    dtype: str = "float32"


def _card_windows() -> list[Feature]:
    out = []
    for d in CARD_WINDOWS_DAYS:
        out.append(Feature(f"card_count_{d}d", "card", f"{d}d", 1.0,
                           f"card's transactions in the last {d} day(s), current included"))
        out.append(Feature(f"card_mean_amount_{d}d", "card", f"{d}d", 0.0,
                           f"card's mean amount over the last {d} day(s), current included"))
    return out


def _terminal_windows(days: tuple[int, ...]) -> list[Feature]:
    out = []
    for d in days:
        out.append(Feature(f"terminal_count_{d}d", "terminal", f"{d}d-delay7d", 0.0,
                           f"terminal's transactions in the {d}-day window ending 7 days ago"))
        out.append(Feature(f"terminal_risk_{d}d", "terminal", f"{d}d-delay7d", 0.0,
                           "fraud share of those transactions (0 when there are none)"))
    return out


FEATURES: tuple[Feature, ...] = (
    # the Fraud Detection Handbook's 15
    Feature("amount", "transaction", None, 0.0, "transaction amount"),
    Feature("is_weekend", "transaction", None, 0.0, "1 on Saturday or Sunday (UTC)"),
    Feature("is_night", "transaction", None, 0.0, "1 when the UTC hour is 6 or earlier"),
    *_card_windows(),
    *_terminal_windows(HANDBOOK_TERMINAL_WINDOWS_DAYS),
    # fraudscore's own
    Feature("card_secs_since_prev", "card", "30d", SECONDS_SINCE_CAP,
            "seconds since the card's previous transaction, capped at 30 days"),
    Feature("card_amount_ratio_30d", "card", "30d", 1.0, "amount / card's 30-day mean"),
    Feature("card_distinct_terminals_1d", "card", "1d", 1.0,
            "distinct terminals the card used in the last day, current included"),
    Feature("card_small_count_10m", "card", "10m", 0.0,
            f"card's transactions of at most {SMALL_AMOUNT:g} in the last 10 minutes"),
    Feature("card_new_device", "card", "30d", 0.0,
            "1 when the device was not used by the card in the last 30 days"),
    Feature("card_new_country", "card", "30d", 0.0,
            "1 when the country was not used by the card in the last 30 days"),
    Feature("card_amount_ratio_baseline", "card", "14d-30d", 1.0,
            "amount / card's mean amount 14 to 30 days before (1 when it had none)"),
    Feature("card_max_ratio_14d", "card", "30d", 0.0,
            "card's largest amount in the 14 days before this one / that same baseline mean "
            "(0 when either is missing): a compromised card's recent outsized spending"),
    *_terminal_windows(OWN_TERMINAL_WINDOWS_DAYS),
    Feature("card_label_fraud_rate", "card", None, 0.0,
            "fraud share of the card's labels reported so far (0 when none)"),
    Feature("terminal_label_fraud_rate", "terminal", None, 0.0,
            "fraud share of the terminal's labels reported so far (0 when none)"),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
N_FEATURES = len(FEATURES)
INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
DEFAULTS = np.array([f.default for f in FEATURES], dtype=np.float64)
