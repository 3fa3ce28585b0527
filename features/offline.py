"""Point-in-time features over a whole history (training, replay, parity checks).

Vectorised end to end: the card windows come from :func:`features.windows.card_features`
(the same code the online store runs), the terminal windows and label rates from binary
searches over sorted keys. A label counts from its ``reported_at`` on, as online.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.definitions import (
    FEATURE_NAMES,
    HOUR_US,
    INDEX,
    N_FEATURES,
    TERMINAL_DELAY_HOURS,
)
from features.online import EventBatch, LabelBatch
from features.windows import (
    CardEvents,
    card_features,
    country_keys,
    hours_of,
    label_rate,
    terminal_columns,
    terminal_hash,
    terminal_window_bounds,
    transaction_features,
)


def micros(ts: pd.Series) -> np.ndarray:
    """UTC-aware timestamps as int64 microseconds since the epoch."""
    if ts.dt.tz is None:
        raise ValueError("timestamps must be timezone-aware (UTC)")
    ns = ts.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return ns.astype(np.int64) // 1000


def device_codes(device_ids: pd.Series) -> np.ndarray:
    """Stable equality keys for raw device ids (0 = unknown); online uses token hashes."""
    known = device_ids.notna().to_numpy()
    keys = np.zeros(len(device_ids), dtype=np.uint32)
    if known.any():
        keys[known] = np.maximum(terminal_hash(device_ids[known].to_numpy(dtype=object)), 1)
    return keys


def first_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """One label per transaction: the first reported wins, later repeats are ignored."""
    ordered = labels.sort_values(["reported_at", "transaction_id"], kind="stable")
    return ordered.drop_duplicates("transaction_id", keep="first")


def compute_features(
    tx: pd.DataFrame,
    labels: pd.DataFrame | None = None,
    card_ids: pd.Series | None = None,
    device_keys: np.ndarray | None = None,
    label_clock: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Features for every row of `tx` (in a time-ordered stream's arrival order).

    ``labels`` (transaction_id, customer_id, terminal_id, timestamp, is_fraud, reported_at)
    feed the terminal risk windows and the label rates; without them those are 0.
    ``card_ids``/``device_keys`` default to customer_id / factorised device ids; pass the
    online tokens to reproduce a token-keyed store exactly. ``label_clock`` (a clock value
    per transaction and per label row) replaces event time / reported_at when deciding which
    labels a transaction has seen: replay uses it to mirror the order labels were applied.
    """
    n = len(tx)
    out = np.zeros((n, N_FEATURES), dtype=np.float64)
    t_us = micros(tx["timestamp"])
    amount = tx["amount"].to_numpy(dtype=np.float64)
    transaction_features(t_us, amount, out)
    ids = tx["customer_id"] if card_ids is None else card_ids
    card, _ = pd.factorize(ids)
    events = CardEvents(
        card=card.astype(np.int64), t_us=t_us, amount=amount,
        terminal=terminal_hash(tx["terminal_id"].to_numpy(dtype=object)),
        device=device_codes(tx["device_id"]) if device_keys is None else device_keys,
        country=country_keys(tx["country"].to_numpy(dtype=object)),
    )
    card_features(events, out)

    if labels is not None and label_clock is not None:
        labels = labels.assign(_clock=label_clock[1])
    first = first_labels(labels) if labels is not None else _no_labels()
    _terminal_windows(tx, t_us, first, out)
    if label_clock is not None and len(first):
        _label_rates(tx, label_clock[0], first, out, card_ids,
                     first["_clock"].to_numpy(dtype=np.int64))
    else:
        _label_rates(tx, t_us, first, out, card_ids)
    return pd.DataFrame(out, columns=list(FEATURE_NAMES), index=tx.index)


def _no_labels() -> pd.DataFrame:
    empty = pd.Series([], dtype="datetime64[ns, UTC]")
    return pd.DataFrame({"transaction_id": pd.Series([], dtype=object),
                         "customer_id": pd.Series([], dtype=object),
                         "terminal_id": pd.Series([], dtype=object),
                         "timestamp": empty, "is_fraud": pd.Series([], dtype=bool),
                         "reported_at": empty})


def on_time_fraud(t_us: np.ndarray, reported_us: np.ndarray, is_fraud: np.ndarray) -> np.ndarray:
    """Frauds whose label arrived within the terminal delay: the ones the delayed terminal
    windows count (a later report cannot have been known when the window closed)."""
    return is_fraud & (reported_us <= t_us + TERMINAL_DELAY_HOURS * HOUR_US)


def _terminal_windows(tx: pd.DataFrame, t_us: np.ndarray, labels: pd.DataFrame,
                      out: np.ndarray) -> None:
    term, _ = pd.factorize(tx["terminal_id"])
    term = term.astype(np.int64)
    hour = hours_of(t_us)
    lab = labels.set_index("transaction_id")
    joined = lab.reindex(tx["transaction_id"])
    reported = joined["reported_at"]
    known = reported.notna().to_numpy()
    rep_us = np.where(known, micros(reported.fillna(pd.Timestamp(0, tz="UTC"))), 0)
    fraud = known & joined["is_fraud"].fillna(False).to_numpy(dtype=bool)
    fraud = on_time_fraud(t_us, rep_us, fraud)

    base = int(hour.min()) - TERMINAL_DELAY_HOURS - 24 * 31
    span = int(hour.max()) - base + 2
    key = term * span + (hour - base)
    order = np.argsort(key, kind="stable")
    skey = key[order]
    cfraud = np.concatenate(([0], np.cumsum(fraud[order])))
    counts, frauds = {}, {}
    for d, (first_h, end_h) in terminal_window_bounds(hour).items():
        lo = np.searchsorted(skey, term * span + (first_h - base), side="left")
        hi = np.searchsorted(skey, term * span + (end_h - base), side="left")
        counts[d] = hi - lo
        frauds[d] = cfraud[hi] - cfraud[lo]
    terminal_columns(counts, frauds, out)


def _entity_label_counts(entity_tx: pd.Series, t_us: np.ndarray, entity_lab: pd.Series,
                         rep_us: np.ndarray, fraud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (and frauds) of each transaction's entity reported at or before its time."""
    codes, _ = pd.factorize(pd.concat([entity_tx, entity_lab], ignore_index=True))
    ent_tx, ent_lab = codes[: len(entity_tx)].astype(np.int64), codes[len(entity_tx):]
    base = int(min(t_us.min(initial=0), rep_us.min(initial=0))) - 1
    span = int(max(t_us.max(initial=0), rep_us.max(initial=0))) - base + 1
    lkey = ent_lab.astype(np.int64) * span + (rep_us - base)
    order = np.argsort(lkey, kind="stable")
    skey = lkey[order]
    cfraud = np.concatenate(([0], np.cumsum(fraud[order])))
    hi = np.searchsorted(skey, ent_tx * span + (t_us - base), side="right")
    lo = np.searchsorted(skey, ent_tx * span, side="left")
    return hi - lo, cfraud[hi] - cfraud[lo]


def _label_rates(tx: pd.DataFrame, t_us: np.ndarray, labels: pd.DataFrame, out: np.ndarray,
                 card_ids: pd.Series | None, rep_us: np.ndarray | None = None) -> None:
    if rep_us is None:
        rep_us = micros(labels["reported_at"]) if len(labels) else np.zeros(0, dtype=np.int64)
    fraud = labels["is_fraud"].to_numpy(dtype=bool)
    card_tx = tx["customer_id"] if card_ids is None else card_ids
    card_lab = labels["customer_id"]
    if card_ids is not None:  # labels carry customer ids: map them to the same tokens
        mapping = pd.Series(card_ids.to_numpy(), index=tx["customer_id"].to_numpy())
        mapping = mapping[~mapping.index.duplicated()]
        card_lab = card_lab.map(mapping)
    n, f = _entity_label_counts(card_tx.reset_index(drop=True), t_us,
                                card_lab.reset_index(drop=True), rep_us, fraud)
    out[:, INDEX["card_label_fraud_rate"]] = label_rate(n, f)
    n, f = _entity_label_counts(tx["terminal_id"].reset_index(drop=True), t_us,
                                labels["terminal_id"].reset_index(drop=True), rep_us, fraud)
    out[:, INDEX["terminal_label_fraud_rate"]] = label_rate(n, f)


def events_from_frame(tx: pd.DataFrame, card_ids: pd.Series | None = None,
                      device_keys: np.ndarray | None = None) -> EventBatch:
    """A transactions frame as the online store's batch (for bootstrapping and tests)."""
    terminals = tx["terminal_id"].to_numpy(dtype=object)
    cards = tx["customer_id"] if card_ids is None else card_ids
    return EventBatch(
        transaction_ids=tx["transaction_id"].astype(str).tolist(),
        cards=cards.astype(str).tolist(),
        terminals=terminals,
        terminal_keys=terminal_hash(terminals),
        t_us=micros(tx["timestamp"]),
        amount=tx["amount"].to_numpy(dtype=np.float64),
        device=device_codes(tx["device_id"]) if device_keys is None else device_keys,
        country=country_keys(tx["country"].to_numpy(dtype=object)),
    )


def labels_from_frame(labels: pd.DataFrame, card_of: dict[str, str] | None = None
                      ) -> LabelBatch:
    """A labels frame as the online store's batch; `card_of` maps customer id → token."""
    customers = labels["customer_id"].astype(str)
    cards = customers.map(card_of).fillna("").tolist() if card_of is not None \
        else customers.tolist()
    return LabelBatch(
        transaction_ids=labels["transaction_id"].astype(str).tolist(),
        cards=cards,
        terminals=labels["terminal_id"].astype(str).tolist(),
        t_us=micros(labels["timestamp"]),
        reported_us=micros(labels["reported_at"]),
        is_fraud=labels["is_fraud"].to_numpy(dtype=bool),
    )
