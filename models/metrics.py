"""Detection metrics in numpy (no scikit-learn needed at serving time)."""

from __future__ import annotations

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve via the rank statistic (ties get average ranks)."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = np.asarray(p)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (area under the step precision-recall curve)."""
    y = np.asarray(y).astype(bool)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(p), kind="mergesort")
    ys = y[order]
    tp = np.cumsum(ys)
    precision = tp / np.arange(1, len(ys) + 1)
    return float(precision[ys].sum() / ys.sum())


def precision_recall_at(y: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    """Precision and recall of a set of flagged events."""
    y = np.asarray(y).astype(bool)
    flagged = np.asarray(flagged).astype(bool)
    tp = int((y & flagged).sum())
    precision = tp / int(flagged.sum()) if flagged.any() else float("nan")
    recall = tp / int(y.sum()) if y.any() else float("nan")
    return precision, recall
