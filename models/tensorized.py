"""The tree model as tensor operations (the GEMM formulation of Hummingbird), for GPUs.

ONNX Runtime's tree-ensemble operator runs on CPU only; this graph uses only operators the
CUDA execution provider has. The input is transposed once to [F, N] and stacked with its
negation, [x; -x]. Per tree, with I splits and L leaves:

1. ``Gather`` one row per split: [I, N]. (Hummingbird multiplies by a one-hot matrix; a
   gather is exact where a product is not: 0 * inf and 0 * NaN would poison the row.)
2. ``LessOrEqual`` against the thresholds: 1 where the row goes left (x <= t). For a
   split that sends NaN left, the indicator is "goes right" instead, read from the negated
   row as -x <= -t' (t' the next float32 above t): NaN compares false either way, so NaN
   lands where LightGBM sends it without an IsNaN pass. T [I, N].
3. ``MatMul`` with C [L, I] (+1: leaf under the left branch, -1: under the right; the sign
   flipped for "goes right" rows) and ``Equal`` to D [L] (left turns on the leaf's path,
   corrected for the flipped rows) marks the one leaf reached.
4. ``MatMul`` with the leaf values, ``ReduceSum`` over trees, ``Sigmoid``.

Trees are padded to the largest I and L and evaluated in groups (one batched 3-D MatMul
per group), so intermediate memory stays near N x ``max_group_columns`` floats per tensor.

Precision: thresholds are float32 values chosen to decide exactly as LightGBM's float64
thresholds do for float32 inputs; what remains is float32 rounding of leaf values and of
their sum (measured ~2e-7 in probability on a 100-tree model).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.forest import Forest, Tree, read_forest

if TYPE_CHECKING:  # LightGBM is slow to import and only training has it loaded
    import lightgbm as lgb

INPUT_NAME = "features"
OUTPUT_NAME = "probability"
OPSET = 17


def booster_to_gemm_onnx(booster: lgb.Booster, max_group_columns: int = 1024) -> onnx.ModelProto:
    """ONNX graph: input ``features`` float32 [N, F] -> output ``probability`` float32 [N]."""
    return forest_to_gemm_onnx(read_forest(booster), max_group_columns)


def forest_to_gemm_onnx(forest: Forest, max_group_columns: int = 1024) -> onnx.ModelProto:
    n_splits = max([1, *(len(t.feature) for t in forest.trees)])
    n_leaves = max([1, *(t.n_leaves for t in forest.trees)])
    per_group = max(1, max_group_columns // max(n_splits, n_leaves))
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "axes_trees"),
    ]
    nodes += [
        helper.make_node("Transpose", [INPUT_NAME], ["xt"], perm=[1, 0]),
        helper.make_node("Neg", ["xt"], ["neg_xt"]),
        helper.make_node("Concat", ["xt", "neg_xt"], ["x_both"], axis=0),
    ]
    group_sums: list[str] = []
    for g, start in enumerate(range(0, len(forest.trees), per_group)):
        trees = forest.trees[start:start + per_group]
        group_sums.append(_group(g, trees, forest.n_features, n_splits, n_leaves, nodes, inits))
    nodes.append(helper.make_node("Sum", group_sums, ["raw"]))
    inits.append(numpy_helper.from_array(np.array(forest.sigmoid, dtype=np.float32), "scale"))
    nodes.append(helper.make_node("Mul", ["raw", "scale"], ["scaled"]))
    nodes.append(helper.make_node("Sigmoid", ["scaled"], [OUTPUT_NAME]))
    graph = helper.make_graph(
        nodes, "lightgbm_gemm",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, forest.n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _group(g: int, trees: list[Tree], n_features: int, n_splits: int, n_leaves: int,
           nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str:
    """Add one group's subgraph; returns the name of its [N] sum of leaf values."""
    k = len(trees)
    rows = np.zeros((k, n_splits), dtype=np.int64)  # index into [x; -x]
    threshold = np.zeros((k, n_splits), dtype=np.float32)
    paths = np.zeros((k, n_leaves, n_splits), dtype=np.float32)
    lefts = np.full((k, n_leaves, 1), -1.0, dtype=np.float32)  # padding leaves: never reached
    values = np.zeros((k, 1, n_leaves), dtype=np.float32)
    for j, tree in enumerate(trees):
        m = len(tree.feature)
        below = _float32_at_or_below(tree.threshold)
        flip = tree.nan_left  # these rows say "goes right": -x <= -(next float32 above t)
        rows[j, :m] = np.where(flip, tree.feature + n_features, tree.feature)
        threshold[j, :m] = np.where(flip, -np.nextafter(below, np.float32(math.inf)), below)
        c, d = _path_matrices(tree, n_splits, n_leaves)
        d -= c[:m][flip].sum(axis=0)  # D' = D - sum of C over the flipped rows
        c[:m][flip] *= -1.0
        paths[j], lefts[j, :, 0] = c.T, d
        values[j, 0, :tree.n_leaves] = tree.leaf_value
    p = f"g{g}_"
    inits += [
        numpy_helper.from_array(rows.reshape(-1), p + "rows"),
        numpy_helper.from_array(threshold.reshape(-1, 1), p + "threshold"),
        numpy_helper.from_array(np.array([k, n_splits, -1], dtype=np.int64), p + "shape"),
        numpy_helper.from_array(paths, p + "paths"),
        numpy_helper.from_array(lefts, p + "lefts"),
        numpy_helper.from_array(values, p + "values"),
    ]
    nodes += [
        helper.make_node("Gather", ["x_both", p + "rows"], [p + "x"], axis=0),
        helper.make_node("LessOrEqual", [p + "x", p + "threshold"], [p + "le"]),
        helper.make_node("Cast", [p + "le"], [p + "t"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [p + "t", p + "shape"], [p + "t3"]),
        helper.make_node("MatMul", [p + "paths", p + "t3"], [p + "agree"]),
        helper.make_node("Equal", [p + "agree", p + "lefts"], [p + "hit"]),
        helper.make_node("Cast", [p + "hit"], [p + "onehot"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", [p + "values", p + "onehot"], [p + "leaf"]),
        helper.make_node("ReduceSum", [p + "leaf", "axes_trees"], [p + "sum"], keepdims=0),
    ]
    return p + "sum"


def _float32_at_or_below(t: np.ndarray) -> np.ndarray:
    """Largest float32 <= t: for a float32 x, x <= t exactly when x <= this value."""
    f = t.astype(np.float32)
    above = f.astype(np.float64) > t
    f[above] = np.nextafter(f[above], np.float32(-math.inf))
    return f


def _path_matrices(tree: Tree, n_splits: int, n_leaves: int) -> tuple[np.ndarray, np.ndarray]:
    """C [I, L]: +1 / -1 where leaf l is under split i's left / right; D [L]: left turns."""
    paths = np.zeros((n_splits, n_leaves), dtype=np.float32)
    lefts = np.full(n_leaves, -1.0, dtype=np.float32)
    if len(tree.feature) == 0:  # a constant tree: its single leaf is always reached
        lefts[0] = 0.0
        return paths, lefts
    stack: list[tuple[int, list[tuple[int, int]]]] = [(0, [])]
    while stack:
        node, path = stack.pop()
        if node < 0:
            leaf = ~node
            for split, sign in path:
                paths[split, leaf] = sign
            lefts[leaf] = sum(1 for _, sign in path if sign > 0)
            continue
        stack.append((int(tree.left[node]), [*path, (node, 1)]))
        stack.append((int(tree.right[node]), [*path, (node, -1)]))
    return paths, lefts


def gemm_parity(booster: lgb.Booster, model: onnx.ModelProto, x: np.ndarray) -> float:
    """Max absolute difference between LightGBM and the graph on ONNX Runtime's CPU."""
    import onnxruntime as ort

    if len(x) == 0:
        return 0.0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x32})[0]
    return float(np.max(np.abs(got.astype(np.float64) - booster.predict(x32))))
