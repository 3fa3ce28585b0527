"""`fraudscore replay` from files: outputs, privacy, equality with the file engine, bad input,
and the HTML report opened in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from app import replay
from app.cli import app
from app.simulator import simulate
from app.sources import write_frame, write_labels
from features.definitions import N_FEATURES
from features.offline import compute_features
from models.ensemble import train_ensemble
from models.registry import save
from models.train import TrainConfig

runner = CliRunner()
START = datetime(2026, 1, 1, tzinfo=UTC)
RANGE = ("2026-02-02", "2026-02-08")  # the last week of the simulated 40 days
TOKEN_KEY = base64.b64encode(b"k" * 32).decode()
AUDIT_KEY = base64.b64encode(b"a" * 32).decode()
AUDIT_FILE = Path(tempfile.mkdtemp(prefix="fraudscore-replay-audit-")) / "audit.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("replay-data")
    tx, labels = simulate(customers=250, terminals=500, days=40, seed=5, start=START)
    write_frame(tx, folder / "tx.jsonl")
    write_labels(labels, folder / "labels.jsonl")
    return {"folder": folder, "tx": tx, "labels": labels, "file": folder / "tx.jsonl",
            "labels_file": folder / "labels.jsonl"}


def _train(tx: pd.DataFrame, labels: pd.DataFrame, features: pd.DataFrame, registry: Path,
           first: str, last: str) -> str:
    """A small real model on one window (no search, no MLP, no native compile: fast)."""
    stamps = tx["timestamp"]
    window = ((stamps >= pd.Timestamp(first, tz="UTC"))
              & (stamps < pd.Timestamp(last, tz="UTC"))).to_numpy()
    ens = train_ensemble(features[window], labels["is_fraud"].to_numpy()[window],
                         stamps[window], tx["customer_id"].to_numpy()[window],
                         TrainConfig(n_estimators=40, search=False), with_neural=False)
    ref = save(ens, registry, {"start": first, "end": last}, features[window].to_numpy()[:500],
               compile_timeout_s=0)
    return ref.version


@pytest.fixture(scope="module")
def models(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tx, labels = data["tx"], data["labels"]
    features = compute_features(tx, labels)
    registry = tmp_path_factory.mktemp("replay-registry")
    a = _train(tx, labels, features, registry, "2026-01-08", "2026-01-25")
    b = _train(tx, labels, features, registry, "2026-01-15", "2026-02-01")
    assert a != b
    return {"registry": registry, "a": a, "b": b}


def _replay(args: list[str], env: dict[str, str] | None = None):
    return runner.invoke(app, ["replay", "--no-progress", *args],
                         env={"FRAUDSCORE_TOKEN_KEY": TOKEN_KEY, "FRAUDSCORE_AUDIT_KEY": AUDIT_KEY,
                              "FRAUDSCORE_AUDIT_FILE": str(AUDIT_FILE), **(env or {})})


@pytest.fixture(scope="module")
def replayed(data: dict, models: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("replay-out") / "aug"
    result = _replay(["--from", RANGE[0], "--to", RANGE[1], "--source", str(data["file"]),
                      "--labels", str(data["labels_file"]), "--model", str(models["registry"]),
                      "--model-version", models["a"], "--compare-version", models["b"],
                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _leftovers(out: Path) -> list[str]:
    """Anything the replay left beside its output folder (temporary folders)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---- outputs -------------------------------------------------------------------------------


def test_replay_writes_scores_changes_metrics_and_report(replayed: Path, data: dict,
                                                         models: dict) -> None:
    assert {p.name for p in replayed.iterdir()} == {
        "scored.parquet", "changes.parquet", "metrics.json", "summary.json", "report.html"}
    assert _leftovers(replayed) == []
    tx = data["tx"]
    lo, hi = pd.Timestamp(RANGE[0], tz="UTC"), pd.Timestamp(RANGE[1], tz="UTC") + \
        pd.Timedelta(days=1)
    expected = tx[(tx["timestamp"] >= lo) & (tx["timestamp"] < hi)]
    scored = pq.read_table(replayed / "scored.parquet").to_pandas()
    assert len(scored) == len(expected) > 1000
    assert set(scored["transaction_id"]) == set(expected["transaction_id"])
    assert {"customer_token", "card_masked", "terminal_id", "amount", "score_a", "decision_a",
            "score_b", "decision_b", "is_fraud"} <= set(scored.columns)
    assert scored["is_fraud"].notna().all() and scored["is_fraud"].any()

    summary = json.loads((replayed / "summary.json").read_text())
    for m, key in zip(summary["models"], ("a", "b"), strict=True):
        assert m["version"] == models[key]
        s, d = scored[f"score_{key}"], scored[f"decision_{key}"]
        assert ((s >= m["block_threshold"]) == (d == "block")).all()
        assert (d[s < m["review_threshold"]] == "allow").all() or m["anomaly_review_threshold"]

    changes = pq.read_table(replayed / "changes.parquet").to_pandas()
    differ = scored[scored["decision_a"] != scored["decision_b"]]
    assert set(changes["transaction_id"]) == set(differ["transaction_id"])
    assert len(changes) == summary["changed"] > 0
    first = changes.iloc[0]
    assert len(first["reasons_a"]) == 3 and len(first["reasons_b"]) == 3
    assert {"feature", "value", "contribution"} <= set(first["reasons_b"][0])

    metrics = json.loads((replayed / "metrics.json").read_text())
    for key in ("A", "B"):
        assert 0.5 < metrics[key]["auc_roc"] <= 1
        assert 0 <= metrics[key]["card_precision_at_100"] <= 1
        assert 0 <= metrics[key]["precision_at_budget"] <= 1
        assert metrics[key]["alerts"] == int((scored[f"decision_{key.lower()}"] != "allow")
                                             .sum())


def test_replay_outputs_hold_no_card_number_or_customer_id(replayed: Path, data: dict) -> None:
    tx = data["tx"]
    blob = b"".join(p.read_bytes() for p in replayed.iterdir())
    scored = pq.read_table(replayed / "scored.parquet").to_pandas()
    blob += "\n".join(scored.astype(str).to_numpy().ravel()).encode()  # decompressed text
    pans = tx["card_number"].dropna().unique()
    assert len(pans) > 100
    assert not [p for p in pans if p.encode() in blob]
    masked = scored["card_masked"].dropna()
    assert len(masked) and masked.str.match(r"^\*+\d{4}$").all()
    ids = [f'"{c}"'.encode() for c in tx["customer_id"].unique()]
    assert not [c for c in ids if c in blob]


def test_every_replay_is_audited_in_a_verifiable_chain(replayed: Path) -> None:
    records = [json.loads(line) for line in AUDIT_FILE.read_text().splitlines()]
    mine = [r for r in records if r["action"] == "replay" and r["outcome"] == "success"]
    assert mine and mine[0]["object_id"].startswith(RANGE[0]) and mine[0]["actor"]
    result = runner.invoke(app, ["audit", "verify", "--file", str(AUDIT_FILE)],
                           env={"FRAUDSCORE_AUDIT_KEY": AUDIT_KEY})
    assert result.exit_code == 0, result.output


def test_drift_uses_the_training_deciles_and_scores_psi(replayed: Path) -> None:
    summary = json.loads((replayed / "summary.json").read_text())
    for m in summary["models"]:
        assert m["drift_reference"].startswith("training sample")
        assert m["score_psi"] is not None and m["score_psi"] >= 0
    assert set(summary["drift"]["A"]) == set(summary["drift"]["B"])
    assert len(summary["drift"]["A"]) == N_FEATURES


def test_replay_equals_the_file_engine(data: dict, models: dict, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same events through the live pipeline (file engine, in-process Redis) and through
    the replay: identical scores and decisions."""
    tx = data["tx"]
    first = tx[tx["timestamp"] < pd.Timestamp("2026-01-09", tz="UTC")]
    source = tmp_path / "first-week.jsonl"
    write_frame(first, source)
    pii = base64.b64encode(os.urandom(32)).decode()
    env = {"FRAUDSCORE_TOKEN_KEY": TOKEN_KEY, "FRAUDSCORE_PII_KEY": pii,
           "FRAUDSCORE_AUDIT_SCOPE": "off"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = str(models["registry"] / models["a"])
    live = tmp_path / "live"
    result = runner.invoke(app, ["run", "--engine", "file", "--model", model, "--input",
                                 str(source), "--out", str(live)])
    assert result.exit_code == 0, result.output
    scores = pd.DataFrame([json.loads(line) for line in
                           (live / "scores.jsonl").read_text().splitlines()])
    out = tmp_path / "replay"
    result = _replay(["--from", "2026-01-01", "--to", "2026-01-08", "--source", str(source),
                      "--model", model, "--out", str(out)])
    assert result.exit_code == 0, result.output
    again = pq.read_table(out / "scored.parquet").to_pandas().set_index("transaction_id")
    live_scores = scores.set_index("transaction_id").loc[again.index]
    assert len(again) == len(first)
    np.testing.assert_array_equal(again["score_a"].to_numpy(),
                                  live_scores["fraud_score"].to_numpy())
    assert (again["decision_a"] == live_scores["decision"]).all()
    assert (again["customer_token"] == live_scores["customer_token"]).all()


# ---- bad input -----------------------------------------------------------------------------


def _refused(out: Path, result, needle: str) -> None:
    assert result.exit_code != 0, result.output
    assert needle in " ".join(result.output.split()), result.output
    assert not out.exists() and _leftovers(out) == []


def test_empty_range_is_refused(data: dict, models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", "2025-06-01", "--to", "2025-06-03", "--source",
                      str(data["file"]), "--model", str(models["registry"]), "--out", str(out)])
    _refused(out, result, "no transactions between")


def test_unknown_model_version_is_refused(data: dict, models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", RANGE[0], "--to", RANGE[1], "--source", str(data["file"]),
                      "--model", str(models["registry"]), "--compare-version", "fs-nope",
                      "--out", str(out)])
    _refused(out, result, "no model at")
    assert models["a"] in result.output  # the known versions are listed


def test_range_in_the_future_is_refused(data: dict, models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    soon = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%d")
    result = _replay(["--from", soon, "--to", soon, "--source", str(data["file"]),
                      "--model", str(models["registry"]), "--out", str(out)])
    _refused(out, result, "in the future")


def test_missing_file_is_refused(models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", RANGE[0], "--to", RANGE[1], "--source",
                      str(tmp_path / "nope.parquet"), "--model", str(models["registry"]),
                      "--out", str(out)])
    _refused(out, result, "no such file")


def test_missing_labels_file_is_refused(data: dict, models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", RANGE[0], "--to", RANGE[1], "--source", str(data["file"]),
                      "--labels", str(tmp_path / "labels.jsonl"),
                      "--model", str(models["registry"]), "--out", str(out)])
    _refused(out, result, "no such file")


def test_end_before_start_is_refused(data: dict, models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", "2026-02-05", "--to", "2026-02-01T00:00:00Z", "--source",
                      str(data["file"]), "--model", str(models["registry"]), "--out", str(out)])
    _refused(out, result, "is not after --from")


def test_unparsable_time_is_refused(data: dict, models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", "last tuesday", "--to", RANGE[1], "--source",
                      str(data["file"]), "--model", str(models["registry"]), "--out", str(out)])
    _refused(out, result, "neither a date")


def test_unreachable_kafka_is_refused(models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _replay(["--from", RANGE[0], "--to", RANGE[1], "--model", str(models["registry"]),
                      "--out", str(out)], env={"FRAUDSCORE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    _refused(out, result, "did not answer")


def test_a_folder_that_is_not_a_replay_is_never_replaced(data: dict, models: dict,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("keep me")
    result = _replay(["--from", RANGE[0], "--to", RANGE[1], "--source", str(data["file"]),
                      "--model", str(models["registry"]), "--out", str(out)])
    assert result.exit_code == 2 and "not an earlier replay" in " ".join(result.output.split())
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]


def test_a_failure_while_writing_leaves_the_earlier_replay_intact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / replay.MARKER).write_text("{}")
    with pytest.raises(RuntimeError), replay.staging(out) as folder:
        (folder / "scored.parquet").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert [p.name for p in out.iterdir()] == [replay.MARKER]
    assert _leftovers(out) == []
    with replay.staging(out) as folder:
        (folder / "new.txt").write_text("ok")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and _leftovers(out) == []


# ---- pieces --------------------------------------------------------------------------------


def test_parse_time_reads_dates_as_whole_days() -> None:
    assert replay.parse_time("2018-08-01", "--from") == datetime(2018, 8, 1, tzinfo=UTC)
    assert replay.parse_time("2018-08-31", "--to", end=True) == datetime(2018, 9, 1, tzinfo=UTC)
    assert replay.parse_time("2018-08-31T12:00:00+02:00", "--to", end=True) == \
        datetime(2018, 8, 31, 10, tzinfo=UTC)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=20_000)
    same = replay.psi(rng.normal(size=20_000), *replay.bins_from_data(ref))
    shifted = replay.psi(rng.normal(1.0, size=20_000), *replay.bins_from_data(ref))
    assert same < 0.01 < 0.25 < shifted
    q = np.quantile(ref, np.linspace(0, 1, 11))
    assert replay.psi(rng.normal(size=20_000), *replay.bins_from_quantiles(q)) < 0.02


def test_quantile_bins_keep_point_masses() -> None:
    # a binary feature that is 1 on 30 % of rows: deciles 0×8, then 1×3
    edges, expected = replay.bins_from_quantiles([0.0] * 8 + [1.0] * 3)
    assert edges.tolist() == [0.0, 1.0]
    assert np.allclose(expected, [0.7, 0.3, 0.0])
    assert replay.psi(np.r_[np.zeros(700), np.ones(300)], edges, expected) < 1e-9


def test_masked_cards_show_only_the_last_four_digits() -> None:
    assert replay.masked_cards(pd.Series(["4111111111111111", None])) == \
        ["************1111", None]


# ---- the report in a real browser ----------------------------------------------------------


class _Plots(HTMLParser):
    """Collects each <svg id=...> and the `d` of the paths inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, list[str]] = {}
        self.root: dict[str, str | None] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "html":
            self.root = a
        elif tag == "main":
            self.root["plots"] = a.get("data-plots")
        elif tag == "svg" and a.get("id"):
            self._current = a["id"]
            self.svgs[self._current] = []
        elif tag == "path" and self._current is not None:
            self.svgs[self._current].append(a.get("d") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._current = None


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (apt-get install chromium; .ci/run does)")
def test_report_loads_in_headless_chromium_and_draws_every_plot(replayed: Path,
                                                                tmp_path: Path) -> None:
    report = replayed / "report.html"
    proc = subprocess.run(
        ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", report.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # no JS error, no blocked (network) load, no log at all
    dom = _Plots()
    dom.feed(proc.stdout)
    assert dom.root.get("data-ready") == "1"  # the inline script ran to its end
    expected = (dom.root.get("plots") or "").split()
    assert expected == ["plot-scores", "plot-pr", "plot-alerts", "plot-drift"]
    for plot in expected:
        paths = dom.svgs.get(plot)
        assert paths, f"{plot}: no SVG with paths in the rendered page"
        assert all(d.startswith("M") and len(d) > 3 for d in paths), plot
    assert "reasons A" in proc.stdout and "Card Precision@100" in proc.stdout
