"""Every feature, declared once: training, streaming and replay all read this table.

The walking skeleton uses per-card state with exponentially decayed windows: a window of
"1d" is a decay time constant of one day, so each card needs a fixed 12-number state and
one update per event, computed identically offline and online (``features.kernel``).
Exact sliding windows and terminal features come with the feature-store issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Entity = Literal["transaction", "card"]

HOUR = 3600.0
DAY = 86400.0
SECONDS_SINCE_CAP = 30 * DAY  # "no previous transaction" reads as a month


@dataclass(frozen=True)
class Feature:
    """One model input: name, the entity whose state it reads, its window and default."""

    name: str
    entity: Entity
    window: str | None
    default: float
    description: str
    dtype: str = "float32"


FEATURES: tuple[Feature, ...] = (
    Feature("amount", "transaction", None, 0.0, "transaction amount"),
    Feature("is_weekend", "transaction", None, 0.0, "1 on Saturday or Sunday (UTC)"),
    Feature("is_night", "transaction", None, 0.0, "1 when the UTC hour is 6 or earlier"),
    Feature(
        "card_secs_since_prev", "card", None, SECONDS_SINCE_CAP,
        "seconds since the card's previous transaction, capped at 30 days",
    ),
    Feature("card_count_1h", "card", "1h", 1.0, "decayed transaction count, current included"),
    Feature("card_count_1d", "card", "1d", 1.0, "decayed transaction count, current included"),
    Feature("card_mean_amount_1d", "card", "1d", 0.0, "decayed mean amount, current included"),
    Feature("card_count_7d", "card", "7d", 1.0, "decayed transaction count, current included"),
    Feature("card_mean_amount_7d", "card", "7d", 0.0, "decayed mean amount, current included"),
    Feature("card_count_30d", "card", "30d", 1.0, "decayed transaction count, current included"),
    Feature("card_mean_amount_30d", "card", "30d", 0.0, "decayed mean amount, current included"),
    Feature("card_amount_ratio_30d", "card", "30d", 1.0, "amount / card's 30-day mean amount"),
    Feature("card_new_device", "card", None, 0.0, "1 when the device is not among the last two"),
    Feature("card_new_country", "card", None, 0.0, "1 when the country differs from the last"),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
N_FEATURES = len(FEATURES)
DEFAULTS = np.array([f.default for f in FEATURES], dtype=np.float64)

# Card state layout (float64 each). Device/country slots hold opaque equality keys, never
# the raw values: online they are hashes of HMAC tokens, offline factorised codes.
STATE_FIELDS: tuple[str, ...] = (
    "last_t", "n_seen", "c_1h", "c_1d", "s_1d", "c_7d", "s_7d", "c_30d", "s_30d",
    "dev_1", "dev_2", "country",
)
STATE_SIZE = len(STATE_FIELDS)
STATE_DTYPE = np.dtype("<f8")
TAUS = {"1h": HOUR, "1d": DAY, "7d": 7 * DAY, "30d": 30 * DAY}
