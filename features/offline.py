"""Point-in-time features over a whole history (training, replay, bootstrapping Redis).

Runs the same kernel as the online store over a transactions frame in its row order, so a
model trained here sees exactly the features the streaming scorer will compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.definitions import FEATURE_NAMES
from features.kernel import Events, apply_events, country_keys, empty_states, epoch_seconds

KeyFn = Callable[[pd.Series], np.ndarray]


def _factorised(values: pd.Series) -> np.ndarray:
    codes, _ = pd.factorize(values, use_na_sentinel=True)
    return (codes + 1).astype(np.float64)  # NaN → 0 = unknown


@dataclass(frozen=True)
class OfflineResult:
    features: pd.DataFrame  # one row per input row, columns FEATURE_NAMES
    card_ids: np.ndarray  # distinct card entity ids, row-aligned with `states`
    states: np.ndarray  # final state per card, for bootstrapping an online store


def compute_features(
    frame: pd.DataFrame,
    card_ids: pd.Series | None = None,
    device_keys: np.ndarray | None = None,
) -> OfflineResult:
    """Features for every row of `frame`, in row order.

    ``card_ids`` defaults to ``customer_id``; pass tokens (and token-derived device keys) to
    produce state that an online store keyed by tokens can load as-is.
    """
    ids = frame["customer_id"] if card_ids is None else card_ids
    card, uniques = pd.factorize(ids)
    events = Events(
        t=epoch_seconds(frame["timestamp"]),
        amount=frame["amount"].to_numpy(dtype=np.float64),
        device_key=_factorised(frame["device_id"]) if device_keys is None else device_keys,
        country_key=country_keys(frame["country"].to_numpy(dtype=object)),
    )
    states = empty_states(len(uniques))
    feats = apply_events(states, card.astype(np.int64), events)
    return OfflineResult(
        features=pd.DataFrame(feats, columns=list(FEATURE_NAMES), index=frame.index),
        card_ids=np.asarray(uniques),
        states=states,
    )
