"""Neural models: an autoencoder anomaly score and an MLP classifier, exported to ONNX.

Both are trained with scikit-learn (no deep-learning framework needed at training or
serving time) and written to ONNX by a small exporter of our own: the networks are plain
dense layers, so the graph is a handful of ``Gemm``/``Relu`` nodes in float64, which keeps
ONNX Runtime's output within float rounding of scikit-learn's.

The graph takes the raw feature matrix and does the preprocessing itself (signed log,
standardisation, missing → mean), so the serving side cannot drift from training.
Outputs: ``reconstruction_error`` (mean squared error per row, in standardised units) and
``mlp_logit`` (the classifier's log-odds, corrected for the oversampling it was trained
with). The reconstruction error becomes a calibrated anomaly score in :func:`calibrate`:
the share of genuine validation transactions whose error is lower.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "features"
ERROR_OUTPUT = "reconstruction_error"
LOGIT_OUTPUT = "mlp_logit"
CALIBRATION_POINTS = 1001


@dataclass(frozen=True)
class Preprocessor:
    """Signed log then standardisation; fitted on the training rows only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Preprocessor:
        z = _signed_log(x)
        mean = np.nanmean(z, axis=0)
        std = np.nanstd(z, axis=0)
        return cls(np.nan_to_num(mean), np.where(std > 1e-9, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        z = (_signed_log(x) - self.mean) / self.std
        return np.where(np.isfinite(z), z, 0.0)  # missing or infinite → the training mean


def _signed_log(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.sign(x) * np.log1p(np.abs(x))


@dataclass(frozen=True)
class NeuralModel:
    """The fitted networks and what serving needs to turn outputs into scores."""

    onnx_bytes: bytes
    error_quantiles: np.ndarray  # genuine validation errors at CALIBRATION_POINTS quantiles
    has_classifier: bool
    reference_error: np.ndarray  # scikit-learn's errors on `reference_x`, for parity checks
    reference_logit: np.ndarray
    reference_x: np.ndarray
    prep: Preprocessor
    ae_layers: list[tuple[np.ndarray, np.ndarray]]

    def anomaly_score(self, errors: np.ndarray) -> np.ndarray:
        return calibrate(errors, self.error_quantiles)

    def training_library_error(self, x: np.ndarray) -> np.ndarray:
        """Reconstruction error computed in numpy from the fitted weights (parity checks)."""
        return reconstruction_error(self.prep, self.ae_layers, x)


def calibrate(errors: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Error → share of genuine validation rows with a lower error (0..1, monotone)."""
    return calibrated(errors, *calibration_points(quantiles))


def calibration_points(quantiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(errors, levels) to interpolate: the quantiles can repeat (many identical errors)
    and interpolation needs increasing x, so each repeat keeps its first level."""
    levels = np.linspace(0.0, 1.0, len(quantiles))
    q, first = np.unique(quantiles, return_index=True)
    return q, levels[first]


def calibrated(errors: np.ndarray, q: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """A NaN error (overflow) scores as the most anomalous. `np.where`, not `nan_to_num`:
    the latter costs 4 µs of a single event's score."""
    return np.interp(np.where(np.isnan(errors), np.inf, errors), q, levels,
                     left=0.0, right=1.0)


def _dense(layers: list[tuple[np.ndarray, np.ndarray]], z: np.ndarray) -> np.ndarray:
    """ReLU hidden layers, linear output (scikit-learn's MLPs before `out_activation_`)."""
    for i, (w, b) in enumerate(layers):
        z = z @ w + b
        if i < len(layers) - 1:
            z = np.maximum(z, 0.0)
    return z


def fit_neural(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    seed: int = 7,
    max_rows: int = 120_000,
    with_classifier: bool = True,
) -> NeuralModel:
    """Autoencoder on genuine training rows (+ MLP classifier), calibrated on validation."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    rng = np.random.default_rng(seed)
    prep = Preprocessor.fit(x_train)
    genuine = np.flatnonzero(~y_train.astype(bool))
    if len(genuine) > max_rows:
        genuine = rng.choice(genuine, max_rows, replace=False)
    z_genuine = prep.transform(x_train[genuine])
    n_features = x_train.shape[1]
    hidden = max(4, n_features // 2)
    ae = MLPRegressor(hidden_layer_sizes=(hidden, max(3, hidden // 2), hidden),
                      activation="relu", batch_size=512, learning_rate_init=2e-3,
                      max_iter=25, early_stopping=True, n_iter_no_change=4, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ae.fit(z_genuine, z_genuine)
    ae_layers = list(zip(ae.coefs_, ae.intercepts_, strict=True))

    clf_layers: list[tuple[np.ndarray, np.ndarray]] = []
    prior_shift = 0.0
    if with_classifier and y_train.any():
        fraud = np.flatnonzero(y_train.astype(bool))
        rest = np.flatnonzero(~y_train.astype(bool))
        if len(rest) > max_rows:
            rest = rng.choice(rest, max_rows, replace=False)
        # oversample frauds to ~10 % so the network sees them; undo it in the logit below
        repeat = max(1, int(0.1 * len(rest) / max(len(fraud), 1)))
        idx = np.concatenate([rest, np.repeat(fraud, repeat)])
        rng.shuffle(idx)
        clf = MLPClassifier(hidden_layer_sizes=(32, 16), activation="relu", batch_size=512,
                            learning_rate_init=1e-3, alpha=1e-4, max_iter=30,
                            early_stopping=True, n_iter_no_change=5, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(prep.transform(x_train[idx]), y_train[idx].astype(int))
        clf_layers = list(zip(clf.coefs_, clf.intercepts_, strict=True))
        kept_rest = len(rest) / max(int((~y_train.astype(bool)).sum()), 1)
        prior_shift = float(np.log(repeat / kept_rest))

    model_proto = export_onnx(prep, ae_layers, clf_layers, prior_shift, n_features)
    valid_errors = reconstruction_error(prep, ae_layers, x_valid[~y_valid.astype(bool)])
    if len(valid_errors) == 0:
        valid_errors = reconstruction_error(prep, ae_layers, x_train[genuine])
    quantiles = np.quantile(valid_errors, np.linspace(0, 1, CALIBRATION_POINTS))
    ref_x = x_valid[: min(len(x_valid), 5000)]
    return NeuralModel(
        onnx_bytes=model_proto.SerializeToString(),
        error_quantiles=quantiles,
        has_classifier=bool(clf_layers),
        reference_error=reconstruction_error(prep, ae_layers, ref_x),
        reference_logit=(_dense(clf_layers, prep.transform(ref_x))[:, 0]
                         - prior_shift) if clf_layers else np.zeros(len(ref_x)),
        reference_x=ref_x,
        prep=prep,
        ae_layers=ae_layers,
    )


def reconstruction_error(prep: Preprocessor, layers: list[tuple[np.ndarray, np.ndarray]],
                         x: np.ndarray) -> np.ndarray:
    z = prep.transform(x)
    return np.mean((_dense(layers, z) - z) ** 2, axis=1)


def export_onnx(
    prep: Preprocessor,
    ae_layers: list[tuple[np.ndarray, np.ndarray]],
    clf_layers: list[tuple[np.ndarray, np.ndarray]],
    prior_shift: float,
    n_features: int,
) -> onnx.ModelProto:
    """One float64 graph: preprocessing, the autoencoder's error, the classifier's logit."""
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray | float) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float64), name))
        return name

    one, zero = const("one", 1.0), const("zero", 0.0)
    nodes += [
        helper.make_node("Abs", [INPUT_NAME], ["abs"]),
        helper.make_node("Add", ["abs", one], ["abs1"]),
        helper.make_node("Log", ["abs1"], ["log"]),
        helper.make_node("Sign", [INPUT_NAME], ["sign"]),
        helper.make_node("Mul", ["sign", "log"], ["slog"]),
        helper.make_node("Sub", ["slog", const("mean", prep.mean)], ["centred"]),
        helper.make_node("Div", ["centred", const("std", prep.std)], ["scaled"]),
        # NaN (missing) and ±inf both become 0, the training mean, as in Preprocessor
        helper.make_node("IsNaN", ["scaled"], ["nan"]),
        helper.make_node("IsInf", ["scaled"], ["inf"]),
        helper.make_node("Or", ["nan", "inf"], ["bad"]),
        helper.make_node("Where", ["bad", zero, "scaled"], ["z"]),
    ]

    def mlp(prefix: str, layers: list[tuple[np.ndarray, np.ndarray]]) -> str:
        cur = "z"
        for i, (w, b) in enumerate(layers):
            out = f"{prefix}_h{i}"
            nodes.append(helper.make_node(
                "Gemm", [cur, const(f"{prefix}_w{i}", w), const(f"{prefix}_b{i}", b)], [out]))
            if i < len(layers) - 1:
                nodes.append(helper.make_node("Relu", [out], [out + "_relu"]))
                out += "_relu"
            cur = out
        return cur

    recon = mlp("ae", ae_layers)
    nodes += [
        helper.make_node("Sub", [recon, "z"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", const_int64(inits, "axis1", [1])], [ERROR_OUTPUT],
                         keepdims=0),
    ]
    outputs = [helper.make_tensor_value_info(ERROR_OUTPUT, TensorProto.DOUBLE, ["N"])]
    if clf_layers:
        logit = mlp("clf", clf_layers)
        nodes += [
            helper.make_node("Sub", [logit, const("prior_shift", prior_shift)], ["shifted"]),
            helper.make_node("Squeeze", ["shifted", const_int64(inits, "axis1b", [1])],
                             [LOGIT_OUTPUT]),
        ]
        outputs.append(helper.make_tensor_value_info(LOGIT_OUTPUT, TensorProto.DOUBLE, ["N"]))
    graph = helper.make_graph(
        nodes, "fraudscore_neural",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.DOUBLE, ["N", n_features])],
        outputs, initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              producer_name="fraudscore")
    model.ir_version = 8  # readable by every onnxruntime 1.x the project supports
    onnx.checker.check_model(model)
    return model


def const_int64(inits: list[TensorProto], name: str, value: list[int]) -> str:
    inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    return name


class NeuralSession:
    """ONNX Runtime session for the neural graph, single-threaded like the tree model."""

    def __init__(self, onnx_bytes: bytes, error_quantiles: np.ndarray,
                 providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(onnx_bytes, sess_options=opts,
                                             providers=providers or ["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.has_classifier = LOGIT_OUTPUT in self._outputs
        self.error_quantiles = np.asarray(error_quantiles, dtype=np.float64)
        # once, not per batch: 16 of a single event's 42 µs went into building them
        self._calibration = calibration_points(self.error_quantiles)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(reconstruction error, classifier logit or None) per row."""
        res = self._session.run(self._outputs,
                                {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float64)})
        return res[0], (res[1] if self.has_classifier else None)

    def anomaly_score(self, errors: np.ndarray) -> np.ndarray:
        return calibrated(errors, *self._calibration)
