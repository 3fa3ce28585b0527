"""One model version: the tree model, the neural models, their blend and the thresholds.

Everything is chosen on the validation window (the latest part of the training period):
LightGBM's early stopping, whether the MLP's log-odds join the tree's (and with which
weight), the review/block thresholds and the anomaly threshold. The test period is never
seen here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from features.definitions import FEATURE_NAMES
from models.blend import blend
from models.metrics import average_precision, roc_auc
from models.neural import NeuralModel, NeuralSession, fit_neural
from models.policy import budget_threshold, precision_threshold
from models.train import TrainConfig, TrainedModel, choose_thresholds, split_by_time, train_lightgbm

BLEND_WEIGHTS = (0.0, 0.15, 0.3, 0.5)
ANOMALY_LEVELS = (0.999, 0.9995, 0.9999)


@dataclass(frozen=True)
class Ensemble:
    tree: TrainedModel
    neural: NeuralModel
    blend_weight: float  # weight of the MLP's log-odds in the fraud score (0 = tree only)
    thresholds: dict[str, float | None]
    metrics: dict[str, float]
    valid_scores: np.ndarray  # final fraud scores on the validation window (drift baseline)


def train_ensemble(
    features: pd.DataFrame,
    labels: np.ndarray,
    timestamps: pd.Series,
    cards: np.ndarray,
    cfg: TrainConfig | None = None,
    alert_budget: float | None = None,
    block_precision: float = 0.9,
    with_neural: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> Ensemble:
    cfg = cfg or TrainConfig()
    progress("tree model")
    tree = train_lightgbm(features, labels, timestamps, cfg)
    x = features[list(FEATURE_NAMES)].to_numpy(np.float64)
    y = labels.astype(bool)
    train, valid = split_by_time(timestamps, cfg.valid_fraction)
    p_tree = tree.booster.predict(x[valid])
    progress("neural models")
    neural = fit_neural(x[train], y[train], x[valid], y[valid], seed=cfg.seed,
                        with_classifier=with_neural)
    session = NeuralSession(neural.onnx_bytes, neural.error_quantiles)
    errors, mlp_logit = session.run(x[valid])
    anomaly = session.anomaly_score(errors)

    progress("blend and thresholds")
    yv = y[valid]
    ap = {w: average_precision(yv, blend(p_tree, mlp_logit, w)) for w in BLEND_WEIGHTS
          if w == 0.0 or mlp_logit is not None}
    best = max(ap, key=lambda w: (ap[w], -w))  # ties: the simpler model
    weight = best if ap[best] > ap[0.0] + 1e-3 else 0.0
    p = blend(p_tree, mlp_logit, weight)

    review, block = choose_thresholds(yv.astype(np.int32), p)
    if alert_budget is not None:
        day = timestamps[valid].dt.floor("D").to_numpy()
        review = budget_threshold(day, cards[valid], p, alert_budget)
    precise = precision_threshold(yv, p, block_precision)
    block = max(review, precise if precise is not None else max(review, 0.99))
    anomaly_review = _anomaly_threshold(yv, p, anomaly, review)

    flagged = p >= review
    metrics = {
        **tree.metrics,
        "valid_auc": roc_auc(yv, p),
        "valid_average_precision": average_precision(yv, p),
        "valid_tree_average_precision": ap[0.0],
        "valid_anomaly_auc": roc_auc(yv, anomaly),
        "valid_review_precision": float(yv[flagged].mean()) if flagged.any() else float("nan"),
        "valid_review_recall": float(flagged[yv].mean()) if yv.any() else float("nan"),
    }
    thresholds: dict[str, float | None] = {"review": review, "block": block,
                                           "anomaly_review": anomaly_review}
    return Ensemble(tree, neural, weight, thresholds, metrics, p.astype(np.float32))


def _anomaly_threshold(y: np.ndarray, p: np.ndarray, anomaly: np.ndarray,
                       review: float) -> float | None:
    """The lowest anomaly level whose extra alerts (missed by the fraud score) are at least
    half as precise as the fraud score's own alerts on validation; None when none is."""
    flagged = p >= review
    base = float(y[flagged].mean()) if flagged.any() else 0.0
    for level in sorted(ANOMALY_LEVELS):
        extra = (anomaly >= level) & ~flagged
        if extra.sum() >= 5 and float(y[extra].mean()) >= 0.5 * base > 0:
            return level
    return None


def manifest_entries(ens: Ensemble) -> dict[str, Any]:
    return {
        "blend_weight": ens.blend_weight,
        "thresholds": ens.thresholds,
        "review_threshold": ens.thresholds["review"],
        "block_threshold": ens.thresholds["block"],
        "metrics": ens.metrics,
        "anomaly_calibration": ens.neural.error_quantiles.tolist(),
        "score_quantiles": np.quantile(ens.valid_scores, np.linspace(0, 1, 11)).tolist()
        if len(ens.valid_scores) else [],
    }
