"""Decision policy: model scores and hard rules → allow / review / block, with rule reasons.

Thresholds are chosen on the validation window at training time (:func:`budget_threshold`,
:func:`precision_threshold`) and stored in the model's manifest; the operator can override
them and add hard rules in configuration. A rule that fires is named in the alert's
reasons, so an analyst sees *why* a low-scoring transaction was stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ALLOW, REVIEW, BLOCK = "allow", "review", "block"
RULE_AMOUNT = "rule:amount_limit"
RULE_TERMINAL = "rule:blocked_terminal"
RULE_ANOMALY = "rule:anomaly"


@dataclass(frozen=True)
class Policy:
    """Thresholds on the fraud score (and optionally the anomaly score) plus hard rules."""

    review_threshold: float
    block_threshold: float
    anomaly_review_threshold: float | None = None
    amount_limit: float | None = None  # block any single amount above this
    blocked_terminals: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], **overrides: Any) -> Policy:
        """The model's own thresholds, with any operator override that is not None."""
        th = manifest.get("thresholds") or {
            "review": manifest["review_threshold"], "block": manifest["block_threshold"]}
        values: dict[str, Any] = {
            "review_threshold": float(th["review"]),
            "block_threshold": float(th["block"]),
            "anomaly_review_threshold": th.get("anomaly_review"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["block_threshold"] < values["review_threshold"]:
            raise ValueError(f"block threshold {values['block_threshold']} is below the "
                             f"review threshold {values['review_threshold']}")
        return cls(**values)

    def decide(
        self,
        fraud: np.ndarray,
        anomaly: np.ndarray | None = None,
        amounts: np.ndarray | None = None,
        terminals: list[str] | None = None,
    ) -> tuple[np.ndarray, list[str | None]]:
        """Decision per row and the rule id that forced it (None when the scores decided)."""
        decisions = np.where(fraud >= self.block_threshold, BLOCK,
                             np.where(fraud >= self.review_threshold, REVIEW, ALLOW))
        rules: list[str | None] = [None] * len(fraud)
        if self.anomaly_review_threshold is not None and anomaly is not None:
            hit = (anomaly >= self.anomaly_review_threshold) & (decisions == ALLOW)
            decisions[hit] = REVIEW
            for i in np.flatnonzero(hit):
                rules[i] = RULE_ANOMALY
        if self.amount_limit is not None and amounts is not None:
            hit = (amounts > self.amount_limit) & (decisions != BLOCK)
            decisions[hit] = BLOCK
            for i in np.flatnonzero(hit):
                rules[i] = RULE_AMOUNT
        if self.blocked_terminals and terminals is not None:
            for i, t in enumerate(terminals):
                if t in self.blocked_terminals and decisions[i] != BLOCK:
                    decisions[i] = BLOCK
                    rules[i] = RULE_TERMINAL
        return decisions, rules


def budget_threshold(day: np.ndarray, card: np.ndarray, score: np.ndarray,
                     cards_per_day: float) -> float:
    """Lowest score threshold whose alerts touch at most `cards_per_day` cards a day on
    average (each card counts once a day, at its highest score)."""
    if len(score) == 0:
        return 1.0
    import pandas as pd

    per_card = (pd.DataFrame({"day": day, "card": card, "p": score})
                .groupby(["day", "card"], sort=False)["p"].max())
    n_days = per_card.index.get_level_values(0).nunique()
    top = np.sort(per_card.to_numpy())[::-1]
    k = int(cards_per_day * n_days)
    if k >= len(top):
        return float(top[-1])
    # strictly above the (k+1)-th card's score so at most k cards are flagged
    return float(np.nextafter(top[k], np.inf))


def precision_threshold(y: np.ndarray, score: np.ndarray, target: float,
                        min_alerts: int = 10) -> float | None:
    """Lowest threshold at which validation precision stays at or above `target`."""
    order = np.argsort(-score, kind="stable")
    ys, ps = y[order].astype(bool), score[order]
    precision = np.cumsum(ys) / np.arange(1, len(ys) + 1)
    ok = np.flatnonzero((precision >= target) & (np.arange(1, len(ys) + 1) >= min_alerts))
    return float(ps[ok[-1]]) if ok.size else None
