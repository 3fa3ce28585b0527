"""A small LightGBM model shared by the tree-model tests."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np

N_FEATURES = 6


def small_booster() -> lgb.Booster:
    """20 small trees with every kind of split LightGBM makes on numeric data.

    Feature 0 is never missing in training (a NaN there reads as 0.0); the others are,
    feature 3's NaN is predictive (splits at +inf) and feature 4 is often exactly 0.0
    (splits at ±1e-35, LightGBM's zero band).
    """
    rng = np.random.default_rng(3)
    n = 4000
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    x[:, 1:][rng.random((n, N_FEATURES - 1)) < 0.05] = np.nan
    x[rng.random(n) < 0.4, 4] = 0.0
    z = np.nan_to_num(x)
    y = (z[:, 0] + z[:, 1] * z[:, 2] + 1.5 * np.isnan(x[:, 3]) + (x[:, 4] == 0)
         + rng.normal(size=n) > 1).astype(int)
    params = {"objective": "binary", "num_leaves": 15, "min_child_samples": 5,
              "num_threads": 1, "verbose": -1, "seed": 1}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=20)
