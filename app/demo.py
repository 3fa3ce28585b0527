"""`fraudscore demo`: the whole pipeline on the embedded default, no servers needed.

Simulate → train on the early weeks → bootstrap an in-process Redis (fakeredis) with the
card state up to the test period → stream the test period, plus a few malformed events,
through the same pipeline the Kafka engine runs → print what came out.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import fakeredis
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from app.engines.file import LABELS_TOPIC, records_from_values, run_file
from app.pipeline import Scorer, Topics
from app.security.envelope import FieldCipher
from app.security.tokens import Tokenizer, equality_keys, random_key
from app.simulator import simulate
from app.sources import labels_to_json, transactions_to_json
from features.offline import compute_features, events_from_frame, labels_from_frame, micros
from features.online import RedisFeatureStore
from models.ensemble import train_ensemble
from models.metrics import average_precision, precision_recall_at, roc_auc
from models.policy import Policy
from models.registry import resolve, save
from models.runtime import ModelRuntime

TEST_DAYS = 14
LABEL_DELAY_DAYS = 7


@dataclass(frozen=True)
class DemoConfig:
    customers: int = 2000
    terminals: int = 4000
    days: int = 70
    seed: int = 42
    batch_size: int = 500


def malformed_events(valid: bytes) -> list[bytes]:
    """Bad input of the kinds producers really send; each must end in the DLQ."""
    doc = json.loads(valid)
    pan = doc.get("card_number") or "79927398713"
    wrong_check_digit = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    bad_luhn = {**doc, "transaction_id": "y", "card_number": wrong_check_digit}
    return [
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"",
        valid.replace(b'"amount":', b'"amount":-', 1),
        valid.replace(b'"currency":"EUR"', b'"currency":"euro"', 1),
        b'{"transaction_id":"x","timestamp":"2026-01-01T00:00:00","customer_id":"c",'
        b'"terminal_id":"t","amount":1.0,"currency":"EUR"}',
        json.dumps(bad_luhn).encode(),
        b"[1,2,3]",
    ]


def merged_stream(test: pd.DataFrame, labels: pd.DataFrame, since_us: int
                  ) -> tuple[list[bytes], list[str]]:
    """Test transactions and the labels reported meanwhile, in time order (labels first on
    ties): what the transactions and fraud-labels topics deliver to a live scorer."""
    reported = labels[micros(labels["reported_at"]) > since_us]
    reported = reported[reported["reported_at"] <= test["timestamp"].max()]
    when = np.concatenate([micros(reported["reported_at"]), micros(test["timestamp"])])
    kind = np.r_[np.zeros(len(reported), dtype=int), np.ones(len(test), dtype=int)]
    order = np.lexsort((np.arange(len(when)), kind, when))
    values = labels_to_json(reported) + transactions_to_json(test)
    topics = [LABELS_TOPIC] * len(reported) + ["transactions"] * len(test)
    return [values[i] for i in order], [topics[i] for i in order]


def run_demo(cfg: DemoConfig, out_dir: Path | None, console: Console) -> dict[str, float]:
    """Run the demo and print its summary; returns the headline numbers."""
    with console.status("simulating transactions"):
        tx, labels = simulate(cfg.customers, cfg.terminals, cfg.days, cfg.seed,
                              label_delay_days=LABEL_DELAY_DAYS)
    start = tx["timestamp"].min().normalize()
    test_start = start + timedelta(days=cfg.days - TEST_DAYS)
    train_end = test_start - timedelta(days=LABEL_DELAY_DAYS)  # labels known by then
    console.print(f"simulated {len(tx):,} transactions, {cfg.customers:,} cards, "
                  f"{labels['is_fraud'].mean():.2%} fraud; train < {train_end:%Y-%m-%d}, "
                  f"test ≥ {test_start:%Y-%m-%d}")

    token_key, pii_key = random_key(), random_key()
    tokenizer = Tokenizer(token_key)
    card_tokens = pd.Series(tokenizer.tokens(tx["customer_id"]), index=tx.index)
    device_keys = equality_keys(tokenizer.tokens(tx["device_id"]))
    history = (tx["timestamp"] < test_start).to_numpy()

    with console.status("computing offline features, training LightGBM and neural models"):
        # labels count only from their reported_at on, so no row sees its own future
        features = compute_features(tx, labels, card_tokens, device_keys)
        warm = tx["timestamp"] >= start + timedelta(days=7)  # windows need a week to fill
        fit = (warm & (tx["timestamp"] < train_end)).to_numpy()
        ens = train_ensemble(features[fit], labels["is_fraud"].to_numpy()[fit],
                             tx["timestamp"][fit], card_tokens.to_numpy()[fit])
        out = out_dir or Path(tempfile.mkdtemp(prefix="fraudscore-demo-"))
        registry = out / "models"  # next to the outputs, so the summary names one folder
        ref = save(ens, registry, {"end": str(train_end)}, features[fit].to_numpy()[:2000])
    par = ref.manifest["parity_max_abs_diff"]
    console.print(f"model {ref.version}: validation AUC {ens.metrics['valid_auc']:.3f}, "
                  f"AP {ens.metrics['valid_average_precision']:.3f}, MLP blend weight "
                  f"{ens.blend_weight}; parity vs LightGBM: ONNX {par['onnx']:.1e}, "
                  f"compiled {par.get('compiled') or float('nan'):.1e}; "
                  f"neural ONNX vs scikit-learn {par['neural_onnx']:.1e}")

    store = RedisFeatureStore(fakeredis.FakeRedis())
    card_of = dict(zip(tx["customer_id"], card_tokens, strict=True))
    until = int(micros(pd.Series([test_start]))[0])
    store.load_history(events_from_frame(tx[history], card_tokens[history],
                                         device_keys[history]),
                       labels_from_frame(labels, card_of), until)
    runtime = ModelRuntime(resolve(ref.path))
    scorer = Scorer(
        store=store, model=runtime, tokenizer=tokenizer,
        cipher=FieldCipher({"demo": pii_key}, "demo"),
        policy=Policy.from_manifest(runtime.manifest), topics=Topics(),
    )
    test = tx[~history]
    values, topics = merged_stream(test, labels, until)
    bad = malformed_events(values[0])
    stream = values + bad
    kinds = topics + ["transactions"] * len(bad)
    summary = run_file(scorer, records_from_values(stream, topics=kinds), out,
                       batch_size=cfg.batch_size, total=len(stream), keep_scores=True)

    scores = np.concatenate(summary.scores)
    decisions = np.concatenate(summary.decisions)
    y = labels["is_fraud"].to_numpy()[~history]
    precision, recall = precision_recall_at(y, decisions != "allow")
    # The streamed features must equal the offline ones computed over the full history with
    # the labels seen in the order the stream applied them (a batch's labels go first).
    batch_of = np.arange(len(values)) // cfg.batch_size
    is_label = np.array([k == LABELS_TOPIC for k in topics])
    tx_clock = np.full(len(tx), -1, dtype=np.int64)
    tx_clock[~history] = batch_of[~is_label]
    first_id = labels["transaction_id"].to_numpy()
    label_clock = np.full(len(labels), -1, dtype=np.int64)
    pos = pd.Series(np.arange(len(labels)), index=first_id)
    streamed_ids = [json.loads(values[i])["transaction_id"] for i in np.flatnonzero(is_label)]
    label_clock[pos.reindex(streamed_ids).to_numpy()] = batch_of[is_label]
    label_clock[micros(labels["reported_at"]) > micros(test["timestamp"]).max()] = len(values)
    check = compute_features(tx, labels, card_tokens, device_keys, (tx_clock, label_clock))
    online = np.vstack(summary.features)
    parity = float(np.abs(check.to_numpy()[~history] - online).max()) if len(online) else 0.0

    result = {
        "events": float(summary.events), "scored": float(summary.scored),
        "alerts": float(summary.alerts), "dead_letters": float(summary.dead),
        "precision": precision, "recall": recall, "auc": roc_auc(y, scores),
        "average_precision": average_precision(y, scores), "events_per_s": summary.events_per_s,
        "feature_parity_max_abs_diff": parity,
    }
    _print_summary(console, result, out)
    _print_top_alerts(console, out / "alerts.jsonl")
    return result


def _print_summary(console: Console, r: dict[str, float], out: Path) -> None:
    table = Table(title="fraudscore demo — embedded default (file engine + in-process Redis)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("events in", f"{r['events']:,.0f}")
    table.add_row("scored", f"{r['scored']:,.0f}")
    table.add_row("alerts (review + block)", f"{r['alerts']:,.0f}")
    table.add_row("dead letters", f"{r['dead_letters']:,.0f}")
    table.add_row("precision of alerts", f"{r['precision']:.3f}")
    table.add_row("recall of fraud", f"{r['recall']:.3f}")
    table.add_row("AUC / average precision", f"{r['auc']:.3f} / {r['average_precision']:.3f}")
    table.add_row("throughput (in-process fakeredis)", f"{r['events_per_s']:,.0f} events/s")
    table.add_row("online = offline features", f"max |diff| {r['feature_parity_max_abs_diff']}")
    console.print(table)
    console.print(f"outputs: {out}/alerts.jsonl, scores.jsonl, dlq.jsonl; model: {out}/models")


def _print_top_alerts(console: Console, alerts_file: Path, n: int = 5) -> None:
    import json

    alerts = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    alerts.sort(key=lambda a: -a["fraud_score"])
    table = Table(title=f"top {n} alerts (PII stays inside the encrypted envelope)")
    for col in ("alert", "card token", "terminal", "score", "decision"):
        table.add_column(col, no_wrap=True)
    table.add_column("top reasons (feature=value, +log-odds)", overflow="fold")
    for a in alerts[:n]:
        why = "\n".join(f"{r['feature']}={r['value']:.4g} ({r['contribution']:+.2f})"
                        for r in a["reasons"])
        table.add_row(a["alert_id"][:15] + "…", a["customer_token"][:8] + "…", a["terminal_id"],
                      f"{a['fraud_score']:.3f}", a["decision"], why)
    console.print(table)
