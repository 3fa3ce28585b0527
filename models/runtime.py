"""Scoring sessions: ONNX Runtime for the batch, LightGBM contributions for alert reasons."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import onnxruntime as ort

from models.export import INPUT_NAME
from models.registry import ModelRef


def providers(prefer_gpu: bool) -> list[str]:
    """CUDA first when asked for and present, always with the CPU fallback."""
    available = ort.get_available_providers()
    if prefer_gpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ModelRuntime:
    """One model version loaded for scoring; single-threaded (workers scale by process)."""

    def __init__(self, ref: ModelRef, prefer_gpu: bool = False) -> None:
        self.ref = ref
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # the converter's declared label shape is noise here
        self._session = ort.InferenceSession(
            str(ref.path / "model.onnx"), sess_options=opts, providers=providers(prefer_gpu)
        )
        self._booster: lgb.Booster | None = None
        self._probabilities = self._session.get_outputs()[1].name

    @property
    def version(self) -> str:
        return self.ref.version

    def score_many(self, x: np.ndarray) -> np.ndarray:
        """Fraud probability per row."""
        if len(x) == 0:
            return np.empty(0, dtype=np.float64)
        probs = self._session.run([self._probabilities],
                                  {INPUT_NAME: x.astype(np.float32, copy=False)})[0]
        return probs[:, 1].astype(np.float64)

    def contributions_many(self, x: np.ndarray) -> np.ndarray:
        """Per-feature log-odds contributions (TreeSHAP); only called for alerted rows."""
        if self._booster is None:
            self._booster = lgb.Booster(model_file=str(self.ref.path / "booster.txt"))
        contrib = self._booster.predict(x.astype(np.float32), pred_contrib=True)
        return np.asarray(contrib)[:, :-1]  # last column is the bias
