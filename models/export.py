"""Export the tree model to ONNX and check it against LightGBM.

The graph is ONNX-ML ``TreeEnsemble`` (ai.onnx.ml opset 5) with float64 thresholds and
leaf values: the float32 input is cast to float64 inside the graph (exact), so every split
decides as LightGBM does and probabilities match ``Booster.predict`` to ~1e-16. The default
onnxmltools export stores float32 thresholds: ~3e-7 off on ordinary rows, but on rows at
the thresholds, ±inf and LightGBM's zero band up to 0.98 (219 of 20,000 such rows flipped
at 0.5). It is only used for models this exporter cannot express (categorical or
zero-as-missing splits), with a warning.

Inputs and outputs are unchanged for callers: input ``features`` float32 [N, F]; outputs
``label`` int64 [N] and ``probabilities`` float64 [N, 2] (column 1 is fraud).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.forest import Forest, read_forest

if TYPE_CHECKING:  # LightGBM is slow to import and only training has it loaded
    import lightgbm as lgb

log = logging.getLogger(__name__)

INPUT_NAME = "features"
INPUT_DTYPE = np.float32
OUTPUT_NAMES = ("label", "probabilities")
ONNX_OPSET = 17
ONNX_ML_OPSET = 5  # TreeEnsemble with typed (float64) splits; onnxruntime >= 1.20
_BRANCH_LEQ = 0


def lightgbm_to_onnx(booster: lgb.Booster) -> onnx.ModelProto:
    """Exact ONNX tree ensemble; the onnxmltools float32 export for what it cannot express."""
    try:
        forest = read_forest(booster)
    except ValueError as exc:
        log.warning("exact ONNX export not possible (%s); float32 thresholds instead", exc)
        return _onnxmltools_export(booster)
    return forest_to_onnx(forest)


def forest_to_onnx(forest: Forest) -> onnx.ModelProto:
    """TreeEnsemble (sum of leaves, float64) -> sigmoid -> [label, probabilities]."""
    ensemble = _tree_ensemble_node(forest, "features64", "raw")
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["features64"], to=TensorProto.DOUBLE),
        ensemble,
        helper.make_node("Mul", ["raw", "sigmoid_scale"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["p_fraud"]),
        helper.make_node("Sub", ["one", "p_fraud"], ["p_legit"]),
        helper.make_node("Concat", ["p_legit", "p_fraud"], [OUTPUT_NAMES[1]], axis=1),
        helper.make_node("Greater", ["p_fraud", "half"], ["is_fraud"]),
        helper.make_node("Cast", ["is_fraud"], ["label_2d"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["label_2d", "flat"], [OUTPUT_NAMES[0]]),
    ]
    constants = [
        numpy_helper.from_array(np.array(forest.sigmoid, dtype=np.float64), "sigmoid_scale"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float64), "one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float64), "half"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "lightgbm_exact",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, forest.n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.INT64, [None]),
         helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.DOUBLE, [None, 2])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid("ai.onnx.ml", ONNX_ML_OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _tree_ensemble_node(forest: Forest, x: str, y: str) -> onnx.NodeProto:
    """One ai.onnx.ml.TreeEnsemble node; children index nodes, or leaves when flagged."""
    feature, split, nan_true, true_id, true_leaf, false_id, false_leaf = ([] for _ in range(7))
    roots: list[int] = []
    leaf_weights: list[float] = []
    for tree in forest.trees:
        node0, leaf0 = len(feature), len(leaf_weights)
        roots.append(node0)
        leaf_weights.extend(tree.leaf_value.tolist())
        if len(tree.feature) == 0:  # a constant tree still needs a root: both ways, one leaf
            feature.append(0)
            split.append(0.0)
            nan_true.append(1)
            true_id.append(leaf0)
            false_id.append(leaf0)
            true_leaf.append(1)
            false_leaf.append(1)
            continue
        feature.extend(tree.feature.tolist())
        split.extend(tree.threshold.tolist())
        nan_true.extend(tree.nan_left.astype(int).tolist())
        for kids, ids, leaf_flags in ((tree.left, true_id, true_leaf),
                                      (tree.right, false_id, false_leaf)):
            for child in kids.tolist():
                is_leaf = child < 0
                ids.append(leaf0 + ~child if is_leaf else node0 + child)
                leaf_flags.append(int(is_leaf))
    return helper.make_node(
        "TreeEnsemble", [x], [y], domain="ai.onnx.ml",
        aggregate_function=1,  # SUM
        post_transform=0,  # NONE: the sigmoid follows as its own node
        n_targets=1,
        tree_roots=roots,
        nodes_featureids=feature,
        nodes_splits=numpy_helper.from_array(np.asarray(split, dtype=np.float64)),
        nodes_modes=numpy_helper.from_array(np.full(len(feature), _BRANCH_LEQ, np.uint8)),
        nodes_missing_value_tracks_true=nan_true,
        nodes_truenodeids=true_id,
        nodes_trueleafs=true_leaf,
        nodes_falsenodeids=false_id,
        nodes_falseleafs=false_leaf,
        leaf_targetids=[0] * len(leaf_weights),
        leaf_weights=numpy_helper.from_array(np.asarray(leaf_weights, dtype=np.float64)),
    )


def _onnxmltools_export(booster: lgb.Booster) -> onnx.ModelProto:
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    return convert_lightgbm(
        booster,
        initial_types=[(INPUT_NAME, FloatTensorType([None, booster.num_feature()]))],
        zipmap=False,
        target_opset=15,  # the highest onnxmltools 1.16 supports
    )


def parity(booster: lgb.Booster, model: onnx.ModelProto, x: np.ndarray) -> float:
    """Max absolute difference between LightGBM and ONNX Runtime fraud probabilities."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    onnx_p = session.run(None, {INPUT_NAME: x32})[1][:, 1]
    lgb_p = booster.predict(x32)
    return float(np.max(np.abs(onnx_p - lgb_p))) if len(x) else 0.0
