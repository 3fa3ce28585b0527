"""Train the tree model on offline features with a time-based validation window.

The last ``valid_fraction`` of the training period (by event time) is held out for early
stopping and for choosing the decision thresholds, so nothing is tuned on the test period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from features.definitions import FEATURE_NAMES
from models.metrics import average_precision, roc_auc


@dataclass(frozen=True)
class TrainConfig:
    """LightGBM settings that the skeleton fixes; the models issue makes them searchable."""

    n_estimators: int = 400
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 50
    early_stopping_rounds: int = 40
    valid_fraction: float = 0.25
    seed: int = 7
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainedModel:
    booster: lgb.Booster
    review_threshold: float
    block_threshold: float
    metrics: dict[str, float]
    train_scores: np.ndarray  # validation-window scores, for drift baselines


def split_by_time(ts: pd.Series, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, valid): valid is the latest `valid_fraction` of the time span."""
    lo, hi = ts.min(), ts.max()
    cut = lo + (hi - lo) * (1.0 - valid_fraction)
    valid = (ts >= cut).to_numpy()
    return ~valid, valid


def choose_thresholds(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Review at the F1-optimal score; block where validation precision reaches 90 %."""
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    tp = np.cumsum(ys)
    k = np.arange(1, len(ys) + 1)
    precision = tp / k
    recall = tp / max(int(ys.sum()), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    review = float(ps[int(np.argmax(f1))]) if len(ps) else 0.5
    confident = np.flatnonzero((precision >= 0.9) & (k >= 10))
    block = float(ps[confident[-1]]) if confident.size else max(review, 0.9)
    return review, max(block, review)


def train_lightgbm(
    features: pd.DataFrame, labels: np.ndarray, timestamps: pd.Series, cfg: TrainConfig
) -> TrainedModel:
    """Fit on the early part of the window, early-stop and calibrate on the late part."""
    x = features[list(FEATURE_NAMES)].to_numpy(dtype=np.float32)
    y = labels.astype(np.int32)
    train, valid = split_by_time(timestamps, cfg.valid_fraction)
    if y[train].sum() == 0 or y[valid].sum() == 0:
        raise ValueError("both the training and the validation window need fraud examples")
    params = {
        "objective": "binary",
        "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_child_samples": cfg.min_child_samples,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "seed": cfg.seed,
        "deterministic": True,
        "num_threads": 2,
        "verbose": -1,
        **cfg.extra,
    }
    dtrain = lgb.Dataset(x[train], y[train], feature_name=list(FEATURE_NAMES))
    dvalid = lgb.Dataset(x[valid], y[valid], reference=dtrain)
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=cfg.n_estimators,
        valid_sets=[dvalid],
        callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)],
    )
    p_valid = booster.predict(x[valid], num_iteration=booster.best_iteration)
    review, block = choose_thresholds(y[valid], p_valid)
    metrics = {
        "valid_auc": roc_auc(y[valid], p_valid),
        "valid_average_precision": average_precision(y[valid], p_valid),
        "best_iteration": float(booster.best_iteration),
        "train_rows": float(train.sum()),
        "valid_rows": float(valid.sum()),
    }
    return TrainedModel(booster, review, block, metrics, p_valid.astype(np.float32))
