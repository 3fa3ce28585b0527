"""The analyst replay tool: re-score a past time range with one model version, or two.

Steps (:func:`run_replay`):

1. check the request (range, models, output folder) before reading anything;
2. read the range's transactions, plus the history its features need (the longest window,
   30 days + the 7-day terminal delay, and a reference week for drift), from Kafka or a
   file; and every fraud label, since the label rates count all labels reported so far;
3. recompute point-in-time features offline (:func:`features.offline.compute_features`,
   bit-identical to the online store): nothing reads or writes live Redis state, and the
   Kafka consumer has a unique group, is assigned partitions by hand and never commits;
4. score with model A (and B), decide with each model's own policy;
5. explain the changed decisions (TreeSHAP, for those rows only), measure (when labels
   exist) and compare feature and score distributions with the training data (PSI);
6. write everything into a temporary folder beside ``--out``, then rename it into place,
   so a failed replay leaves nothing half-written.

Bad input raises :class:`ReplayError` with a message meant for the analyst.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from app import report, sources
from app.config import Settings
from app.pipeline import InputRecord, decode
from app.schemas import Label, Transaction
from app.security.tokens import KeyMaterialError, Tokenizer, equality_keys, load_key, random_key
from features.definitions import (
    CARD_WINDOWS_DAYS,
    FEATURE_NAMES,
    TERMINAL_DELAY_HOURS,
    TERMINAL_WINDOWS_DAYS,
)
from features.offline import compute_features, first_labels
from models.evaluate import average_precision, card_precision_at_k, utc_days
from models.metrics import roc_auc
from models.policy import Policy
from models.registry import ModelError, resolve
from models.runtime import ModelRuntime

# Every window a feature reads, so the first replayed event sees a full history.
LOOKBACK = timedelta(days=max(*CARD_WINDOWS_DAYS, *TERMINAL_WINDOWS_DAYS),
                     hours=TERMINAL_DELAY_HOURS)
REFERENCE = timedelta(days=7)  # drift baseline when the manifest has no feature quantiles
KAFKA_GRACE = timedelta(hours=1)  # tolerated gap between an event's time and its record's
KAFKA_TIMEOUT_S = 10.0
KAFKA_IDLE_S = 30.0
SCORE_CHUNK = 65_536
N_REASONS = 3
CP_K = 100
MARKER = "summary.json"  # a folder holding this is a replay's output and may be replaced
LABEL_FIELDS = ("transaction_id", "customer_id", "terminal_id", "timestamp", "is_fraud",
                "reported_at")
Row = tuple[tuple[Any, ...], int, int]  # a decoded record's fields, partition, offset


class ReplayError(ValueError):
    """Bad input or an unreachable source; the message tells the analyst what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """A model folder, or a registry with an optional version (default: its LATEST)."""

    path: Path
    version: str | None = None


@dataclass(frozen=True)
class ReplayRequest:
    start: datetime  # inclusive, UTC-aware
    end: datetime  # exclusive
    out: Path
    model: ModelSpec
    compare: ModelSpec | None = None
    source: str = "kafka"  # "kafka" or a transactions file
    fmt: sources.Format = "auto"
    labels: str | None = None  # a labels file or topic; default: inline / the labels topic
    topic: str | None = None  # default: the configured transactions topic
    alert_budget: int = 100  # alerts an analyst team handles per day


@dataclass
class Loaded:
    """Transactions from `history_start` to the range's end, and every label known."""

    tx: pd.DataFrame
    labels: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)
    rejected: int = 0  # Kafka records the live scorer would have dead-lettered


# ---- request -------------------------------------------------------------------------------


def parse_time(value: str, option: str, end: bool = False) -> datetime:
    """A date (YYYY-MM-DD; as `--to` it includes that whole day) or an ISO 8601 time (UTC
    when no zone is given)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ReplayError(f"{option} {value!r} is neither a date (YYYY-MM-DD) nor an ISO 8601 "
                          "time (YYYY-MM-DDTHH:MM[:SS][Z|±HH:MM])") from None
    if end and len(value.strip()) == 10:  # a bare date: up to the end of that day
        moment += timedelta(days=1)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_request(req: ReplayRequest, now: datetime | None = None) -> None:
    """Refuse what cannot give a useful replay, before any data is read."""
    now = now or datetime.now(UTC)
    if req.end <= req.start:
        raise ReplayError(f"--to ({req.end:%Y-%m-%d %H:%M:%S}) is not after --from "
                          f"({req.start:%Y-%m-%d %H:%M:%S}): nothing to replay")
    if req.start >= now:
        raise ReplayError(f"the range starts in the future ({req.start.isoformat()}; now is "
                          f"{now:%Y-%m-%dT%H:%M:%SZ}): no events can exist yet")
    if req.alert_budget < 1:
        raise ReplayError("--alert-budget must be at least 1 alert a day")
    out = req.out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise ReplayError(f"--out {out} exists and is not an earlier replay's folder; "
                          "choose a new folder (it is created)")
    if req.source != "kafka" and not Path(req.source).is_file():
        raise ReplayError(f"--source {req.source}: no such file (use `kafka` or a JSONL/Parquet "
                          "transactions file)")


def load_model(spec: ModelSpec, settings: Settings) -> ModelRuntime:
    try:
        ref = resolve(spec.path, spec.version)
        return ModelRuntime(ref, device=settings.model_device, tree_backend=settings.tree_backend)
    except (ModelError, OSError) as exc:
        raise ReplayError(str(exc)) from None


def tokenizer_for(settings: Settings, notes: list[str]) -> Tokenizer:
    """The service's token key, so customer tokens match the live alerts; else a throwaway
    key (tokens then only group events within this replay)."""
    secret = settings.token_key.get_secret_value() if settings.token_key else None
    if secret is None and settings.token_key_file is None:
        notes.append("No FRAUDSCORE_TOKEN_KEY: customer tokens use a one-off key and do not "
                     "match the live alerts' tokens.")
        return Tokenizer(random_key())
    try:
        return Tokenizer(load_key(secret, settings.token_key_file, "token_key"))
    except KeyMaterialError as exc:
        raise ReplayError(str(exc)) from None


# ---- progress ------------------------------------------------------------------------------


class Tick:
    """Advances one step's progress bar; `total` once the step knows its size."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def __call__(self, n: int) -> None:
        self._progress.advance(self._task, n)

    def total(self, n: int) -> None:
        self._progress.update(self._task, total=max(n, 1))


class Steps:
    """One rich progress bar per step, and how long each took."""

    def __init__(self, enabled: bool, console: Console | None) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> Steps:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    @contextmanager
    def step(self, name: str, total: int = 1) -> Iterator[Tick]:
        task = self._progress.add_task(name, total=max(total, 1))
        began = time.perf_counter()
        yield Tick(self._progress, task)
        done = next(t for t in self._progress.tasks if t.id == task)
        self._progress.update(task, completed=done.total)
        self.seconds[name] = round(time.perf_counter() - began, 3)


# ---- reading -------------------------------------------------------------------------------


def load(req: ReplayRequest, settings: Settings, steps: Steps) -> Loaded:
    history_start = req.start - LOOKBACK - REFERENCE
    if req.source == "kafka":
        topic = req.topic or settings.topic_transactions
        with steps.step(f"reading {topic}", 0) as advance:
            txs, rejected = read_topic(settings, topic, Transaction,
                                       sources.TRANSACTION_COLUMNS, history_start,
                                       req.end + KAFKA_GRACE, advance)
        loaded = Loaded(transactions_frame(txs), None, rejected=rejected)
        if rejected:
            loaded.notes.append(f"{rejected:,} records of {topic} are not valid transactions "
                                "(the live scorer dead-letters them); they are skipped.")
    else:
        with steps.step("reading transactions"):
            try:
                tx, inline = sources.read_transactions(req.source, req.fmt, end=req.end)
            except (sources.SourceError, ValueError, OSError) as exc:
                raise ReplayError(f"--source {req.source}: {exc}") from None
        loaded = Loaded(tx[(tx["timestamp"] >= history_start).to_numpy()], inline)
    if req.labels is not None or req.source == "kafka":
        loaded.labels = load_labels(req, settings, steps, loaded.notes)
    return loaded


def load_labels(req: ReplayRequest, settings: Settings, steps: Steps,
                notes: list[str]) -> pd.DataFrame | None:
    """`--labels` as a file or a topic; for a Kafka source the configured labels topic by
    default (absent: no labels). Every label is read: label rates count them all."""
    spec = req.labels
    if spec is not None and (Path(spec).is_file() or Path(spec).suffix in (".parquet", ".jsonl",
                                                                          ".json")):
        if not Path(spec).is_file():
            raise ReplayError(f"--labels {spec}: no such file")
        with steps.step("reading labels"):
            try:
                return sources.read_labels(spec)
            except (sources.SourceError, ValueError, OSError) as exc:
                raise ReplayError(f"--labels {spec}: {exc}") from None
    topic = spec or settings.topic_labels
    try:
        with steps.step(f"reading {topic}", 0) as advance:
            labels, _ = read_topic(settings, topic, Label, LABEL_FIELDS, None, None,
                                   advance)
    except MissingTopic:
        if spec is not None:
            raise
        notes.append(f"No labels topic {topic!r}: no metrics, and label-rate features are 0.")
        return None
    return labels_frame(labels)


def _frame(items: Sequence[Row], fields: Sequence[str]) -> pd.DataFrame:
    """Rows of `read_topic` as a frame of object columns, plus partition `_p` and offset
    `_o`."""
    values = list(zip(*(row for row, _, _ in items), strict=True)) or [()] * len(fields)
    frame = pd.DataFrame({name: pd.Series(col, dtype=object)
                          for name, col in zip(fields, values, strict=True)})
    frame["_p"] = np.array([p for _, p, _ in items], dtype=np.int64)
    frame["_o"] = np.array([o for _, _, o in items], dtype=np.int64)
    return frame


class MissingTopic(ReplayError):
    """The topic does not exist on the cluster."""


def read_topic(
    settings: Settings, topic: str, model: type[BaseModel], fields: Sequence[str],
    since: datetime | None, stop_at: datetime | None, advance: Tick,
) -> tuple[list[Row], int]:
    """`fields` of each valid value of `topic` (validated as the live scorer does, then
    kept as a plain tuple to save memory) with its partition and offset; and the number of
    rejected records.

    Each partition is read from its first record stamped at or after `since` (minus a
    grace; from its start when None) up to its end as of now, or to its first event whose
    own time is at or after `stop_at`. The consumer is assigned partitions by hand with a
    unique group id and never commits, so no live consumer group is touched.
    """
    consumer = Consumer({
        **settings.kafka_client_config(),
        "group.id": f"fraudscore-replay-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",  # what the live scorer reads
        "enable.partition.eof": True,
    })
    try:
        bounds = _partition_bounds(consumer, settings, topic, since)
        return _read_partitions(consumer, settings, topic, model, fields, bounds, stop_at,
                                advance)
    except KafkaException as exc:
        raise ReplayError(f"Kafka at {settings.kafka_bootstrap_servers}: {exc}") from None
    finally:
        consumer.close()


def _partition_bounds(consumer: Consumer, settings: Settings, topic: str,
                      since: datetime | None) -> dict[int, tuple[int, int]]:
    """(first offset to read, end offset as of now) per partition."""
    try:
        meta = consumer.list_topics(topic, timeout=KAFKA_TIMEOUT_S)
    except KafkaException as exc:
        raise ReplayError(f"Kafka at {settings.kafka_bootstrap_servers} did not answer within "
                          f"{KAFKA_TIMEOUT_S:g} s ({exc.args[0]})") from None
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise MissingTopic(f"topic {topic!r} does not exist on {settings.kafka_bootstrap_servers}")
    bounds = {}
    for p in sorted(info.partitions):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                   timeout=KAFKA_TIMEOUT_S)
        start = low
        if since is not None:
            ms = int((since - KAFKA_GRACE).timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, ms)],
                                               timeout=KAFKA_TIMEOUT_S)[0]
            start = high if found.offset < 0 else max(found.offset, low)
        bounds[p] = (start, high)
    return bounds


def _read_partitions(
    consumer: Consumer, settings: Settings, topic: str, model: type[BaseModel],
    fields: Sequence[str], bounds: dict[int, tuple[int, int]], stop_at: datetime | None,
    advance: Tick,
) -> tuple[list[Row], int]:
    pending = {p: high for p, (start, high) in bounds.items() if start < high}
    if not pending:
        return [], 0
    total = sum(high - bounds[p][0] for p, high in pending.items())
    advance.total(total)
    kept: list[Row] = []
    rejected = 0
    consumer.assign([TopicPartition(topic, p, bounds[p][0]) for p in pending])
    last_progress = time.monotonic()
    read = 0
    while pending:
        messages = consumer.consume(5000, 0.5)
        if not messages:
            if time.monotonic() - last_progress > KAFKA_IDLE_S:
                raise ReplayError(f"Kafka sent nothing for {KAFKA_IDLE_S:g} s while reading "
                                  f"{topic!r} (partitions left: {sorted(pending)})")
            continue
        last_progress = time.monotonic()
        records = []
        for msg in messages:
            p = msg.partition()
            if p not in pending:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    _done(consumer, topic, pending, p)
                    continue
                raise ReplayError(f"reading {topic!r}: {err}")
            records.append(InputRecord(msg.value(), msg.key(), topic, p, msg.offset()))
            if msg.offset() >= pending[p] - 1:
                _done(consumer, topic, pending, p)
        items, sources_, dead = decode(records, settings.max_event_bytes, model)  # type: ignore[type-var]
        rejected += len(dead)
        for item, rec in zip(items, sources_, strict=True):
            when = getattr(item, "timestamp", None)
            if stop_at is not None and when is not None and when >= stop_at:
                if rec.partition in pending:  # this partition has reached the range's end
                    _done(consumer, topic, pending, rec.partition)
                continue
            kept.append((tuple(getattr(item, f) for f in fields), rec.partition, rec.offset))
        read += len(messages)
        advance(len(messages))
    advance(max(total - read, 0))
    return kept, rejected


def _done(consumer: Consumer, topic: str, pending: dict[int, int], partition: int) -> None:
    pending.pop(partition, None)
    consumer.pause([TopicPartition(topic, partition)])


def transactions_frame(items: Sequence[Row]) -> pd.DataFrame:
    """Decoded transactions in time order, ties in arrival order (a card's events share a
    partition, so this is the order the live scorer saw them in); a repeated transaction id
    keeps its first copy, as the store's idempotency does."""
    frame = _frame(items, sources.TRANSACTION_COLUMNS)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True).dt.as_unit("ns")
    frame["amount"] = frame["amount"].astype(np.float64)
    frame = frame.sort_values(["timestamp", "_p", "_o"], kind="stable")
    frame = frame.drop_duplicates("transaction_id", keep="first")
    return frame.drop(columns=["_p", "_o"]).reset_index(drop=True)


def labels_frame(items: Sequence[Row]) -> pd.DataFrame:
    frame = _frame(items, LABEL_FIELDS).drop(columns=["_p", "_o"])
    for n in ("timestamp", "reported_at"):
        frame[n] = pd.to_datetime(frame[n], utc=True).dt.as_unit("ns")
    frame["is_fraud"] = frame["is_fraud"].astype(bool)
    return frame


# ---- features and scores -------------------------------------------------------------------


def _tokens(tokenizer: Tokenizer, column: pd.Series) -> np.ndarray:
    """Tokens per row, computing each distinct value's HMAC once (None where missing)."""
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    table = np.array([*tokenizer.tokens(uniques.tolist()), None], dtype=object)
    return table[codes]  # code -1 (missing) picks the trailing None


def features_for(tx: pd.DataFrame, labels: pd.DataFrame | None,
                 tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(feature matrix, customer tokens): keyed by the tokens the live store uses."""
    customer_tokens = _tokens(tokenizer, tx["customer_id"])
    device_keys = equality_keys(_tokens(tokenizer, tx["device_id"]).tolist())
    frame = compute_features(tx, labels, pd.Series(customer_tokens, index=tx.index),
                             device_keys)
    return frame.to_numpy(dtype=np.float64), customer_tokens


def score(runtime: ModelRuntime, x: np.ndarray,
          advance: Tick) -> tuple[np.ndarray, np.ndarray]:
    """(fraud score, anomaly score) per row, in chunks so the progress bar moves."""
    fraud, anomaly = [], []
    for lo in range(0, len(x), SCORE_CHUNK):
        result = runtime.score(x[lo:lo + SCORE_CHUNK])
        fraud.append(result.fraud)
        anomaly.append(result.anomaly)
        advance(min(SCORE_CHUNK, len(x) - lo))
    return np.concatenate(fraud), np.concatenate(anomaly)


def decide(runtime: ModelRuntime, fraud: np.ndarray, anomaly: np.ndarray,
           tx: pd.DataFrame) -> np.ndarray:
    """The model's own policy (its manifest thresholds and anomaly rule), as the live scorer
    applies it; operator overrides and hard rules from the environment are not replayed."""
    policy = Policy.from_manifest(runtime.manifest)
    decisions, _ = policy.decide(fraud, anomaly, tx["amount"].to_numpy(np.float64),
                                 tx["terminal_id"].astype(str).tolist())
    return np.asarray(decisions).astype(str)


def top_reasons(contributions: np.ndarray, x: np.ndarray) -> list[list[dict[str, Any]]]:
    """The features that pushed each score up the most (what the live alerts carry)."""
    top = np.argsort(-contributions, axis=1)[:, :N_REASONS]
    return [[{"feature": FEATURE_NAMES[j], "value": float(x[i, j]),
              "contribution": round(float(contributions[i, j]), 6)} for j in top[i]]
            for i in range(len(top))]


# ---- metrics and drift ---------------------------------------------------------------------


def model_metrics(y: np.ndarray, p: np.ndarray, decisions: np.ndarray, day: np.ndarray,
                  card: np.ndarray, budget: int) -> dict[str, float | int]:
    """Detection quality on the range (y: label known as fraud)."""
    n_days = max(len(np.unique(day)), 1)
    alerted = decisions != "allow"
    cp, _ = card_precision_at_k(day, card, y, p, CP_K)
    return {
        "auc_roc": roc_auc(y, p),
        "average_precision": average_precision(y, p),
        f"card_precision_at_{CP_K}": cp,
        "alerts": int(alerted.sum()),
        "alerts_per_day": float(alerted.sum() / n_days),
        "alert_precision": float(y[alerted].mean()) if alerted.any() else float("nan"),
        "alert_recall": float(alerted[y].mean()) if y.any() else float("nan"),
        "precision_at_budget": precision_at_budget(y, p, day, budget),
    }


def precision_at_budget(y: np.ndarray, p: np.ndarray, day: np.ndarray, budget: int) -> float:
    """Share of frauds among each day's `budget` highest-scored transactions: what a team
    that reviews `budget` alerts a day would find."""
    frame = pd.DataFrame({"day": day, "p": p, "y": y})
    top = frame.sort_values("p", ascending=False, kind="stable").groupby("day").head(budget)
    return float(top["y"].mean()) if len(top) else float("nan")


def pr_curve(y: np.ndarray, p: np.ndarray, points: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct threshold, thinned to about `points` points."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[ps[1:] != ps[:-1], True]
    tp = np.cumsum(ys)[last]
    flagged = np.arange(1, len(ys) + 1)[last]
    recall, precision = tp / max(int(y.sum()), 1), tp / flagged
    keep = np.unique(np.searchsorted(recall, np.linspace(0, 1, points), side="left"))
    keep = keep[keep < len(recall)]
    return recall[keep], precision[keep]


def psi(actual: np.ndarray, edges: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of `actual` over right-closed bins on `edges`."""
    actual = actual[np.isfinite(actual)]
    if not len(actual):
        return float("nan")
    counts = np.bincount(np.searchsorted(edges, actual, side="left"), minlength=len(edges) + 1)
    a = np.maximum(counts / len(actual), 1e-4)
    e = np.maximum(expected, 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def bins_from_quantiles(q: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct edges and each bin's expected share from evenly spaced quantiles (a value
    repeated over several quantiles is a point mass holding their share)."""
    q = np.sort(np.asarray(q, dtype=np.float64))
    step = 1.0 / (len(q) - 1)
    edges = np.unique(q)
    cdf = np.array([np.flatnonzero(q == e).max() * step for e in edges])
    return edges, np.diff(np.r_[0.0, cdf, 1.0])


def bins_from_data(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decile edges of a reference sample and its exact share per bin."""
    reference = reference[np.isfinite(reference)]
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, 11)))
    counts = np.bincount(np.searchsorted(edges, reference, side="left"),
                         minlength=len(edges) + 1)
    return edges, counts / max(len(reference), 1)


def feature_drift(runtime: ModelRuntime, x: np.ndarray, reference: np.ndarray
                  ) -> tuple[dict[str, float], str]:
    """PSI of each feature against the model's training sample (manifest deciles), or
    against the reference week before the range when the manifest has none."""
    quantiles = runtime.manifest.get("feature_quantiles") or {}
    if all(quantiles.get(n) for n in FEATURE_NAMES):
        out = {n: psi(x[:, j], *bins_from_quantiles(quantiles[n]))
               for j, n in enumerate(FEATURE_NAMES)}
        return out, "training sample (manifest deciles)"
    if not len(reference):
        return {}, "none (no history before the range)"
    out = {n: psi(x[:, j], *bins_from_data(reference[:, j])) for j, n in enumerate(FEATURE_NAMES)}
    return out, f"the {REFERENCE.days} days before --from (the manifest has no feature deciles)"


# ---- the whole replay ----------------------------------------------------------------------


@dataclass
class Scored:
    """One model's view of the range."""

    label: str
    runtime: ModelRuntime
    fraud: np.ndarray
    anomaly: np.ndarray
    decisions: np.ndarray


def run_replay(req: ReplayRequest, settings: Settings, progress: bool = True,
               console: Console | None = None) -> dict[str, Any]:
    """Replay `req` and write its outputs; returns the summary written to summary.json."""
    check_request(req)
    began = time.perf_counter()
    runtimes = [("A", load_model(req.model, settings))]
    if req.compare is not None:
        runtimes.append(("B", load_model(req.compare, settings)))
    notes: list[str] = []
    tokenizer = tokenizer_for(settings, notes)
    with Steps(progress, console) as steps:
        loaded = load(req, settings, steps)
        notes.extend(loaded.notes)
        tx = loaded.tx
        stamps = tx["timestamp"]
        in_range = ((stamps >= req.start) & (stamps < req.end)).to_numpy()
        if not in_range.any():
            where = "Kafka" if req.source == "kafka" else req.source
            raise ReplayError(f"no transactions between {req.start.isoformat()} and "
                              f"{req.end.isoformat()} in {where}: nothing to replay")
        with steps.step("features", len(tx)):
            features, tokens = features_for(tx, loaded.labels, tokenizer)
        reference = features[((stamps >= req.start - REFERENCE) & (stamps < req.start))
                             .to_numpy()]
        rows, x, tokens = (tx[in_range].reset_index(drop=True), features[in_range],
                           tokens[in_range])
        scored = []
        for label, runtime in runtimes:
            with steps.step(f"scoring {label} ({runtime.version})", len(x)) as advance:
                fraud, anomaly = score(runtime, x, advance)
            scored.append(Scored(label, runtime, fraud, anomaly,
                                 decide(runtime, fraud, anomaly, rows)))
        with steps.step("changed decisions, reasons", 2) as advance:
            changes = changed_decisions(rows, x, tokens, scored, advance)
        y = known_fraud(rows, loaded.labels)
        with steps.step("metrics, drift"):
            summary = summarise(req, settings, rows, x, reference, tokens, scored, changes, y,
                                notes, loaded)
        summary["seconds"] = {**steps.seconds,
                              "before_writing": round(time.perf_counter() - began, 3)}
        with steps.step("writing outputs, report", 3) as advance, staging(req.out) as folder:
            write_outputs(folder, rows, tokens, scored, changes, y, summary, advance)
    return summary


def known_fraud(rows: pd.DataFrame, labels: pd.DataFrame | None) -> np.ndarray | None:
    """Each replayed event's label as known now (nullable bool), or None without labels."""
    if labels is None or not len(labels):
        return None
    first = first_labels(labels).set_index("transaction_id")["is_fraud"]
    return first.reindex(rows["transaction_id"]).to_numpy(dtype=object)


def changed_decisions(rows: pd.DataFrame, x: np.ndarray, tokens: np.ndarray,
                      scored: list[Scored], advance: Tick) -> pd.DataFrame:
    """Events whose decision differs between A and B, with both models' top reasons."""
    if len(scored) < 2:
        advance(2)
        return pd.DataFrame()
    a, b = scored
    idx = np.flatnonzero(a.decisions != b.decisions)
    picked = rows.iloc[idx].reset_index(drop=True)
    out = pd.DataFrame({
        "transaction_id": picked["transaction_id"].astype(str),
        "timestamp": picked["timestamp"],
        "customer_token": pd.Series(tokens[idx], dtype=object),
        "terminal_id": picked["terminal_id"].astype(str),
        "amount": picked["amount"].astype(np.float64),
        "score_a": a.fraud[idx], "decision_a": a.decisions[idx],
        "score_b": b.fraud[idx], "decision_b": b.decisions[idx],
    })
    for model in (a, b):
        reasons = top_reasons(model.runtime.contributions_many(x[idx]), x[idx]) if len(idx) \
            else []
        out[f"reasons_{model.label.lower()}"] = pd.Series(reasons, dtype=object)
        advance(1)
    out["row"] = idx
    return out


def summarise(req: ReplayRequest, settings: Settings, rows: pd.DataFrame, x: np.ndarray,
              reference: np.ndarray, tokens: np.ndarray, scored: list[Scored],
              changes: pd.DataFrame, y: np.ndarray | None, notes: list[str],
              loaded: Loaded) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able values."""
    day = utc_days(rows["timestamp"])
    days = np.unique(day)
    models, drift = [], {}
    for s in scored:
        policy = Policy.from_manifest(s.runtime.manifest)
        manifest = s.runtime.manifest
        score_q = manifest.get("score_quantiles") or []
        drift[s.label], drift_ref = feature_drift(s.runtime, x, reference)
        models.append({
            "label": s.label, "version": s.runtime.version, "path": str(s.runtime.ref.path),
            "review_threshold": policy.review_threshold,
            "block_threshold": policy.block_threshold,
            "anomaly_review_threshold": policy.anomaly_review_threshold,
            "training": manifest.get("training", {}),
            "decisions": {d: int((s.decisions == d).sum()) for d in ("allow", "review", "block")},
            "alerts_per_day": [int(((s.decisions != "allow") & (day == d)).sum()) for d in days],
            "score_histogram": np.histogram(s.fraud, bins=report.SCORE_BINS, range=(0, 1))[0]
            .tolist(),
            "score_psi": psi(s.fraud, *bins_from_quantiles(score_q)) if len(score_q) > 1
            else None,
            "drift_reference": drift_ref,
        })
    summary: dict[str, Any] = {
        "from": req.start.isoformat(), "to": req.end.isoformat(),
        "source": req.source if req.source != "kafka" else
        f"kafka topic {req.topic or settings.topic_transactions}",
        "events": len(rows), "history_events": len(loaded.tx) - len(rows),
        "rejected_records": loaded.rejected,
        "days": [str(np.datetime64(int(d), "D")) for d in days],
        "models": models, "drift": drift, "notes": notes, "alert_budget": req.alert_budget,
        "changed": len(changes), "metrics": None, "pr_curves": None, "frauds_per_day": None,
        "transitions": _transitions(scored),
        "top_changes": _top_changes(changes, y),
    }
    if y is not None:
        truth = np.asarray(pd.Series(y).fillna(False), dtype=bool)
        summary["labelled_events"] = int(pd.notna(pd.Series(y)).sum())
        summary["frauds"] = int(truth.sum())
        summary["frauds_per_day"] = [int((truth & (day == d)).sum()) for d in days]
        summary["metrics"] = {s.label: model_metrics(truth, s.fraud, s.decisions, day, tokens,
                                                     req.alert_budget) for s in scored}
        if truth.any():
            summary["pr_curves"] = {s.label: [c.tolist() for c in pr_curve(truth, s.fraud)]
                                    for s in scored}
    return summary


def _transitions(scored: list[Scored]) -> dict[str, int]:
    if len(scored) < 2:
        return {}
    pairs = pd.Series([f"{a}→{b}" for a, b in zip(scored[0].decisions, scored[1].decisions,
                                                   strict=True) if a != b])
    return {k: int(v) for k, v in pairs.value_counts().items()}


def _top_changes(changes: pd.DataFrame, y: np.ndarray | None, n: int = 50) -> list[dict]:
    """The changed decisions with the largest score moves, for the report's table."""
    if not len(changes):
        return []
    move = (changes["score_b"] - changes["score_a"]).abs().to_numpy()
    top = changes.iloc[np.argsort(-move, kind="stable")[:n]]
    out = []
    for rec in top.to_dict("records"):
        label = y[rec["row"]] if y is not None else None
        out.append({k: v for k, v in rec.items() if k != "row"}
                   | {"is_fraud": None if label is None or pd.isna(label) else bool(label),
                      "timestamp": pd.Timestamp(rec["timestamp"]).isoformat()})
    return out


# ---- writing -------------------------------------------------------------------------------


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed over it only when the block succeeds."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.replay-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():  # an earlier replay (checked up front): swap it out, then drop it
            old = out.parent / f"{tmp.name}.old"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def masked_cards(numbers: pd.Series) -> list[str | None]:
    """Last four digits only: enough to talk to the cardholder, useless to a thief."""
    return [f"{'*' * (len(v) - 4)}{v[-4:]}" if isinstance(v, str) else None
            for v in numbers.tolist()]


def write_outputs(folder: Path, rows: pd.DataFrame, tokens: np.ndarray, scored: list[Scored],
                  changes: pd.DataFrame, y: np.ndarray | None, summary: dict[str, Any],
                  advance: Tick) -> None:
    columns: dict[str, Any] = {
        "transaction_id": pa.array(rows["transaction_id"].astype(str).to_numpy()),
        "timestamp": pa.array(rows["timestamp"]),
        "customer_token": pa.array(tokens.tolist(), pa.string()),
        "card_masked": pa.array(masked_cards(rows["card_number"]), pa.string()),
        "terminal_id": pa.array(rows["terminal_id"].astype(str).to_numpy()),
        "amount": pa.array(rows["amount"].to_numpy(np.float64)),
    }
    for s in scored:
        key = s.label.lower()
        columns[f"score_{key}"] = pa.array(s.fraud)
        columns[f"anomaly_{key}"] = pa.array(s.anomaly)
        columns[f"decision_{key}"] = pa.array(s.decisions.tolist(), pa.string())
    columns["is_fraud"] = pa.array(
        [None] * len(rows) if y is None else [None if pd.isna(v) else bool(v) for v in y],
        pa.bool_())
    pq.write_table(pa.table(columns), folder / "scored.parquet", compression="zstd")
    advance(1)
    if len(scored) > 1:
        pq.write_table(pa.Table.from_pandas(changes.drop(columns="row"), preserve_index=False),
                       folder / "changes.parquet", compression="zstd")
    if summary["metrics"] is not None:
        (folder / "metrics.json").write_text(to_json(summary["metrics"]), encoding="utf-8")
    advance(1)
    (folder / "report.html").write_text(report.render(summary), encoding="utf-8")
    (folder / MARKER).write_text(to_json(summary), encoding="utf-8")
    advance(1)


def to_json(value: Any) -> str:
    """Strict JSON (NaN becomes null: browsers and jq refuse NaN)."""
    return json.dumps(_plain(value), indent=2, allow_nan=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
