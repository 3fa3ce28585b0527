"""Drive a history through the online store as a live worker would see it.

Transactions and fraud labels are merged in time order (a label first on ties) and cut into
micro-batches; inside a batch the labels are applied first, as an engine polling both topics
does. The returned clocks (batch number per transaction and per label) let the offline
computation reproduce exactly which labels each transaction had seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.definitions import N_FEATURES
from features.offline import events_from_frame, labels_from_frame
from features.online import EventBatch, LabelBatch, RedisFeatureStore


@dataclass(frozen=True)
class Replayed:
    features: np.ndarray  # one row per transaction, input order
    tx_clock: np.ndarray  # batch number of each transaction
    label_clock: np.ndarray  # batch number of each label (beyond the last: never applied)


def take_events(ev: EventBatch, idx: np.ndarray) -> EventBatch:
    return EventBatch([ev.transaction_ids[i] for i in idx], [ev.cards[i] for i in idx],
                      ev.terminals[idx], ev.terminal_keys[idx], ev.t_us[idx], ev.amount[idx],
                      ev.device[idx], ev.country[idx])


def take_labels(lb: LabelBatch, idx: np.ndarray) -> LabelBatch:
    return LabelBatch([lb.transaction_ids[i] for i in idx], [lb.cards[i] for i in idx],
                      [lb.terminals[i] for i in idx], lb.t_us[idx], lb.reported_us[idx],
                      lb.is_fraud[idx])


def replay(store: RedisFeatureStore, tx: pd.DataFrame, labels: pd.DataFrame,
           batch_size: int = 500) -> Replayed:
    """Stream `tx` and the labels reported up to its last event through `store`."""
    ev = events_from_frame(tx)
    lb = labels_from_frame(labels)
    n_tx, n_lab = len(ev), len(lb.t_us)
    last = int(ev.t_us.max()) if n_tx else 0
    usable = np.flatnonzero(lb.reported_us <= last)
    when = np.concatenate([lb.reported_us[usable], ev.t_us])
    kind = np.r_[np.zeros(len(usable), dtype=np.int8), np.ones(n_tx, dtype=np.int8)]
    order = np.lexsort((np.arange(len(when)), kind, when))
    batch_of = np.empty(len(when), dtype=np.int64)
    batch_of[order] = np.arange(len(when)) // batch_size
    tx_clock = batch_of[len(usable):]
    label_clock = np.full(n_lab, (len(when) // batch_size) + 1, dtype=np.int64)
    label_clock[usable] = batch_of[: len(usable)]

    features = np.zeros((n_tx, N_FEATURES), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        labels_part = part[part < len(usable)]
        tx_part = part[part >= len(usable)] - len(usable)
        if labels_part.size:
            store.apply_labels(take_labels(lb, usable[labels_part]))
        if tx_part.size:
            features[tx_part] = store.update_many(take_events(ev, tx_part))
    return Replayed(features, tx_clock, label_clock)
