"""Exact ONNX export (float64 thresholds) and the GEMM graph for GPUs, against LightGBM."""

from __future__ import annotations

import logging

import lightgbm as lgb
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from models.export import (
    INPUT_DTYPE,
    INPUT_NAME,
    OUTPUT_NAMES,
    forest_to_onnx,
    lightgbm_to_onnx,
    parity,
)
from models.forest import Forest, Tree, predict_reference, probe_rows, read_forest
from models.tensorized import booster_to_gemm_onnx, forest_to_gemm_onnx, gemm_parity
from tests.unit.tree_models import N_FEATURES, small_booster

EXACT = 1e-12
GEMM_LIMIT = 1e-5  # float32 leaf values and sums


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    return small_booster()


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def test_flattened_forest_is_lightgbm(booster: lgb.Booster) -> None:
    forest = read_forest(booster)
    assert any(np.isinf(t.threshold).any() for t in forest.trees)  # the cases worth testing
    assert any((np.abs(t.threshold) < 1e-30).any() for t in forest.trees)
    x = probe_rows(forest, 3000)
    np.testing.assert_allclose(predict_reference(forest, x), booster.predict(x), atol=EXACT)


def test_onnx_export_is_exact(booster: lgb.Booster) -> None:
    model = lightgbm_to_onnx(booster)
    ensemble = next(n for n in model.graph.node if n.op_type == "TreeEnsemble")
    splits = next(a for a in ensemble.attribute if a.name == "nodes_splits")
    assert splits.t.data_type == TensorProto.DOUBLE
    x = probe_rows(read_forest(booster), 3000)
    assert parity(booster, model, x) <= EXACT
    assert parity(booster, model, x.astype(np.float64)) <= EXACT  # cast like the runtime


def test_onnx_outputs_keep_their_layout(booster: lgb.Booster) -> None:
    session = _session(lightgbm_to_onnx(booster))
    assert session.get_inputs()[0].name == INPUT_NAME and np.dtype(INPUT_DTYPE) == np.float32
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    x = probe_rows(read_forest(booster), 500)
    label, probs = session.run(None, {INPUT_NAME: x})
    assert label.dtype == np.int64 and label.shape == (500,)
    assert probs.dtype == np.float64 and probs.shape == (500, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=EXACT)
    np.testing.assert_array_equal(label, (probs[:, 1] > 0.5).astype(np.int64))


def test_onnx_nan_rule(booster: lgb.Booster) -> None:
    session = _session(lightgbm_to_onnx(booster))
    rows = np.random.default_rng(0).normal(size=(100, N_FEATURES)).astype(np.float32)
    with_nan, as_zero = rows.copy(), rows.copy()
    with_nan[:, 0], as_zero[:, 0] = np.nan, 0.0  # feature 0 had no NaN in training
    with_nan[:, 3] = np.nan  # feature 3 did: LightGBM's learned side
    as_zero[:, 3] = np.nan
    p_nan = session.run(None, {INPUT_NAME: with_nan})[1][:, 1]
    p_zero = session.run(None, {INPUT_NAME: as_zero})[1][:, 1]
    np.testing.assert_array_equal(p_nan, p_zero)
    np.testing.assert_allclose(p_nan, booster.predict(with_nan), atol=EXACT)


def test_unsupported_splits_fall_back_to_onnxmltools(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(0, 5, 2000), rng.normal(size=2000)]).astype(np.float32)
    y = ((x[:, 0] == 2) | (x[:, 1] > 1)).astype(int)
    params = {"objective": "binary", "num_leaves": 4, "verbose": -1, "num_threads": 1,
              "min_data_per_group": 5, "cat_smooth": 1}
    booster = lgb.train(params, lgb.Dataset(x, y, categorical_feature=[0]), num_boost_round=5)
    with pytest.raises(ValueError, match="categorical"):
        read_forest(booster)
    with caplog.at_level(logging.WARNING):
        model = lightgbm_to_onnx(booster)
    assert "float32 thresholds" in caplog.text
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert parity(booster, model, x) < 1e-4


def test_gemm_graph_matches_lightgbm(booster: lgb.Booster) -> None:
    model = booster_to_gemm_onnx(booster)
    assert {n.domain for n in model.graph.node} == {""}  # no CPU-only ONNX-ML operators
    assert "TreeEnsemble" not in {n.op_type for n in model.graph.node}
    x = probe_rows(read_forest(booster), 3000)
    p = _session(model).run(None, {"features": x})[0]
    assert p.shape == (3000,) and p.dtype == np.float32
    assert np.max(np.abs(p - booster.predict(x))) <= GEMM_LIMIT
    assert gemm_parity(booster, model, x) <= GEMM_LIMIT


def test_gemm_groups_give_the_same_answer(booster: lgb.Booster) -> None:
    x = probe_rows(read_forest(booster), 1000, seed=5)
    one = booster_to_gemm_onnx(booster, max_group_columns=10_000)
    many = booster_to_gemm_onnx(booster, max_group_columns=16)
    assert len(many.graph.node) > len(one.graph.node)
    p_one = _session(one).run(None, {"features": x})[0]
    p_many = _session(many).run(None, {"features": x})[0]
    np.testing.assert_allclose(p_one, p_many, atol=1e-6)


def test_constant_trees_and_nan_sides_on_a_handmade_forest() -> None:
    def tree(feature: list[int], threshold: list[float], nan_left: list[bool],
             left: list[int], right: list[int], leaves: list[float]) -> Tree:
        return Tree(np.asarray(feature, np.int64), np.asarray(threshold, np.float64),
                    np.asarray(nan_left, bool), np.asarray(left, np.int64),
                    np.asarray(right, np.int64), np.asarray(leaves, np.float64))

    forest = Forest([
        tree([], [], [], [], [], [0.25]),  # a single leaf
        tree([0, 1], [0.5, -1.0], [True, False], [1, ~1], [~0, ~2], [1.0, -2.0, 0.5]),
        tree([1], [np.inf], [False], [~0], [~1], [0.125, -3.0]),  # NaN is the only way right
    ], n_features=2, sigmoid=1.0)
    x = np.array([[0.0, 0.0], [0.5, -1.0], [np.float32(0.5) + 1e-7, 3.0], [np.nan, -5.0],
                  [1.0, np.nan], [np.inf, -np.inf], [-np.inf, np.inf]], dtype=np.float32)
    expected = predict_reference(forest, x)
    exact = _session(forest_to_onnx(forest)).run(None, {INPUT_NAME: x})[1][:, 1]
    np.testing.assert_allclose(exact, expected, atol=EXACT)
    gemm = _session(forest_to_gemm_onnx(forest)).run(None, {"features": x})[0]
    np.testing.assert_allclose(gemm, expected, atol=1e-7)


def test_read_forest_rejects_other_objectives() -> None:
    x = np.random.default_rng(0).normal(size=(300, 3))
    y = np.arange(300) % 3
    booster = lgb.train({"objective": "multiclass", "num_class": 3, "verbose": -1,
                         "num_threads": 1}, lgb.Dataset(x, y), num_boost_round=2)
    with pytest.raises(ValueError, match="binary"):
        read_forest(booster)
