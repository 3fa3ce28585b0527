"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints of a worker.

Label values are fixed vocabularies (outcome, stage, topic, partition, model version):
never a card, customer, device or transaction id, so no personal data reaches metrics.
With ``--workers N`` each worker process serves its own port (base port + worker index),
which is how Prometheus scrapes multi-process Python services without shared files.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("fraudscore.metrics")

EVENTS = Counter("fraudscore_events_total", "Input events by outcome",
                 ["outcome"])  # scored | alerted | dead_letter | label
BATCH_SIZE = Histogram("fraudscore_batch_size", "Records per processed batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000))
STAGE_SECONDS = Histogram("fraudscore_stage_seconds", "Time per batch in each pipeline stage",
                          ["stage"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1,
                                              .25, .5, 1, 2.5))
END_TO_END_SECONDS = Histogram(
    "fraudscore_end_to_end_seconds", "Event time to outputs committed",
    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
CONSUMER_LAG = Gauge("fraudscore_consumer_lag", "Messages behind the partition's end",
                     ["topic", "partition"])
TRANSACTIONS = Counter("fraudscore_kafka_transactions_total", "Kafka transactions by result",
                       ["result"])  # commit | abort
RETRIES = Counter("fraudscore_batch_retries_total", "Batches rewound and retried, by cause",
                  ["cause"])  # feature_store | kafka
FAIL_OPEN = Counter("fraudscore_fail_open_events_total",
                    "Events scored with default features because Redis was unavailable")
SCORES = Histogram("fraudscore_fraud_score", "Fraud score distribution",
                   buckets=tuple(np.round(np.linspace(0.05, 1.0, 20), 2)))
SCORE_PSI = Gauge("fraudscore_score_psi",
                  "Population stability index of recent fraud scores vs the model's "
                  "validation scores (> 0.2: investigate)")
NON_FINITE = Counter("fraudscore_non_finite_feature_rows_total",
                     "Rows scored with a NaN/inf feature (treated as missing)")
READY = Gauge("fraudscore_ready", "1 when the worker can score (Redis and Kafka reachable)")
MODEL_INFO = Gauge("fraudscore_model_info", "The model version being served",
                   ["version", "tree_backend", "device"])
PRODUCER_RESTARTS = Counter("fraudscore_producer_restarts_total",
                            "Transactional producers recreated after a fatal error")


def psi(reference_quantiles: list[float], recent: np.ndarray) -> float:
    """PSI of `recent` against the reference distribution given by its quantiles
    (q0, q10, …, q100), binned at the reference's inner quantiles."""
    q = np.asarray(reference_quantiles, dtype=np.float64)
    edges = np.unique(q[1:-1])
    if len(recent) == 0 or len(edges) == 0:
        return 0.0
    levels = np.linspace(0.0, 1.0, len(q))
    cdf = np.array([levels[np.flatnonzero(q <= e)[-1]] for e in edges])  # right-continuous
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    counts = np.bincount(np.searchsorted(edges, recent, side="right"),
                         minlength=len(edges) + 1)
    actual = counts / counts.sum()
    e = np.clip(expected, 1e-4, None)
    a = np.clip(actual, 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))


class ScoreDrift:
    """Keeps the last `window` scores and updates the PSI gauge every `every` events."""

    def __init__(self, reference_quantiles: list[float], window: int = 20_000,
                 every: int = 5_000) -> None:
        self.reference = reference_quantiles
        self.recent: deque[np.ndarray] = deque()
        self.window, self.every = window, every
        self._n, self._since = 0, 0

    def observe(self, scores: np.ndarray) -> None:
        if len(scores) == 0 or not self.reference:
            return
        self.recent.append(scores)
        self._n += len(scores)
        self._since += len(scores)
        while self._n - len(self.recent[0]) >= self.window:
            self._n -= len(self.recent.popleft())
        if self._since >= self.every:
            self._since = 0
            SCORE_PSI.set(psi(self.reference, np.concatenate(list(self.recent))))


def observe_scores(scores: np.ndarray) -> None:
    """One histogram update per bucket, not per event."""
    if len(scores) == 0:
        return
    bounds = list(SCORES._upper_bounds)
    counts = np.bincount(np.searchsorted(np.asarray(bounds[:-1]), scores, side="left"),
                         minlength=len(bounds))
    hist = SCORES
    # prometheus_client has no bulk observe; replay the counts into the buckets it keeps
    for i, c in enumerate(counts):
        if c:
            hist._buckets[i].inc(int(c))
    hist._sum.inc(float(np.sum(scores)))


def observe_batch(result: Any, n_labels: int) -> None:
    """A committed batch's outcomes, scores, fail-open count and end-to-end latency (the
    same for every engine). `result` is an `app.pipeline.BatchResult`."""
    EVENTS.labels("label").inc(n_labels)
    EVENTS.labels("dead_letter").inc(len(result.dead))
    EVENTS.labels("alerted").inc(result.n_alerts)
    EVENTS.labels("scored").inc(len(result.scores) - result.n_alerts)
    observe_scores(result.scores)
    if result.fail_open:
        FAIL_OPEN.inc(len(result.scores))
    if len(result.event_us):
        lag_s = time.time() - result.event_us / 1e6
        # one observation per event would be a Python loop; a batch's spread is small
        for q in np.quantile(lag_s, (0.0, 0.5, 1.0)):
            END_TO_END_SECONDS.observe(max(float(q), 0.0))


def update_lag_from_stats(stats_json: str) -> None:
    """librdkafka's statistics callback: per-partition consumer lag, no extra requests."""
    try:
        stats = json.loads(stats_json)
    except ValueError:
        return
    for topic, t in (stats.get("topics") or {}).items():
        for part, p in (t.get("partitions") or {}).items():
            lag = p.get("consumer_lag", -1)
            if part != "-1" and lag is not None and lag >= 0:
                CONSUMER_LAG.labels(topic, part).set(lag)


class _Handler(BaseHTTPRequestHandler):
    ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (True, "ok"))

    def do_GET(self) -> None:
        if self.path == "/metrics":
            body, ctype, code = generate_latest(), CONTENT_TYPE_LATEST, 200
        elif self.path == "/healthz":
            body, ctype, code = b"ok\n", "text/plain", 200
        elif self.path == "/readyz":
            ok, why = type(self).ready()
            body, ctype, code = (why + "\n").encode(), "text/plain", 200 if ok else 503
        else:
            body, ctype, code = b"not found\n", "text/plain", 404
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return  # scrapes every few seconds would drown the service's own logs


def serve(port: int, ready: Callable[[], tuple[bool, str]],
          host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the endpoints on a daemon thread; port 0 picks a free one (tests)."""
    handler = type("Handler", (_Handler,), {"ready": staticmethod(ready)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on :%d (/metrics, /healthz, /readyz)", server.server_address[1])
    return server
