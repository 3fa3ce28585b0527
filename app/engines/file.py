"""File engine: events from JSONL (raw lines, so bad lines reach the DLQ like on Kafka) or
from an already-encoded list; outputs as JSONL files. For the demo, replay and tests."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from rich.progress import Progress

from app.pipeline import InputRecord, Output, Scorer


@dataclass
class FileRunSummary:
    events: int = 0
    labels: int = 0
    scored: int = 0
    alerts: int = 0
    dead: int = 0
    seconds: float = 0.0
    transaction_ids: list[str] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    decisions: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def records_from_jsonl(path: Path) -> Iterator[InputRecord]:
    """Every line as raw bytes; the line number stands in for the Kafka offset."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            yield InputRecord(line.rstrip(b"\r\n"), None, str(path), 0, lineno)


def records_from_values(
    values: Sequence[bytes], keys: Sequence[bytes | None] | None = None, source: str = "memory",
    topics: Sequence[str] | None = None,
) -> Iterator[InputRecord]:
    """In-memory records; `topics` marks label records (LABELS_TOPIC) in a merged stream."""
    for i, value in enumerate(values):
        topic = topics[i] if topics is not None else source
        yield InputRecord(value, keys[i] if keys is not None else None, topic, 0, i)


def _dlq_line(out: Output) -> bytes:
    """DLQ records as JSON lines: the headers, and the original bytes in base64."""
    doc: dict[str, object] = {k: v.decode() for k, v in (out.headers or [])}
    doc["value_base64"] = base64.b64encode(out.value).decode()
    return json.dumps(doc).encode()


class _Sinks:
    def __init__(self, out_dir: Path, topics: dict[str, str]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {
            topic: (out_dir / f"{name}.jsonl").open("wb") for name, topic in topics.items()
        }
        self._dlq_topic = topics["dlq"]

    def write(self, outputs: Sequence[Output]) -> None:
        for out in outputs:
            line = _dlq_line(out) if out.topic == self._dlq_topic else out.value
            self._files[out.topic].write(line + b"\n")

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


def run_file(
    scorer: Scorer,
    records: Iterator[InputRecord],
    out_dir: Path,
    batch_size: int = 500,
    total: int | None = None,
    progress: bool = True,
    keep_scores: bool = False,
) -> FileRunSummary:
    """Stream records through the scorer in batches, writing alerts/scores/dlq JSONL."""
    topics = scorer.topics
    sinks = _Sinks(out_dir, {"alerts": topics.alerts, "scores": topics.scores, "dlq": topics.dlq,
                             "audit": topics.audit})
    summary = FileRunSummary()
    start = time.perf_counter()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("scoring", total=total)
        batch: list[InputRecord] = []
        try:
            for rec in records:
                batch.append(rec)
                if len(batch) >= batch_size:
                    _run_batch(scorer, batch, sinks, summary, keep_scores)
                    bar.advance(task, len(batch))
                    batch = []
            if batch:
                _run_batch(scorer, batch, sinks, summary, keep_scores)
                bar.advance(task, len(batch))
        finally:
            sinks.close()
    summary.seconds = time.perf_counter() - start
    return summary


LABELS_TOPIC = "fraud-labels"  # the default labels topic name


def _run_batch(
    scorer: Scorer, batch: list[InputRecord], sinks: _Sinks, summary: FileRunSummary,
    keep_scores: bool,
) -> None:
    result = scorer.process_mixed(batch)
    sinks.write(result.outputs)
    scorer.batch_committed()  # the files are this engine's commit: the audit head moves on
    n_labels = sum(1 for r in batch if r.topic == scorer.topics.labels)
    summary.labels += n_labels
    summary.events += len(batch) - n_labels
    summary.scored += len(result.transaction_ids)
    summary.alerts += result.n_alerts
    summary.dead += len(result.dead)
    if keep_scores:
        summary.transaction_ids.extend(result.transaction_ids)
        summary.scores.append(result.scores)
        summary.decisions.append(result.decisions)
        summary.features.append(result.features)


