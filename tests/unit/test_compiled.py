"""The compiled tree model: exact against LightGBM, NaN as LightGBM, loud on bad artifacts."""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from models.bench import bench_models
from models.compiled import (
    CompiledModel,
    CompiledModelError,
    OnnxTreeModel,
    compile_booster,
    load_compiled,
    load_scorer,
)
from models.export import lightgbm_to_onnx
from models.forest import probe_rows, read_forest
from tests.unit.tree_models import N_FEATURES, small_booster

EXACT = 1e-12


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    return small_booster()


@pytest.fixture(scope="module", params=["lleaves", "tl2cgen"])
def compiled(request: pytest.FixtureRequest, booster: lgb.Booster,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp(request.param)
    entry = compile_booster(booster.model_to_string(), out, timeout_s=120,
                            backend=request.param)
    assert entry is not None, f"{request.param} did not compile"
    return out, entry


def test_manifest_entry_and_parity(compiled: tuple[Path, dict[str, Any]]) -> None:
    out, entry = compiled
    assert entry["parity_max_abs_diff"] <= EXACT
    assert (out / entry["library"]).is_file()
    assert entry["n_features"] == N_FEATURES and entry["compile_s"] > 0
    assert [p.name for p in out.iterdir()] == [entry["library"]]  # no build leftovers


@pytest.mark.parametrize("n", [1, 3, 64, 65, 1000])
def test_predict_matches_lightgbm(compiled: tuple[Path, dict[str, Any]],
                                  booster: lgb.Booster, n: int) -> None:
    model = load_compiled(*compiled, N_FEATURES)
    x = probe_rows(read_forest(booster), n, seed=n)
    for xs in (x, x.astype(np.float64)):
        got = model.predict(xs)
        assert got.dtype == np.float64 and got.shape == (n,)
        np.testing.assert_allclose(got, booster.predict(xs), rtol=0, atol=EXACT)


def test_nan_follows_lightgbm_missing_rule(compiled: tuple[Path, dict[str, Any]],
                                           booster: lgb.Booster) -> None:
    """NaN in a feature never missing in training scores as 0.0; elsewhere default side."""
    model = load_compiled(*compiled, N_FEATURES)
    rows = np.random.default_rng(0).normal(size=(200, N_FEATURES))
    with_nan = rows.copy()
    with_nan[:, 0] = np.nan
    as_zero = rows.copy()
    as_zero[:, 0] = 0.0
    np.testing.assert_array_equal(model.predict(with_nan), model.predict(as_zero))
    with_nan[:, 3] = np.nan
    np.testing.assert_allclose(model.predict(with_nan), booster.predict(with_nan), atol=EXACT)
    extremes = rows.copy()
    extremes[::2, 1], extremes[1::2, 2] = np.inf, -np.inf
    np.testing.assert_allclose(model.predict(extremes), booster.predict(extremes), atol=EXACT)


def test_input_forms(compiled: tuple[Path, dict[str, Any]], booster: lgb.Booster) -> None:
    model = load_compiled(*compiled, N_FEATURES)
    wide = np.random.default_rng(1).normal(size=(300, 2 * N_FEATURES))
    strided = wide[:, ::2]  # not C-contiguous
    np.testing.assert_allclose(model.predict(strided), booster.predict(strided), atol=EXACT)
    ints = np.arange(10 * N_FEATURES).reshape(10, N_FEATURES) % 3 - 1
    np.testing.assert_allclose(model.predict(ints), booster.predict(ints.astype(float)),
                               atol=EXACT)
    assert model.predict(np.empty((0, N_FEATURES))).shape == (0,)


def test_threads_can_share_a_model(compiled: tuple[Path, dict[str, Any]],
                                   booster: lgb.Booster) -> None:
    model = load_compiled(*compiled, N_FEATURES)
    rows = probe_rows(read_forest(booster), 400, seed=9)
    expected = booster.predict(rows)

    def score(offset: int) -> bool:
        order = np.roll(np.arange(len(rows)), offset)
        got = np.concatenate([model.predict(rows[i:i + 1]) for i in order])
        return bool(np.allclose(got, expected[order], rtol=0, atol=EXACT))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(score, [0, 100, 200, 300]))


def test_wrong_width_is_an_error(compiled: tuple[Path, dict[str, Any]]) -> None:
    model = load_compiled(*compiled, N_FEATURES)
    with pytest.raises(ValueError, match="6 features"):
        model.predict(np.zeros((2, N_FEATURES + 1)))
    with pytest.raises(ValueError, match="6 features"):
        model.predict(np.zeros(N_FEATURES))


def _copy(compiled: tuple[Path, dict[str, Any]], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    out, entry = compiled
    shutil.copy(out / entry["library"], tmp_path / entry["library"])
    return tmp_path, dict(entry)


def test_bad_artifacts_fail_at_load(compiled: tuple[Path, dict[str, Any]],
                                    tmp_path: Path) -> None:
    out, entry = _copy(compiled, tmp_path)
    lib = out / entry["library"]
    with pytest.raises(CompiledModelError, match="takes 6 features"):
        load_compiled(out, entry, N_FEATURES + 1)
    with pytest.raises(CompiledModelError, match="built for"):
        load_compiled(out, {**entry, "machine": "riscv128"}, N_FEATURES)
    with pytest.raises(CompiledModelError, match="incomplete"):
        load_compiled(out, {"library": entry["library"]}, N_FEATURES)
    lib.write_bytes(b"\x7fELF" + b"\0" * 200)  # truncated: not a library any more
    with pytest.raises(CompiledModelError, match="checksum"):
        load_compiled(out, entry, N_FEATURES)
    entry["sha256"] = hashlib.sha256(lib.read_bytes()).hexdigest()
    with pytest.raises(CompiledModelError, match="not a loadable library"):
        load_compiled(out, entry, N_FEATURES)
    lib.unlink()
    with pytest.raises(CompiledModelError, match="missing"):
        load_compiled(out, entry, N_FEATURES)


def test_timeout_returns_none_and_onnx_takes_over(booster: lgb.Booster, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    entry = compile_booster(booster.model_to_string(), tmp_path, timeout_s=0.05)
    assert entry is None
    assert "limit" in caplog.text
    assert list(tmp_path.iterdir()) == []  # the killed build left nothing behind
    onnx_bytes = lightgbm_to_onnx(booster).SerializeToString()
    scorer = load_scorer(tmp_path, entry, N_FEATURES, onnx_bytes)
    assert isinstance(scorer, OnnxTreeModel)
    x = probe_rows(read_forest(booster), 500)
    np.testing.assert_allclose(scorer.predict(x), booster.predict(x), atol=EXACT)


def test_load_scorer_prefers_compiled_and_falls_back_on_corruption(
        compiled: tuple[Path, dict[str, Any]], booster: lgb.Booster, tmp_path: Path) -> None:
    onnx_bytes = lightgbm_to_onnx(booster).SerializeToString()
    assert isinstance(load_scorer(*compiled, N_FEATURES, onnx_bytes), CompiledModel)
    out, entry = _copy(compiled, tmp_path)
    (out / entry["library"]).write_bytes(b"garbage")
    assert isinstance(load_scorer(out, entry, N_FEATURES, onnx_bytes), OnnxTreeModel)


def test_relative_output_folder(booster: lgb.Booster, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`fraudscore train --registry registry` passes a relative folder; gcc runs elsewhere."""
    monkeypatch.chdir(tmp_path)
    entry = compile_booster(booster.model_to_string(), Path("registry/v1/compiled"),
                            timeout_s=120)
    assert entry is not None
    assert (tmp_path / "registry/v1/compiled" / entry["library"]).is_file()


def test_unusable_inputs_to_compile(tmp_path: Path) -> None:
    assert compile_booster("not a model", tmp_path) is None
    with pytest.raises(ValueError, match="backend"):
        compile_booster("", tmp_path, backend="nvcc")


def test_bench_shape() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0, axes=[1])], "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    neural = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    neural.ir_version = 8
    onnx.checker.check_model(neural)
    result = bench_models(n_trees=5, num_leaves=7, n_features=4, batches=(1, 16),
                          seconds_per_case=0.03, neural_onnx=neural.SerializeToString(),
                          neural_reference=lambda x: x.astype(np.float32).sum(axis=1))
    assert set(result) == {"runtimes", "parity_max_abs_diff"}
    assert set(result["runtimes"]) == {"lightgbm", "onnx", "compiled", "neural_onnx"}
    for cases in result["runtimes"].values():
        assert set(cases) == {"1", "16"}
        for case in cases.values():
            assert set(case) == {"rows_per_s", "latency_us_p50", "latency_us_p99"}
            assert case["rows_per_s"] > 0
    parity = result["parity_max_abs_diff"]
    assert parity["lightgbm"] == 0.0 and parity["onnx"] <= EXACT
    assert parity["compiled"] <= EXACT and parity["neural_onnx"] <= 1e-5
