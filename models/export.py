"""Export the tree model to ONNX and check it against LightGBM."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import onnx
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType

from features.definitions import N_FEATURES

INPUT_NAME = "features"


def lightgbm_to_onnx(booster: lgb.Booster) -> onnx.ModelProto:
    """ONNX TreeEnsembleClassifier with a plain probability tensor output (no ZipMap)."""
    return convert_lightgbm(
        booster,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
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
    x32 = x.astype(np.float32)
    onnx_p = session.run(None, {INPUT_NAME: x32})[1][:, 1]
    lgb_p = booster.predict(x32)
    return float(np.max(np.abs(onnx_p - lgb_p))) if len(x) else 0.0
