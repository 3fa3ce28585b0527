"""Model versions end to end without servers: ensemble training, registry, runtime, policy."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import fakeredis
import numpy as np
import pandas as pd
import pytest

from app.pipeline import InputRecord, Scorer, Topics
from app.schemas import ScoreRecord
from app.security.envelope import FieldCipher
from app.security.tokens import Tokenizer, random_key
from app.simulator import simulate
from app.sources import transactions_to_json
from features.definitions import FEATURE_NAMES, N_FEATURES
from features.offline import compute_features
from features.online import RedisFeatureStore
from models.ensemble import Ensemble, train_ensemble
from models.neural import calibrate
from models.policy import (
    RULE_AMOUNT,
    RULE_TERMINAL,
    Policy,
    budget_threshold,
    precision_threshold,
)
from models.registry import ModelCorrupt, ModelNotFound, ModelRef, resolve, save
from models.runtime import ModelRuntime, ModelWatcher
from models.train import TrainConfig


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    tx, labels = simulate(customers=250, terminals=500, days=35, seed=5)
    feats = compute_features(tx, labels)
    return tx, feats, labels["is_fraud"].to_numpy()


@pytest.fixture(scope="module")
def ensemble(data: tuple[pd.DataFrame, pd.DataFrame, np.ndarray]) -> Ensemble:
    tx, feats, y = data
    return train_ensemble(feats, y, tx["timestamp"], tx["customer_id"].to_numpy(),
                          TrainConfig(n_estimators=40))


@pytest.fixture(scope="module")
def ref(ensemble: Ensemble, data: tuple[pd.DataFrame, pd.DataFrame, np.ndarray],
        tmp_path_factory: pytest.TempPathFactory) -> ModelRef:
    """One registered version (compiling once): tests that change a registry copy it."""
    return save(ensemble, tmp_path_factory.mktemp("models") / "registry", {"test": True},
                data[1].to_numpy()[:500], compile_timeout_s=60)


def test_artifacts_agree_with_their_training_libraries(ref: ModelRef) -> None:
    parity = ref.manifest["parity_max_abs_diff"]
    assert parity["onnx"] <= 1e-5
    assert parity["neural_onnx"] <= 1e-5
    for name, value in parity.items():
        assert value is None or value <= 1e-5, name
    assert set(ref.manifest["files"]) >= {"booster.txt", "tree.onnx", "neural.onnx"}
    assert ref.manifest["features"] == list(FEATURE_NAMES)


def test_runtime_scores_match_lightgbm_and_are_probabilities(
        ref: ModelRef, ensemble: Ensemble, data: tuple) -> None:
    x = data[1].to_numpy()[:2000]
    rt = ModelRuntime(ref, device="cpu")
    scores = rt.score(x)
    assert scores.fraud.shape == scores.anomaly.shape == (2000,)
    assert np.all((scores.fraud >= 0) & (scores.fraud <= 1))
    assert np.all((scores.anomaly >= 0) & (scores.anomaly <= 1))
    np.testing.assert_allclose(scores.tree, ensemble.tree.booster.predict(x), atol=1e-5)
    onnx_rt = ModelRuntime(ref, device="cpu", tree_backend="onnx")
    np.testing.assert_allclose(onnx_rt.score_tree(x), scores.tree, atol=1e-5)
    assert rt.score(np.empty((0, N_FEATURES))).fraud.shape == (0,)


def test_non_finite_features_are_missing_and_counted(ref: ModelRef, data: tuple) -> None:
    rt = ModelRuntime(ref, device="cpu")
    x = data[1].to_numpy()[:10].copy()
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    x_inf = x.copy()
    x_inf[0, 0] = np.inf
    a, b = rt.score(x_nan), rt.score(x_inf)
    assert np.all(np.isfinite(a.fraud)) and np.all(np.isfinite(a.anomaly))
    np.testing.assert_array_equal(a.fraud, b.fraud)  # inf is treated as missing, like NaN
    assert rt.non_finite_rows == 2
    with pytest.raises(ValueError, match="feature matrix"):
        rt.score(x[:, :5])


def test_registry_refuses_tampered_missing_and_foreign_models(ref: ModelRef,
                                                             tmp_path: Path) -> None:
    assert resolve(ref.path.parent).version == ref.version  # LATEST
    assert resolve(ref.path.parent, "latest").version == ref.version
    with pytest.raises(ModelNotFound, match=ref.version):  # lists the known versions
        resolve(ref.path.parent, "fs-000000000000")

    tampered = tmp_path / "tampered"
    shutil.copytree(ref.path, tampered)
    with (tampered / "tree.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelCorrupt, match=r"tree\.onnx does not match its checksum"):
        resolve(tampered)
    (tampered / "tree.onnx").unlink()
    with pytest.raises(ModelCorrupt, match=r"tree\.onnx is missing"):
        resolve(tampered)

    foreign = tmp_path / "foreign"
    shutil.copytree(ref.path, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["features"] = manifest["features"][:-1]
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelCorrupt, match=f"trained on {N_FEATURES - 1} features"):
        resolve(foreign)
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(ModelCorrupt, match="unreadable"):
        resolve(foreign)


def test_corrupt_onnx_is_refused_at_load(ref: ModelRef, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(ref.path, broken)
    (broken / "tree.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelCorrupt, match=r"tree\.onnx"):
        ModelRuntime(resolve(broken, verify=False), device="cpu", tree_backend="onnx")


def test_watcher_switches_to_a_new_version_and_skips_a_broken_one(
        ref: ModelRef, ensemble: Ensemble, data: tuple, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(ref.path.parent, registry)
    current = ModelRuntime(resolve(registry), device="cpu")
    watcher = ModelWatcher(registry, current, interval_s=0.0)
    assert watcher.poll() is None  # LATEST is the running version
    # a second version: same trees, other thresholds (a different content hash)
    other = Ensemble(ensemble.tree, ensemble.neural, ensemble.blend_weight,
                     {**ensemble.thresholds, "review": 0.5, "block": 0.6}, ensemble.metrics,
                     ensemble.valid_scores)
    new_ref = save(other, registry, {"test": 2}, data[1].to_numpy()[:200],
                   compile_timeout_s=0)  # no compiling: the ONNX fallback serves it
    assert new_ref.version != ref.version
    time.sleep(0.01)
    swapped = watcher.poll()
    assert swapped is not None and swapped.version == new_ref.version
    (registry / "LATEST").write_text("fs-doesnotexist\n")
    assert watcher.poll() is None and watcher.current.version == new_ref.version


def test_service_scorer_loads_the_explainer_before_any_batch(
        ref: ModelRef, ensemble: Ensemble, data: tuple, tmp_path: Path) -> None:
    """The first alert must not wait seconds for lightgbm's import, nor the first alert of
    a version loaded while running."""
    from app import factory
    from app.config import load_settings

    registry = tmp_path / "registry"
    shutil.copytree(ref.path.parent, registry)
    settings = load_settings(model_reload_s=0.001, model_device="cpu",
                             redis_namespace="explainer-test", audit_scope="off")
    scorer = factory.build_scorer(settings, fakeredis.FakeRedis(), resolve(registry),
                                  random_key(), random_key(), follow=registry)
    assert scorer.model._booster is not None
    other = Ensemble(ensemble.tree, ensemble.neural, ensemble.blend_weight,
                     {**ensemble.thresholds, "review": 0.4}, ensemble.metrics,
                     ensemble.valid_scores)
    new_ref = save(other, registry, {"test": 3}, data[1].to_numpy()[:200], compile_timeout_s=0)
    time.sleep(0.01)
    assert scorer.maybe_reload() and scorer.model.version == new_ref.version
    assert scorer.model._booster is not None


def test_scorer_records_shadow_scores_and_reloads(ref: ModelRef, data: tuple) -> None:
    tx = data[0].iloc[:300]
    values = transactions_to_json(tx)
    records = [InputRecord(v, None, "transactions", 0, i) for i, v in enumerate(values)]
    runtime = ModelRuntime(ref, device="cpu")
    scorer = Scorer(
        store=RedisFeatureStore(fakeredis.FakeRedis()), model=runtime,
        tokenizer=Tokenizer(random_key()), cipher=FieldCipher({"k": random_key()}, "k"),
        policy=Policy.from_manifest(ref.manifest), topics=Topics(),
        shadow=ModelRuntime(ref, device="cpu", tree_backend="onnx"),
    )
    result = scorer.process(records)
    scores = [ScoreRecord.model_validate_json(o.value) for o in result.outputs
              if o.topic == "scores"]
    assert len(scores) == 300
    assert all(s.shadow_model_version == ref.version for s in scores)
    np.testing.assert_allclose([s.shadow_fraud_score for s in scores],
                               [s.fraud_score for s in scores], atol=1e-5)
    assert all(s.anomaly_score is not None for s in scores)


def test_policy_rules_thresholds_and_overrides() -> None:
    policy = Policy(0.5, 0.9, anomaly_review_threshold=0.99, amount_limit=1000.0,
                    blocked_terminals=frozenset({"T9"}))
    fraud = np.array([0.1, 0.6, 0.95, 0.1, 0.1, 0.1])
    anomaly = np.array([0.0, 0.0, 0.0, 0.995, 0.0, 0.0])
    amounts = np.array([10.0, 10.0, 10.0, 10.0, 5000.0, 10.0])
    decisions, rules = policy.decide(fraud, anomaly, amounts, ["a", "b", "c", "d", "e", "T9"])
    assert decisions.tolist() == ["allow", "review", "block", "review", "block", "block"]
    assert rules == [None, None, None, "rule:anomaly", RULE_AMOUNT, RULE_TERMINAL]

    manifest = {"thresholds": {"review": 0.3, "block": 0.8, "anomaly_review": None}}
    assert Policy.from_manifest(manifest).review_threshold == 0.3
    assert Policy.from_manifest(manifest, review_threshold=0.4,
                                block_threshold=None).review_threshold == 0.4
    with pytest.raises(ValueError, match="below the review"):
        Policy.from_manifest(manifest, block_threshold=0.1)


def test_budget_and_precision_thresholds() -> None:
    day = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    card = np.array(["a", "a", "b", "c", "a", "b", "c", "d"])
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.6, 0.5, 0.4, 0.3])
    t = budget_threshold(day, card, score, cards_per_day=2)
    per_day_cards = {d: {c for dd, c, s in zip(day, card, score, strict=True)
                         if dd == d and s >= t} for d in (0, 1)}
    assert sum(len(v) for v in per_day_cards.values()) <= 4
    assert t <= 0.5 + 1e-9  # the 4 highest distinct card-days are flagged
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0] * 5)
    s = np.linspace(1, 0, 40)
    assert precision_threshold(y, s, 0.75, min_alerts=4) is not None
    assert precision_threshold(np.zeros(10), np.linspace(1, 0, 10), 0.5) is None


def test_calibration_is_monotone_and_bounded() -> None:
    q = np.quantile(np.random.default_rng(0).exponential(size=5000), np.linspace(0, 1, 1001))
    errors = np.array([-1.0, 0.0, 0.5, 1.0, 5.0, 1e9, np.nan])
    a = calibrate(errors, q)
    assert np.all(np.diff(a[:-1]) >= 0) and a[0] == 0.0 and a[-2] == 1.0
    assert a[-1] == 1.0  # an error that cannot be computed is treated as most anomalous


def test_training_on_another_column_list_names_and_bins_those_columns() -> None:
    """Offline studies (scripts/handbook_quality.py) train on their own columns: the model
    must carry those names and give the fine amount bins to `amount` wherever it sits."""
    from models.train import AMOUNT_BINS, train_lightgbm

    rng = np.random.default_rng(3)
    n = 4_000
    ts = pd.Series(pd.date_range("2018-07-01", periods=n, freq="5min", tz="UTC"))
    frame = pd.DataFrame({"ratio": rng.gamma(2.0, 1.0, n), "amount": rng.gamma(2.0, 50.0, n)})
    y = ((frame["amount"] > 220) | (rng.random(n) < 0.01)).to_numpy().astype(np.int32)
    cfg = TrainConfig(n_estimators=30, search=False, delay_days=1.0,
                      feature_names=("ratio", "amount"))
    model = train_lightgbm(frame, y, ts, cfg)
    assert model.booster.feature_name() == ["ratio", "amount"]
    assert model.params["max_bin_by_feature"] == [255, AMOUNT_BINS]
    p = model.booster.predict(frame[["ratio", "amount"]].to_numpy(np.float32))
    amount = frame["amount"].to_numpy()
    assert p[amount > 300].min() > p[amount < 150].max()
