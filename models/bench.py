"""Side-by-side speed of the tree-model runtimes, single-threaded, for ``bench model``.

Every runtime scores the same rows in the same run, interleaved in rounds so that a burst
of load on a shared machine hits them all alike; figures are medians over repeated calls.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from models.compiled import compile_booster, load_compiled
from models.forest import probe_rows, read_forest

ROUNDS = 3
POOL_ROWS = 8192
Predict = Callable[[np.ndarray], np.ndarray]


def synthetic_data(n_rows: int, n_features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a few NaNs and a label that depends on several features non-linearly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = np.nan
    z = np.nan_to_num(x)
    logit = z[:, 0] + z[:, 1] * z[:, 2 % n_features] - np.abs(z[:, 3 % n_features]) - 2.0
    y = (logit + rng.logistic(size=n_rows) > 0).astype(np.int32)
    return x, y


def synthetic_booster(n_trees: int = 100, num_leaves: int = 31, n_features: int = 15,
                      n_rows: int = 20_000, seed: int = 0) -> lgb.Booster:
    """A binary model with exactly ``n_trees`` trees of up to ``num_leaves`` leaves."""
    x, y = synthetic_data(n_rows, n_features, seed)
    params = {"objective": "binary", "num_leaves": num_leaves, "min_child_samples": 5,
              "learning_rate": 0.05, "num_threads": 2, "verbose": -1, "seed": seed,
              "deterministic": True}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=n_trees)


def bench_models(
    n_trees: int = 100,
    num_leaves: int = 31,
    n_features: int = 15,
    batches: tuple[int, ...] = (1, 16, 256, 4096),
    seconds_per_case: float = 0.5,
    neural_onnx: bytes | None = None,
    neural_reference: Predict | None = None,
) -> dict[str, Any]:
    """``{"runtimes": {runtime: {batch: {rows_per_s, latency_us_p50, latency_us_p99}}},
    "parity_max_abs_diff": {runtime: float}}``.

    Runtimes: ``lightgbm`` (Booster.predict, 1 thread), ``onnx`` (ONNX Runtime tree
    ensemble, exact export, 1 thread), ``compiled`` (lleaves by default; left out if
    compiling fails) and ``neural_onnx`` when its bytes are given. Its parity is reported
    against ``neural_reference`` (a function of the same rows) when one is given.
    """
    booster = synthetic_booster(n_trees, num_leaves, n_features)
    pool, _ = synthetic_data(POOL_ROWS, n_features, seed=1)
    probes = probe_rows(read_forest(booster), 2048)
    with tempfile.TemporaryDirectory(prefix="fraudscore-bench-") as tmp:
        runtimes: dict[str, Predict] = {
            "lightgbm": lambda x: booster.predict(x, num_threads=1),
            "onnx": _onnx_tree_predict(booster),
        }
        entry = compile_booster(booster.model_to_string(), Path(tmp), timeout_s=120.0)
        if entry is not None:
            runtimes["compiled"] = load_compiled(Path(tmp), entry, n_features).predict
        parity = {name: _max_diff(fn, booster.predict, probes) for name, fn in runtimes.items()}
        pools = dict.fromkeys(runtimes, pool)
        if neural_onnx is not None:
            runtimes["neural_onnx"], width = _onnx_first_output(neural_onnx)
            pools["neural_onnx"], _ = synthetic_data(POOL_ROWS, width, seed=2)
            if neural_reference is not None:
                parity["neural_onnx"] = _max_diff(runtimes["neural_onnx"], neural_reference,
                                                  pools["neural_onnx"][:1024])
        results = {name: {} for name in runtimes}
        for batch in batches:
            inputs = {name: _batches(pools[name], batch) for name in runtimes}
            lat = _interleaved(runtimes, inputs, seconds_per_case)
            for name, seconds in lat.items():
                p50, p99 = np.percentile(seconds, [50, 99])
                results[name][str(batch)] = {
                    "rows_per_s": round(batch / p50, 1),
                    "latency_us_p50": round(p50 * 1e6, 2),
                    "latency_us_p99": round(p99 * 1e6, 2),
                }
    return {"runtimes": results, "parity_max_abs_diff": parity}


def _onnx_tree_predict(booster: lgb.Booster) -> Predict:
    from models.compiled import OnnxTreeModel
    from models.export import lightgbm_to_onnx

    model = OnnxTreeModel(lightgbm_to_onnx(booster).SerializeToString(), booster.num_feature())
    return model.predict


def _onnx_first_output(model: bytes) -> tuple[Predict, int]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    dtype = np.float64 if "double" in inp.type else np.float32

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0]

    return predict, int(inp.shape[1])


def _max_diff(fn: Predict, reference: Predict, x: np.ndarray) -> float:
    got = np.asarray(fn(x), dtype=np.float64).reshape(len(x), -1)
    want = np.asarray(reference(x), dtype=np.float64).reshape(len(x), -1)
    diff = np.abs(got - want)
    both_nan = np.isnan(got) & np.isnan(want)
    return float(np.max(np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf)), initial=0.0))


def _batches(pool: np.ndarray, batch: int) -> list[np.ndarray]:
    """Distinct C-contiguous batches cycling through the pool (no single hot row)."""
    starts = range(0, max(1, len(pool) - batch + 1), batch)
    return [np.ascontiguousarray(pool[s:s + batch]) for s in starts][:256]


def _interleaved(runtimes: dict[str, Predict], inputs: dict[str, list[np.ndarray]],
                 seconds_per_case: float) -> dict[str, np.ndarray]:
    """Per-call wall times, each runtime timed in ROUNDS slices taken in turn."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for name, fn in runtimes.items():  # warm-up: first calls allocate and fault pages in
        for x in inputs[name][:3]:
            fn(x)
    for _ in range(ROUNDS):
        for name, fn in runtimes.items():
            batches = inputs[name]
            end = time.perf_counter() + seconds_per_case / ROUNDS
            i = 0
            while True:
                x = batches[i % len(batches)]
                t0 = time.perf_counter()
                fn(x)
                t1 = time.perf_counter()
                times[name].append(t1 - t0)
                i += 1
                if t1 >= end and i >= 3:
                    break
    return {name: np.asarray(t) for name, t in times.items()}
