"""The Grafana dashboard is valid, importable JSON and queries only metrics the service has.

A renamed metric or label in app/metrics.py would otherwise leave a silently empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from app import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grafana-fraudscore.json"
# labels Prometheus adds to every scraped series, and the histogram bucket bound
TARGET_LABELS = {"job", "instance"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
REQUIRED = (  # the issue's panels, by the metric each one needs
    "fraudscore_events_total", "fraudscore_batch_size_bucket", "fraudscore_stage_seconds_bucket",
    "fraudscore_end_to_end_seconds_bucket", "fraudscore_consumer_lag",
    "fraudscore_kafka_transactions_total", "fraudscore_fraud_score_bucket",
    "fraudscore_score_psi", "fraudscore_ready", "fraudscore_fail_open_events_total",
    "fraudscore_producer_restarts_total",
)


def _exposed() -> dict[str, set[str]]:
    """Every series name app.metrics exposes → its label names."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        (family,) = value.describe()
        labels = set(value._labelnames)  # prometheus_client has no public accessor
        for suffix in SUFFIXES[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def test_importable_in_grafana_10(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"] and dashboard["id"] is None
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys()
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_datasource_is_a_template_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in _panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_every_queried_metric_and_label_exists(dashboard: dict[str, Any]) -> None:
    exposed = _exposed()
    for expr in _exprs(dashboard):
        names = set(re.findall(r"\bfraudscore_\w+", expr))
        assert names, expr
        unknown = names - exposed.keys()
        assert not unknown, f"{expr}: not in app/metrics.py: {unknown}"
        known = set().union(*(exposed[n] for n in names)) | TARGET_LABELS
        for name, matchers in re.findall(r"(fraudscore_\w+)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert used <= exposed[name] | TARGET_LABELS, f"{expr}: {used - exposed[name]}"
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            used = {label.strip() for label in group.split(",")}
            assert used <= known, f"{expr}: grouped by unknown labels {used - known}"


def test_the_issues_panels_are_there(dashboard: dict[str, Any]) -> None:
    text = "\n".join(_exprs(dashboard))
    missing = [m for m in REQUIRED if m not in text]
    assert not missing
