"""Train the tree model, choosing its settings on time-based validation only.

Validation follows the Fraud Detection Handbook's delay protocol: a model fitted on data up
to time t is used from t + delay on (its labels arrive that late), so each validation fold
is *fit rows*, then a gap of ``delay_days``, then *validation rows*. :func:`select_params`
tries a small grid (tree size, learning rate, leaf size, L2, class weight) on such folds;
the number of boosting rounds is the one that maximises the folds' mean validation average
precision. Candidates are ranked by validation average precision and, when card ids are
given, Card Precision@100 (:mod:`models.evaluate`). Nothing here ever sees a test period.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from features.definitions import FEATURE_NAMES
from models.evaluate import average_precision, card_precision_at_k, handbook_test_rows, utc_days
from models.metrics import roc_auc

# Fraud often sits just past a sharp amount threshold (in the handbook every amount over 220
# is fraud). Quantile bins are widest in the rare tail where such thresholds sit, so the
# amount gets fine bins: on the handbook's validation folds this lifts AP from 0.68 to 0.71.
AMOUNT_BINS = 65_535

# Candidate settings, each on top of TrainConfig's: the four that did best on the handbook's
# validation folds (15 features, one week) and on a month (23 features). Small on purpose: a
# month of handbook data trains in under two minutes on two cores.
DEFAULT_GRID: tuple[dict[str, Any], ...] = (
    {"num_leaves": 15, "learning_rate": 0.03, "min_child_samples": 300, "feature_fraction": 0.6},
    {"num_leaves": 7, "learning_rate": 0.1, "min_child_samples": 100, "lambda_l2": 10.0},
    {"num_leaves": 31, "learning_rate": 0.03, "min_child_samples": 100, "scale_pos_weight": 4.0},
    {"num_leaves": 15, "learning_rate": 0.05, "min_child_samples": 300, "feature_fraction": 0.6,
     "scale_pos_weight": 4.0},
)


@dataclass(frozen=True)
class TrainConfig:
    """LightGBM settings and the validation protocol that chooses among them."""

    n_estimators: int = 800  # upper bound: early stopping on validation picks the count
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 50
    max_bin: int = 255  # histogram bins per feature (the amount gets AMOUNT_BINS)
    early_stopping_rounds: int = 60
    valid_fraction: float = 0.25  # latest share of the period held out for validation
    delay_days: float = 7.0  # label delay: gap between fit rows and validation rows
    known_days: int = 7  # validation drops cards with a fraud this long before the gap
    search: bool = True  # try `grid`; else the base settings only
    grid: tuple[dict[str, Any], ...] = DEFAULT_GRID
    refit: bool = False  # refit on the whole period with the chosen settings and rounds
    max_genuine: int | None = 200_000  # fit on at most this many genuine rows (all frauds)
    top_k: int = 100  # Card Precision@k used in the ranking when card ids are given
    rank_by: tuple[str, ...] = ("ap", "cp")  # validation scores averaged to rank candidates
    seed: int = 7
    num_threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)
    # the model's input columns, in order: the service's features; other lists are for
    # offline studies (scripts/handbook_quality.py)
    feature_names: tuple[str, ...] = FEATURE_NAMES


@dataclass(frozen=True)
class TrainedModel:
    booster: lgb.Booster
    review_threshold: float
    block_threshold: float
    metrics: dict[str, float]
    train_scores: np.ndarray  # out-of-sample validation scores, for thresholds and drift
    params: dict[str, Any] = field(default_factory=dict)  # the chosen LightGBM settings
    search: tuple[dict[str, Any], ...] = ()  # every candidate's validation scores


@dataclass(frozen=True)
class Fold:
    """One validation split: the fit rows end a label delay before the validation rows."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    day_valid: np.ndarray | None = None  # UTC day index, for Card Precision@k
    card_valid: np.ndarray | None = None


@dataclass(frozen=True)
class Selection:
    """The chosen settings, their round count, and the validation evidence."""

    params: dict[str, Any]
    num_rounds: int
    table: tuple[dict[str, Any], ...]
    valid_y: np.ndarray  # the latest fold's validation labels and scores (chosen settings)
    valid_p: np.ndarray
    booster: lgb.Booster  # the latest fold's model, cut at num_rounds


def base_params(cfg: TrainConfig) -> dict[str, Any]:
    """LightGBM parameters before a candidate's overrides."""
    return {
        "objective": "binary",
        "metric": "average_precision",
        "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.num_leaves,
        "min_child_samples": cfg.min_child_samples,
        "max_bin_by_feature": [AMOUNT_BINS if n == "amount" else cfg.max_bin
                               for n in cfg.feature_names],
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "seed": cfg.seed,
        "deterministic": True,
        "num_threads": cfg.num_threads,
        "verbose": -1,
        **cfg.extra,
    }


def honest_rows(timestamps: pd.Series, as_of: pd.Timestamp, delay_days: float) -> np.ndarray:
    """Rows whose label is known at `as_of`: events at least `delay_days` older.

    A model put in service at `as_of` can only have learnt from those; using later rows
    would read labels that do not exist yet (and genuine-by-default for unreported ones).
    """
    return np.array(timestamps < as_of - timedelta(days=delay_days), dtype=bool)


def split_by_time(ts: pd.Series, valid_fraction: float, gap_days: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit, valid): valid is the latest `valid_fraction` of the time span;
    fit ends `gap_days` (at most another `valid_fraction` of the span) before it."""
    lo, hi = ts.min(), ts.max()
    span = hi - lo
    cut = lo + span * (1.0 - valid_fraction)
    gap = min(timedelta(days=gap_days), span * valid_fraction)
    valid = np.array(ts >= cut, dtype=bool)
    fit = np.array(ts < cut - gap, dtype=bool)
    return fit, valid


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


def cap_genuine(y: np.ndarray, max_genuine: int | None, seed: int) -> tuple[np.ndarray, float]:
    """Rows to fit on: every fraud and at most `max_genuine` genuine rows (a uniform sample),
    and the share of genuine rows kept.

    Months of history hold millions of genuine rows that teach little more than a sample
    does (same validation AP on the handbook at a quarter of them) but cost time.
    """
    genuine = np.flatnonzero(y == 0)
    if max_genuine is None or len(genuine) <= max_genuine:
        return np.ones(len(y), dtype=bool), 1.0
    keep = y != 0
    keep[np.random.default_rng(seed).choice(genuine, max_genuine, replace=False)] = True
    return keep, max_genuine / len(genuine)


def shift_log_odds(booster: lgb.Booster, shift: float) -> None:
    """Add `shift` to every raw score: to the leaves of the first tree. Sampling genuine rows
    at rate r multiplies the odds by 1/r; a shift of log(r) restores calibrated scores."""
    if shift == 0.0:
        return
    first = booster.dump_model(num_iteration=1)["tree_info"][0]
    for leaf in range(int(first["num_leaves"])):
        booster.set_leaf_output(0, leaf, booster.get_leaf_output(0, leaf) + shift)


def _with_shift(p: np.ndarray, shift: float) -> np.ndarray:
    if shift == 0.0:
        return p
    z = np.log(np.clip(p, 1e-15, 1 - 1e-15) / np.clip(1 - p, 1e-15, 1.0)) + shift
    return 1.0 / (1.0 + np.exp(-z))


def fit_booster(x: np.ndarray, y: np.ndarray, params: dict[str, Any], rounds: int,
                names: Sequence[str] = FEATURE_NAMES) -> lgb.Booster:
    """A fixed number of rounds on all given rows (no early stopping: the count is chosen)."""
    data = lgb.Dataset(x, y.astype(np.int32), feature_name=list(names))
    return lgb.train(params, data, num_boost_round=max(int(rounds), 1))


def _fold_scores(fold: Fold, p: np.ndarray, top_k: int) -> dict[str, float]:
    scores = {"auc": roc_auc(fold.y_valid, p), "ap": average_precision(fold.y_valid, p)}
    if fold.day_valid is not None and fold.card_valid is not None:
        scores["cp"], _ = card_precision_at_k(fold.day_valid, fold.card_valid, fold.y_valid, p,
                                              top_k)
    return scores


def _run_candidate(folds: Sequence[Fold], params: dict[str, Any], cfg: TrainConfig
                   ) -> tuple[int, list[lgb.Booster], list[np.ndarray], dict[str, float]]:
    """Fit every fold with early stopping; the round count maximises the mean AP curve."""
    boosters, curves = [], []
    for fold in folds:
        dfit = lgb.Dataset(fold.x_fit, fold.y_fit.astype(np.int32),
                           feature_name=list(cfg.feature_names))
        dvalid = lgb.Dataset(fold.x_valid, fold.y_valid.astype(np.int32), reference=dfit)
        record: dict[str, Any] = {}
        booster = lgb.train(params, dfit, num_boost_round=cfg.n_estimators,
                            valid_sets=[dvalid], valid_names=["valid"],
                            callbacks=[lgb.early_stopping(cfg.early_stopping_rounds,
                                                          verbose=False),
                                       lgb.record_evaluation(record)])
        boosters.append(booster)
        curves.append(np.asarray(record["valid"]["average_precision"]))
    longest = max(len(c) for c in curves)
    padded = np.stack([np.pad(c, (0, longest - len(c)), mode="edge") for c in curves])
    rounds = int(np.argmax(padded.mean(axis=0))) + 1
    preds = [b.predict(f.x_valid, num_iteration=rounds) for b, f in zip(boosters, folds,
                                                                         strict=True)]
    per_fold = [_fold_scores(f, p, cfg.top_k) for f, p in zip(folds, preds, strict=True)]
    scores = {k: float(np.mean([s[k] for s in per_fold])) for k in per_fold[0]}
    scores["rank"] = float(np.mean([v for k, v in scores.items() if k in cfg.rank_by]))
    return rounds, boosters, preds, scores


def select_params(folds: Sequence[Fold], cfg: TrainConfig) -> Selection:
    """Try each candidate of the grid on every fold; keep the best mean validation score.

    The score is the mean of validation AP and (with card ids) Card Precision@k; on equal
    scores the earlier, simpler candidate wins.
    """
    if not folds:
        raise ValueError("no validation folds")
    for fold in folds:
        if fold.y_fit.sum() == 0 or fold.y_valid.sum() == 0:
            raise ValueError("every fit and validation window needs fraud examples")
    candidates = cfg.grid if cfg.search else ({},)
    best: tuple[float, dict[str, Any], int, lgb.Booster, np.ndarray] | None = None
    table = []
    for overrides in candidates:
        params = {**base_params(cfg), **overrides}
        rounds, boosters, preds, scores = _run_candidate(folds, params, cfg)
        table.append({**overrides, "rounds": rounds, **scores})
        if best is None or scores["rank"] > best[0]:
            best = (scores["rank"], params, rounds, boosters[-1], preds[-1])
    assert best is not None  # at least one candidate ran
    _, params, rounds, booster, p_last = best
    cut = lgb.Booster(model_str=booster.model_to_string(num_iteration=rounds))
    return Selection(params, rounds, tuple(table), folds[-1].y_valid, p_last, cut)


def train_lightgbm(
    features: pd.DataFrame, labels: np.ndarray, timestamps: pd.Series, cfg: TrainConfig,
    cards: np.ndarray | None = None, selection: Selection | None = None,
) -> TrainedModel:
    """Choose settings on the latest part of the period, then fit the model.

    Fit rows end ``cfg.delay_days`` before the validation window (the last
    ``cfg.valid_fraction`` of the period), as the handbook's delay protocol has it. The
    returned booster is the fold's model (trained on the fit rows), or with ``cfg.refit``
    a model refitted on every row with the chosen settings. Pass `cards` (card ids per row)
    to rank candidates by Card Precision@k too, or a ready `selection` (e.g. from the
    handbook's prequential folds) to skip the search and fit on every row.
    """
    x = features[list(cfg.feature_names)].to_numpy(dtype=np.float32)
    y = np.asarray(labels).astype(np.int32)
    valid_shift = 0.0
    if selection is None:
        fit, valid = split_by_time(timestamps, cfg.valid_fraction, cfg.delay_days)
        if y[fit].sum() == 0 or y[valid].sum() == 0:
            raise ValueError("both the fit and the validation window need fraud examples")
        kept, rate = cap_genuine(y[fit], cfg.max_genuine, cfg.seed)
        fit[np.flatnonzero(fit)[~kept]] = False
        valid_shift = float(np.log(rate))
        fold = _validation_fold(x, y, timestamps, fit, valid, cards, cfg)
        selection = select_params([fold], cfg)
        booster, shift = selection.booster, valid_shift
        rows = {"train_rows": float(fit.sum()), "valid_rows": float(len(fold.y_valid))}
        if cfg.refit:
            booster, shift = _fit_capped(x, y, selection, cfg)
            rows["train_rows"] = float(len(y))
    else:
        booster, shift = _fit_capped(x, y, selection, cfg)
        rows = {"train_rows": float(len(y)), "valid_rows": float(len(selection.valid_y))}
    shift_log_odds(booster, shift)
    yv, pv = selection.valid_y, _with_shift(selection.valid_p, valid_shift)
    review, block = choose_thresholds(yv, pv)
    best = max(selection.table, key=lambda r: r["rank"])
    metrics = {
        "valid_auc": roc_auc(yv, pv),
        "valid_average_precision": average_precision(yv, pv),
        "best_iteration": float(selection.num_rounds),
        **rows,
    }
    if "cp" in best:
        metrics[f"valid_card_precision_at_{cfg.top_k}"] = best["cp"]
    return TrainedModel(booster, review, block, metrics, pv.astype(np.float32),
                        selection.params, selection.table)


def _fit_capped(x: np.ndarray, y: np.ndarray, selection: Selection, cfg: TrainConfig
                ) -> tuple[lgb.Booster, float]:
    """Fit on every row (genuine ones capped); the log-odds shift that undoes the cap."""
    kept, rate = cap_genuine(y, cfg.max_genuine, cfg.seed)
    booster = fit_booster(x[kept], y[kept], selection.params, selection.num_rounds,
                          cfg.feature_names)
    return booster, np.log(rate)


def _validation_fold(x: np.ndarray, y: np.ndarray, timestamps: pd.Series, fit: np.ndarray,
                     valid: np.ndarray, cards: np.ndarray | None, cfg: TrainConfig) -> Fold:
    """The fold inside one period; with cards, validation leaves out the cards already known
    to be compromised, as the handbook's test sets do (see ``models.evaluate``): a fraud in
    the ``known_days`` before the delay, or in the delay up to its label's arrival."""
    if cards is None:
        return Fold(x[fit], y[fit], x[valid], y[valid])
    day = utc_days(timestamps)
    cards = np.asarray(cards)
    valid_days = np.unique(day[valid])
    delay = round(cfg.delay_days)
    keep = valid & handbook_test_rows(day, cards, y, valid_days,
                                      int(valid_days[0]) - delay - cfg.known_days, delay)
    return Fold(x[fit], y[fit], x[keep], y[keep], day[keep], cards[keep])
