"""A LightGBM binary classifier as flat arrays, for the exporters that rebuild it exactly.

The ONNX tree ensemble (``models.export``), the GEMM graph (``models.tensorized``) and the
parity samples of the compiled path all need the same facts about each split, LightGBM's
missing-value rule included, so they are read once here from ``Booster.dump_model()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import lightgbm as lgb

MAX_THRESHOLD = 1e300  # LightGBM's stand-in for infinity (Common::AvoidInf)
ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM reads |x| <= kZeroThreshold as 0.0

@dataclass(frozen=True)
class Tree:
    """One tree. Children are node indices when >= 0 and ``~leaf`` when < 0.

    Split ``i`` sends a row left when ``x[feature[i]] <= threshold[i]``; a NaN goes left
    when ``nan_left[i]`` (LightGBM: ``default_left`` for missing type NaN, else NaN is read
    as 0.0, so it goes where 0.0 goes). Thresholds are those of `_effective_threshold`.
    """

    feature: np.ndarray  # int64 [I]
    threshold: np.ndarray  # float64 [I]
    nan_left: np.ndarray  # bool [I]
    left: np.ndarray  # int64 [I]
    right: np.ndarray  # int64 [I]
    leaf_value: np.ndarray  # float64 [L]

    @property
    def n_leaves(self) -> int:
        return len(self.leaf_value)


@dataclass(frozen=True)
class Forest:
    """Probability = 1 / (1 + exp(-sigmoid * sum of one leaf per tree))."""

    trees: list[Tree]
    n_features: int
    sigmoid: float

    @property
    def n_leaves(self) -> int:
        return sum(t.n_leaves for t in self.trees)


def read_forest(booster: lgb.Booster) -> Forest:
    """Flatten the trees LightGBM predicts with by default (its best iteration, if any).

    Raises ValueError for what the exact exporters cannot express: other objectives than
    binary, categorical splits, zero-as-missing splits, linear trees, averaged output.
    """
    dump = booster.dump_model()
    objective = str(dump.get("objective", ""))
    if not objective.startswith("binary") or dump.get("num_tree_per_iteration", 1) != 1:
        raise ValueError(f"only binary LightGBM models are supported, not {objective!r}")
    if dump.get("average_output"):
        raise ValueError("random-forest boosting (average_output) is not supported")
    sigmoid = 1.0
    for part in objective.split():
        if part.startswith("sigmoid:"):
            sigmoid = float(part.split(":", 1)[1])
    trees = [_flatten(info["tree_structure"]) for info in dump["tree_info"]]
    return Forest(trees, int(dump["max_feature_idx"]) + 1, sigmoid)


def _flatten(root: dict[str, Any]) -> Tree:
    feature: list[int] = []
    threshold: list[float] = []
    nan_left: list[bool] = []
    children: list[list[int]] = []
    leaves: list[float] = []

    def visit(node: dict[str, Any]) -> int:
        if "leaf_value" in node:
            if "leaf_coeff" in node:
                raise ValueError("linear trees are not supported")
            leaves.append(float(node["leaf_value"]))
            return ~(len(leaves) - 1)
        if node["decision_type"] != "<=":
            raise ValueError("categorical splits are not supported")
        if node["missing_type"] == "Zero":
            raise ValueError("zero_as_missing splits are not supported")
        t = float(node["threshold"])
        nan_goes_left = bool(node["default_left"]) if node["missing_type"] == "NaN" else t >= 0.0
        t = _effective_threshold(t)
        if t == math.inf and nan_goes_left:  # every row goes left: keep only that side
            return visit(node["left_child"])
        i = len(feature)
        feature.append(int(node["split_feature"]))
        threshold.append(t)
        nan_left.append(nan_goes_left)
        children.append([0, 0])
        children[i][0] = visit(node["left_child"])
        children[i][1] = visit(node["right_child"])
        return i

    visit(root)
    kids = np.asarray(children, dtype=np.int64).reshape(-1, 2)
    return Tree(
        feature=np.asarray(feature, dtype=np.int64),
        threshold=np.asarray(threshold, dtype=np.float64),
        nan_left=np.asarray(nan_left, dtype=bool),
        left=kids[:, 0].copy(),
        right=kids[:, 1].copy(),
        leaf_value=np.asarray(leaves, dtype=np.float64),
    )


def _effective_threshold(t: float) -> float:
    """The threshold that gives LightGBM's decision on the raw input with a plain ``<=``.

    LightGBM reads inputs with |x| <= 1e-35 as 0.0 and compares +inf as 1e300 (its stand-in
    for an unbounded split), so splits near zero and at 1e300 move to where that lands.
    """
    if t >= MAX_THRESHOLD:
        return math.inf
    if -ZERO_THRESHOLD <= t < 0.0:  # the zero band goes right: left is x < -ZERO_THRESHOLD
        return float(np.nextafter(-ZERO_THRESHOLD, -math.inf))
    if 0.0 <= t <= ZERO_THRESHOLD:  # the zero band goes left
        return ZERO_THRESHOLD
    return t


def probe_rows(forest: Forest, n: int, seed: int = 0) -> np.ndarray:
    """float32 rows that land on, just below and just above the split thresholds.

    Parity on such rows checks every comparison where rounding could flip a decision;
    some cells are NaN, ±inf and 0.0 so the missing-value rule is checked too.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, forest.n_features)).astype(np.float32)
    per_feature: list[list[float]] = [[] for _ in range(forest.n_features)]
    for tree in forest.trees:
        for f, t in zip(tree.feature.tolist(), tree.threshold.tolist(), strict=True):
            per_feature[f].append(t)
    for f, values in enumerate(per_feature):
        t = np.asarray(values, dtype=np.float64)
        t = t[np.abs(t) < np.finfo(np.float32).max]
        near = np.concatenate([
            t.astype(np.float32),
            np.nextafter(t.astype(np.float32), np.float32(-math.inf)),
            np.nextafter(t.astype(np.float32), np.float32(math.inf)),
        ])
        if len(near):
            x[:, f] = rng.choice(near, size=n)
    specials = np.asarray([np.nan, np.inf, -np.inf, 0.0, -0.0, ZERO_THRESHOLD, -ZERO_THRESHOLD,
                           1e-38, -1e-38], dtype=np.float32)
    mask = rng.random(x.shape) < 0.05
    x[mask] = rng.choice(specials, size=int(mask.sum()))
    return x


def predict_reference(forest: Forest, x: np.ndarray) -> np.ndarray:
    """A slow numpy walk of the trees (float64), for tests of the flattening itself."""
    xd = np.asarray(x, dtype=np.float64)
    raw = np.zeros(len(xd))
    rows = np.arange(len(xd))
    for tree in forest.trees:
        if len(tree.feature) == 0:
            raw += tree.leaf_value[0]
            continue
        node = np.zeros(len(xd), dtype=np.int64)
        active = np.ones(len(xd), dtype=bool)
        while active.any():
            i = node[active]
            v = xd[rows[active], tree.feature[i]]
            go_left = np.where(np.isnan(v), tree.nan_left[i], v <= tree.threshold[i])
            node[active] = np.where(go_left, tree.left[i], tree.right[i])
            active = node >= 0
        raw += tree.leaf_value[~node]
    return 1.0 / (1.0 + np.exp(-forest.sigmoid * raw))
