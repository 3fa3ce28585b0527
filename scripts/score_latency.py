"""Median time of one event through the worker's scoring call, and of each of its parts.

`fraudscore bench model` times the tree runtimes alone; this times what a worker calls for
a single event, `ModelRuntime.score`, on a registry version (the demo writes one):

    .venv/bin/fraudscore demo --out /tmp/demo
    .venv/bin/python scripts/score_latency.py /tmp/demo/models

Prints one JSON object of medians in µs (one thread, CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.definitions import N_FEATURES
from models.blend import blend
from models.registry import ModelError, resolve
from models.runtime import ModelRuntime


def median_us(fn: Callable[[], object], calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - start
    return round(float(np.median(times)) / 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("registry", type=Path)
    parser.add_argument("--version", default="latest")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    args = parser.parse_args()
    try:
        runtime = ModelRuntime(resolve(args.registry, args.version), device="cpu")
    except ModelError as exc:
        raise SystemExit(f"score_latency: {exc}") from None
    row = np.random.default_rng(0).gamma(2.0, 5.0, (1, N_FEATURES))
    clean = runtime._clean(row)
    parts: dict[str, Callable[[], object]] = {
        "score": lambda: runtime.score(row),
        "score_tree": lambda: runtime.score_tree(row),
        "clean": lambda: runtime._clean(row),
        "trees": lambda: runtime._tree(clean),  # type: ignore[misc]
    }
    neural = runtime._neural
    if neural is not None:
        errors, logit = neural.run(clean)
        tree = runtime.score_tree(row)
        parts["neural_onnx"] = lambda: neural.run(clean)
        parts["anomaly_calibration"] = lambda: neural.anomaly_score(errors)
        parts["blend"] = lambda: blend(tree, logit, runtime.blend_weight)
    print(json.dumps({"version": runtime.version, "tree_backend": runtime.tree_backend,
                      "median_us": {name: median_us(fn, args.calls, args.warmup)
                                    for name, fn in parts.items()}}))


if __name__ == "__main__":
    main()
