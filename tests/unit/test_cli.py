"""The commands a user runs first: demo, simulate → train → run (file engine), schemas."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.sources import HANDBOOK_PATH

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
HANDBOOK = HANDBOOK_PATH


def keys_env() -> dict[str, str]:
    return {
        "FRAUDSCORE_TOKEN_KEY": base64.b64encode(os.urandom(32)).decode(),
        "FRAUDSCORE_PII_KEY": base64.b64encode(os.urandom(32)).decode(),
        "FRAUDSCORE_AUDIT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }


def test_demo_runs_without_servers(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--customers", "400", "--terminals", "800",
                                 "--days", "45", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "online = offline features" in result.output and "max |diff| 0.0" in result.output
    alerts = (tmp_path / "alerts.jsonl").read_text().splitlines()
    dlq = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    assert alerts and len(dlq) == 8
    assert all(d["error.reason"] for d in dlq)
    # the model it trained sits with its outputs, not in a temp folder of its own
    assert (tmp_path / "models" / "LATEST").is_file()


def test_simulate_train_run_file_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "tx.jsonl"
    result = runner.invoke(app, ["simulate", "--customers", "300", "--terminals", "600",
                                 "--days", "40", "--seed", "3", "--out", str(data)])
    assert result.exit_code == 0, result.output
    labels = tmp_path / "tx.labels.jsonl"
    assert data.exists() and labels.exists()
    registry = tmp_path / "registry"
    result = runner.invoke(app, ["train", str(data), "--labels", str(labels),
                                 "--train-start", "2026-01-08", "--train-end", "2026-02-05",
                                 "--registry", str(registry)])
    assert result.exit_code == 0, result.output
    version = (registry / "LATEST").read_text().strip()
    manifest = json.loads((registry / version / "manifest.json").read_text())
    assert manifest["parity_max_abs_diff"]["onnx"] < 1e-5
    assert manifest["parity_max_abs_diff"]["neural_onnx"] < 1e-5
    assert 0 < manifest["review_threshold"] <= manifest["block_threshold"] <= 1

    with data.open("ab") as fh:
        fh.write(b"this line is not json\n")
    for k, v in keys_env().items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--engine", "file", "--model", str(registry),
                                 "--input", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    n_in = len(data.read_bytes().splitlines())
    n_scores = len((out / "scores.jsonl").read_bytes().splitlines())
    n_dlq = len((out / "dlq.jsonl").read_bytes().splitlines())
    assert n_scores + n_dlq == n_in and n_dlq == 1


def test_run_refuses_missing_keys_and_models(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAUDSCORE_TOKEN_KEY", raising=False)
    result = runner.invoke(app, ["run", "--engine", "file", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no model" in result.output


def test_invalid_config_exits_2_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_BATCH_SIZE", "-3")
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2 and "FRAUDSCORE_BATCH_SIZE" in result.output


def test_train_rejects_reversed_window(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path / "x.parquet"), "--train-start",
                                 "2026-02-01", "--train-end", "2026-01-01"])
    assert result.exit_code == 2 and "before" in result.output


@pytest.mark.skipif(not HANDBOOK.exists(), reason="handbook data not present at ../shared")
def test_train_on_handbook_week(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(HANDBOOK), "--format", "handbook",
                                 "--train-start", "2018-07-11", "--train-end", "2018-07-31",
                                 "--registry", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / (tmp_path / "LATEST").read_text().strip()
                           / "manifest.json").read_text())
    assert manifest["metrics"]["valid_auc"] > 0.7


def test_schemas_check_passes() -> None:
    result = runner.invoke(app, ["schemas", "--check"])
    assert result.exit_code == 0, result.output


def _compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_available(), reason="docker CLI with the compose plugin absent")
def test_docker_compose_file_is_valid() -> None:
    env = {**os.environ, **keys_env()}
    result = subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("processes", ["1", "-2"])
def test_bench_features_refuses_fewer_than_two_processes(processes: str) -> None:
    result = runner.invoke(app, ["bench", "features", "--processes", processes])
    assert result.exit_code == 2
    assert "--processes must be 2 or more" in result.output
