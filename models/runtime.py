"""Scoring one model version: compiled trees (or ONNX Runtime), the neural graph, the blend.

Everything is loaded once per worker and runs single-threaded: a streaming worker scales by
processes, and multi-threaded calls stall under load. Score-time behaviour for bad values:
a NaN feature is *missing* (LightGBM's learned missing branch; the network's training
mean); ±inf is treated the same way, and every row that had one is counted in
:attr:`ModelRuntime.non_finite_rows` so the engine can report it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from features.definitions import N_FEATURES
from models.blend import blend
from models.neural import NeuralSession
from models.registry import (
    BOOSTER,
    COMPILED,
    GEMM_ONNX,
    NEURAL_ONNX,
    TREE_ONNX,
    ModelCorrupt,
    ModelError,
    ModelRef,
    resolve,
)

log = logging.getLogger(__name__)


def providers(device: str = "auto") -> list[str]:
    """CUDA when asked for (or `auto`) and present, always with the CPU fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ModelError("device cuda asked for, but onnxruntime has no CUDA provider here "
                         "(install the `gpu` extra on a machine with an NVIDIA GPU)")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: Path, provider_list: list[str]) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=provider_list)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelCorrupt(f"{path}: ONNX Runtime cannot load it ({exc})") from None


@dataclass(frozen=True)
class Scores:
    fraud: np.ndarray  # final (blended) fraud probability
    anomaly: np.ndarray  # calibrated autoencoder score, 0..1
    tree: np.ndarray  # the tree model's own probability


class ModelRuntime:
    """One model version loaded for scoring."""

    def __init__(self, ref: ModelRef, device: str = "auto", tree_backend: str = "auto") -> None:
        if tree_backend not in ("auto", "compiled", "onnx"):
            raise ValueError(f"tree backend must be auto, compiled or onnx, not {tree_backend!r}")
        self.ref = ref
        self.manifest = ref.manifest
        self.blend_weight = float(ref.manifest.get("blend_weight", 0.0))
        provider_list = providers(device)
        self.device = "cuda" if provider_list[0].startswith("CUDA") else "cpu"
        self.non_finite_rows = 0
        self._tree: Callable[[np.ndarray], np.ndarray] | None = None
        self.tree_backend = ""
        if self.device == "cuda" and (ref.path / GEMM_ONNX).exists():
            self._tree = self._onnx_tree(ref.path / GEMM_ONNX, provider_list)
            self.tree_backend = "gemm-onnx-cuda"
        elif tree_backend in ("auto", "compiled") and ref.manifest.get("compiled"):
            try:
                from models.compiled import load_compiled

                model = load_compiled(ref.path / COMPILED, ref.manifest["compiled"], N_FEATURES)
                self._tree = model.predict
                self.tree_backend = f"compiled-{ref.manifest['compiled'].get('backend')}"
            except Exception as exc:  # e.g. a library built for another CPU or libc
                if tree_backend == "compiled":
                    raise ModelCorrupt(f"{ref.path / COMPILED}: cannot load ({exc})") from None
                log.warning("compiled model unusable, using ONNX Runtime: %s", exc)
        if self._tree is None:
            self._tree = self._onnx_tree(ref.path / TREE_ONNX, ["CPUExecutionProvider"])
            self.tree_backend = "onnx"
        neural_path = ref.path / NEURAL_ONNX
        self._neural = NeuralSession(neural_path.read_bytes(),
                                     np.asarray(ref.manifest["anomaly_calibration"]),
                                     provider_list) if neural_path.exists() else None
        self._booster: Any = None  # lightgbm.Booster: see load_explainer
        self._booster_lock = threading.Lock()

    @staticmethod
    def _onnx_tree(path: Path, provider_list: list[str]) -> Callable[[np.ndarray], np.ndarray]:
        session = _session(path, provider_list)
        inp = session.get_inputs()[0]
        dtype = np.float64 if "double" in inp.type else np.float32
        outputs = session.get_outputs()
        # the tree ensemble gives [label, probabilities (N, 2)]; the GEMM graph one column
        out = outputs[1].name if len(outputs) > 1 else outputs[0].name
        two_columns = len(outputs) > 1

        def predict(x: np.ndarray) -> np.ndarray:
            res = session.run([out], {inp.name: np.ascontiguousarray(x, dtype=dtype)})[0]
            return (res[:, 1] if two_columns else res.reshape(-1)).astype(np.float64)

        return predict

    @property
    def version(self) -> str:
        return self.ref.version

    def _clean(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"expected a (rows, {N_FEATURES}) feature matrix, got {x.shape}")
        bad = ~np.isfinite(x)
        if bad.any():
            self.non_finite_rows += int(bad.any(axis=1).sum())
            x = np.where(bad, np.nan, x)
        return x

    def score_tree(self, x: np.ndarray) -> np.ndarray:
        """The tree model alone: the fastest path, for single events and benchmarks."""
        assert self._tree is not None
        return self._tree(self._clean(x))

    def score(self, x: np.ndarray) -> Scores:
        if len(x) == 0:
            empty = np.empty(0, dtype=np.float64)
            return Scores(empty, empty, empty)
        x = self._clean(x)
        assert self._tree is not None
        tree = self._tree(x)
        if self._neural is None:
            return Scores(tree, np.zeros_like(tree), tree)
        errors, mlp_logit = self._neural.run(x)
        return Scores(blend(tree, mlp_logit, self.blend_weight),
                      self._neural.anomaly_score(errors), tree)

    def score_many(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row."""
        return self.score(x).fraud

    def load_explainer(self) -> None:
        """Load the native LightGBM model that reason codes need. Importing lightgbm takes
        seconds, so a streaming worker calls this before it consumes (and a reloaded
        version before it is swapped in): otherwise the first alert stalls its batch."""
        with self._booster_lock:
            if self._booster is None:
                import lightgbm as lgb  # slow to import; only alerts need it

                self._booster = lgb.Booster(model_file=str(self.ref.path / BOOSTER))

    def contributions_many(self, x: np.ndarray) -> np.ndarray:
        """Per-feature log-odds contributions (TreeSHAP); only called for alerted rows."""
        self.load_explainer()
        # one thread, as everywhere in a streaming worker: OpenMP's second thread waits on
        # a busy core for milliseconds per call on a shared machine
        contrib = self._booster.predict(self._clean(x), pred_contrib=True, num_threads=1)
        return np.asarray(contrib)[:, :-1]  # last column is the bias


class ModelWatcher:
    """Notices a new version in the registry (LATEST moved) without restarting the worker.

    `poll()` is cheap (one stat at most every `interval_s`) and is called between batches;
    a version that fails to load is logged and skipped, the running one stays.
    """

    def __init__(self, registry: Path, current: ModelRuntime, interval_s: float = 10.0,
                 loader: Callable[[ModelRef], ModelRuntime] = ModelRuntime) -> None:
        self.registry = registry
        self.current = current
        self.interval_s = interval_s
        self.loader = loader
        self._next = time.monotonic() + interval_s
        self._failed: set[str] = set()

    def poll(self) -> ModelRuntime | None:
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.interval_s
        latest = self.registry / "LATEST"
        try:
            version = latest.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        if version == self.current.version or version in self._failed:
            return None
        try:
            runtime = self.loader(resolve(self.registry, version))
        except (ModelError, OSError, ValueError) as exc:
            log.error("model %s not loaded, keeping %s: %s", version, self.current.version, exc)
            self._failed.add(version)
            return None
        log.info("model reloaded: %s → %s", self.current.version, version)
        self.current = runtime
        return runtime
