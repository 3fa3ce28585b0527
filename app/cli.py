"""`fraudscore` command line: argument parsing only, then delegation."""

from __future__ import annotations

import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from app.config import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Real-time fraud scoring for card payments.")
console = Console(stderr=True)


class Engine(StrEnum):
    confluent = "confluent"
    faust = "faust"
    file = "file"


class DataFormat(StrEnum):
    auto = "auto"
    jsonl = "jsonl"
    parquet = "parquet"
    handbook = "handbook"


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _utc_day(value: str, option: str) -> datetime:
    try:
        day = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(f"{option} {value!r} is not a date (YYYY-MM-DD)", 2) from None
    return day.replace(tzinfo=UTC) if day.tzinfo is None else day.astimezone(UTC)


@app.command()
def demo(
    customers: int = 2000, terminals: int = 4000, days: int = 70, seed: int = 42,
    out: Annotated[Path | None, typer.Option(help="folder for alerts/scores/dlq JSONL")] = None,
) -> None:
    """Simulate, train and stream through the pipeline in-process (no servers needed)."""
    from app.demo import DemoConfig, run_demo

    out_console = Console()
    if not out_console.is_terminal:  # piped or captured: do not squeeze tables to 80 columns
        out_console = Console(width=130)
    run_demo(DemoConfig(customers, terminals, days, seed), out, out_console)


@app.command()
def simulate(
    customers: int = 1000, terminals: int = 2000, days: int = 30, seed: int = 1,
    out: Annotated[Path | None, typer.Option(help=".parquet or .jsonl")] = None,
    labels_out: Annotated[Path | None, typer.Option(help="labels file (.parquet/.jsonl)")] = None,
    label_delay_days: float = 7.0,
    kafka: Annotated[str | None, typer.Option(help="produce live to this topic")] = None,
    rate: Annotated[float | None, typer.Option(help="events/s when producing")] = None,
) -> None:
    """Generate synthetic transactions with fraud scenarios (deterministic per seed)."""
    from app import sources
    from app.simulator import simulate as run_simulation

    if out is None and kafka is None:
        raise _fail("give --out FILE and/or --kafka TOPIC", 2)
    if out is not None and out.suffix not in (".parquet", ".jsonl"):
        raise _fail(f"--out {out}: use a .parquet or .jsonl file name", 2)
    with console.status("simulating"):
        tx, labels = run_simulation(customers, terminals, days, seed,
                                    label_delay_days=label_delay_days)
    console.print(f"{len(tx):,} transactions, fraud rate {labels['is_fraud'].mean():.2%}")
    if out is not None:
        sources.write_frame(tx, out)
        labels_path = labels_out or out.with_name(out.stem + ".labels" + out.suffix)
        sources.write_labels(labels, labels_path)
        console.print(f"wrote {out} and {labels_path}")
    if kafka is not None:
        settings = _settings()
        values = sources.transactions_to_json(tx)
        keys = [c.encode() for c in tx["customer_id"]]
        n = sources.produce(values, keys, settings.kafka_bootstrap_servers, kafka, rate,
                            extra_config={k: str(v) for k, v in settings.kafka_config.items()})
        console.print(f"produced {n:,} events to {kafka}")


@app.command()
def produce(
    data: Path, topic: str = "transactions",
    format: Annotated[DataFormat, typer.Option("--format")] = DataFormat.auto,
    rate: float | None = None,
) -> None:
    """Produce a transactions file (JSONL, Parquet, handbook) to Kafka, keyed by customer."""
    from app import sources

    settings = _settings()
    tx, _ = sources.read_transactions(data, format.value)
    values = sources.transactions_to_json(tx)
    keys = [c.encode() for c in tx["customer_id"]]
    n = sources.produce(values, keys, settings.kafka_bootstrap_servers, topic, rate,
                        extra_config={k: str(v) for k, v in settings.kafka_config.items()})
    console.print(f"produced {n:,} events to {topic}")


@app.command()
def train(
    data: Path,
    train_start: Annotated[str, typer.Option(help="first day of training, YYYY-MM-DD")],
    train_end: Annotated[str, typer.Option(help="last day of training (inclusive)")],
    registry: Annotated[Path, typer.Option(help="model registry folder")] = Path("registry"),
    format: Annotated[DataFormat, typer.Option("--format")] = DataFormat.auto,
    labels: Annotated[Path | None, typer.Option(help="labels file, unless the data has them")]
    = None,
    delay_days: Annotated[int, typer.Option(
        help="label delay: frauds are known this many days after the event; training labels "
             "are those known at --train-end + delay")] = 7,
    alert_budget: Annotated[float | None, typer.Option(
        help="review threshold: alert at most this many cards a day (on validation); "
             "default: the F1-optimal threshold")] = None,
    block_precision: Annotated[float, typer.Option(
        help="block threshold: validation precision at least this")] = 0.9,
    neural: Annotated[bool, typer.Option(help="also train the MLP classifier")] = True,
    compile_timeout: Annotated[float, typer.Option(
        help="seconds allowed to compile the trees to native code before falling back to "
             "ONNX Runtime")] = 120.0,
) -> None:
    """Train LightGBM + neural models on point-in-time features and register a version."""
    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from app import sources
    from features.offline import compute_features
    from models.ensemble import train_ensemble
    from models.registry import data_digest, save

    start, end = _utc_day(train_start, "--train-start"), _utc_day(train_end, "--train-end")
    end = end + timedelta(days=1)
    if end <= start:
        raise _fail("--train-end is before --train-start", 2)
    if not data.exists():
        raise _fail(f"--data {data}: no such file", 2)
    if delay_days < 0:
        raise _fail("--delay-days must be ≥ 0", 2)
    steps = ["load data", "features", "tree model", "neural models", "blend and thresholds",
             "export, compile, register"]
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
            transient=False) as progress:
        task = progress.add_task(steps[0], total=len(steps))

        def step(name: str) -> None:
            progress.update(task, description=name, completed=steps.index(name))

        tx, label_frame = sources.read_transactions(data, format.value)
        if labels is not None:
            label_frame = sources.read_labels(labels)
        if label_frame is None:
            raise _fail("no labels: pass --labels FILE (simulate writes FILE.labels.*)", 2)
        history = (tx["timestamp"] < end).to_numpy()
        if not history.any():
            raise _fail("no transactions before --train-end", 2)
        step("features")
        # Labels count only from their reported_at on, so features never see the future.
        features = compute_features(tx[history], label_frame)
        window = ((tx["timestamp"] >= start) & (tx["timestamp"] < end)).to_numpy()[history]
        if not window.any():
            raise _fail("no transactions between --train-start and --train-end", 2)
        known = label_frame
        if "reported_at" in label_frame:  # a fraud reported after the delay is not known yet
            cutoff = end + timedelta(days=delay_days)
            known = label_frame[label_frame["reported_at"] < cutoff]
        is_fraud = known.set_index("transaction_id")["is_fraud"]
        win_tx = tx[history][window]
        y = is_fraud.reindex(win_tx["transaction_id"]).fillna(False).to_numpy(dtype=bool)
        try:
            ens = train_ensemble(features[window], y, win_tx["timestamp"],
                                 win_tx["customer_id"].to_numpy(), alert_budget=alert_budget,
                                 block_precision=block_precision, with_neural=neural,
                                 progress=step)
        except ValueError as exc:
            raise _fail(f"cannot train: {exc}", 2) from None
        step("export, compile, register")
        rng = np.random.default_rng(0)
        x = features[window].to_numpy()
        sample = x[rng.choice(len(x), min(len(x), 5000), replace=False)]
        ref = save(ens, registry, {
            "data": str(data), "data_sha256": data_digest(
                win_tx["transaction_id"].astype(str).to_numpy(dtype="U"),
                win_tx["timestamp"].to_numpy(), y),
            "start": start.isoformat(), "end": end.isoformat(), "delay_days": delay_days,
            "rows": int(window.sum()), "frauds": int(y.sum())},
            sample, compile_timeout_s=compile_timeout)
        progress.update(task, completed=len(steps), description="done")
    m = ref.manifest["metrics"]
    console.print(f"registered {ref.version} in {registry} "
                  f"(validation AUC {m['valid_auc']:.3f}, AP {m['valid_average_precision']:.3f}; "
                  f"MLP blend weight {ref.manifest['blend_weight']}; "
                  f"trees: {(ref.manifest.get('compiled') or {}).get('backend', 'onnx')})")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="model folder or registry (its LATEST)")],
    data: Annotated[Path, typer.Option(help="transactions file (with labels, or --labels)")],
    test_start: Annotated[str, typer.Option(help="first test day, YYYY-MM-DD")],
    test_end: Annotated[str, typer.Option(help="last test day (inclusive)")],
    format: Annotated[DataFormat, typer.Option("--format")] = DataFormat.auto,
    labels: Annotated[Path | None, typer.Option(help="labels file, unless the data has them")]
    = None,
    delay_days: Annotated[int, typer.Option(help="label delay in days")] = 7,
    known_days: Annotated[int, typer.Option(
        help="cards with a fraud in these days before the delay are left out")] = 7,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Detection quality on a test period, measured as the Fraud Detection Handbook does:
    AUC ROC, average precision, Card Precision@100 (see models/evaluate.py)."""
    import json

    from app import sources
    from models import registry
    from models.evaluate import EvaluationError, evaluate_period

    start = _utc_day(test_start, "--test-start")
    end = _utc_day(test_end, "--test-end") + timedelta(days=1)
    if end <= start:
        raise _fail("--test-end is before --test-start", 2)
    if delay_days < 0 or known_days < 0:
        raise _fail("--delay-days and --known-days must not be negative", 2)
    if not data.exists():
        raise _fail(f"--data {data}: no such file", 2)
    if labels is not None and not labels.exists():
        raise _fail(f"--labels {labels}: no such file", 2)
    try:
        ref = registry.resolve(model)
    except (registry.ModelError, OSError, ValueError) as exc:
        raise _fail(f"--model {model}: {exc}", 2) from None
    booster_file = ref.path / "booster.txt"
    if not booster_file.is_file():
        raise _fail(f"--model {model}: no booster.txt in {ref.path}", 2)
    try:
        with console.status("loading data"):
            tx, label_frame = sources.read_transactions(data, format.value, end=end)
            if labels is not None:
                label_frame = sources.read_labels(labels, end=end)
        if label_frame is None:
            raise _fail("no labels: pass --labels FILE", 2)
        with console.status("computing features and scoring"):
            result = evaluate_period(booster_file, tx, label_frame, start, end, delay_days,
                                     known_days)
    except (sources.SourceError, EvaluationError) as exc:
        raise _fail(str(exc), 2) from None
    if json_output:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value:,}")


@app.command()
def run(
    engine: Annotated[Engine, typer.Option()] = Engine.confluent,
    model: Annotated[Path | None, typer.Option(help="model folder or registry")] = None,
    input: Annotated[Path | None, typer.Option(help="file engine: JSONL input")] = None,
    out: Annotated[Path, typer.Option(help="file engine: output folder")] = Path("out"),
    workers: Annotated[int, typer.Option(
        min=1, max=64, help="scoring processes in this consumer group")] = 1,
    worker_id: Annotated[int, typer.Option(
        min=0, help="index of the first worker: stable per worker (e.g. a StatefulSet "
                    "ordinal); it names the transactional id and static group membership")]
    = 0,
) -> None:
    """Score the transactions stream (Kafka by default) until SIGTERM/SIGINT."""
    from app import factory
    from app.observability import setup_logging
    from models.registry import ModelError

    settings = _settings()
    setup_logging(settings.log_level)
    try:
        ref = factory.model_ref(settings, model)
        token_key, pii_key = factory.keys_from_settings(settings)
    except (ConfigError, FileNotFoundError, ModelError) as exc:
        raise _fail(str(exc), 2) from None
    if engine is Engine.file:
        from app.engines.file import records_from_jsonl, run_file

        if input is None or not input.exists():
            raise _fail("the file engine needs --input FILE.jsonl", 2)
        import fakeredis

        scorer = factory.build_scorer(settings, fakeredis.FakeRedis(), ref, token_key, pii_key)
        summary = run_file(scorer, records_from_jsonl(input), out, settings.batch_size)
        console.print(f"{summary.events:,} events: {summary.scored:,} scored, "
                      f"{summary.alerts:,} alerts, {summary.dead:,} dead letters "
                      f"({summary.events_per_s:,.0f}/s) → {out}")
        return

    from functools import partial

    from app.engines.confluent import ensure_topics, serve
    from app.engines.workers import supervise

    if engine is Engine.faust:
        from app.engines.faust_engine import serve  # type: ignore[assignment]

    try:
        factory.check_redis(settings)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    ensure_topics(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if workers > 1:
        code = supervise(workers, partial(serve, model), stop, first_id=worker_id)
        console.print(f"stopped {workers} workers")
        raise typer.Exit(code)
    stats = serve(model, worker_id, stop)
    console.print(f"stopped: {stats}")


bench = typer.Typer(no_args_is_help=True, help="Benchmarks against the alternative.")
app.add_typer(bench, name="bench")


@bench.command("features")
def bench_features(
    customers: int = 20_000, days: int = 35, batch_size: int = 500,
    processes: Annotated[int, typer.Option(
        help="instead: the store with 1 and with N worker processes, each owning a share "
             "of the cards, side by side")] = 0,
    shards: Annotated[int | None, typer.Option(
        help="the store's card shards (default: 1 on one Redis, 16 on a Cluster)")] = None,
    alternate: Annotated[int, typer.Option(
        help="the store and the naive design take turns every this many batches")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Feature store vs naive pipelined HGETALL, side by side on the real Redis (or a Redis
    Cluster: FRAUDSCORE_REDIS_URL naming any of its nodes)."""
    import json

    from app.bench import BenchConfig, run, scale

    settings = _settings()
    if shards is not None and shards < 1:
        raise _fail("--shards must be 1 or more", 2)
    if alternate < 1:
        raise _fail("--alternate must be 1 or more", 2)
    cfg = BenchConfig(customers=customers, terminals=2 * customers, days=days,
                      batch_size=batch_size, shards=shards, alternate=alternate)
    if processes < 0 or processes == 1:
        raise _fail("--processes must be 2 or more (0: the usual comparison)", 2)
    result = (scale(settings.redis_url, cfg, (1, processes)) if processes
              else run(settings.redis_url, cfg))
    if json_output:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            console.print(f"{k}: {v}")


@bench.command("model")
def bench_model(
    trees: int = 100, leaves: int = 31, features: int = 15,
    seconds: Annotated[float, typer.Option(help="measuring time per runtime and batch")] = 0.5,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """LightGBM vs ONNX Runtime vs compiled trees vs the neural graph, one thread, one run."""
    import json

    from models.bench import bench_models, synthetic_data
    from models.neural import fit_neural

    x, y = synthetic_data(40_000, features, seed=3)
    half = len(x) // 2
    neural = fit_neural(x[:half], y[:half], x[half:], y[half:], with_classifier=True)
    result = bench_models(n_trees=trees, num_leaves=leaves, n_features=features,
                          seconds_per_case=seconds, neural_onnx=neural.onnx_bytes,
                          neural_reference=neural.training_library_error)
    if json_output:
        print(json.dumps(result))
        return
    for runtime, by_batch in result["runtimes"].items():
        cells = ", ".join(f"{b}: {v['rows_per_s']:,.0f}/s p50 {v['latency_us_p50']:.1f}µs"
                          for b, v in by_batch.items())
        console.print(f"{runtime:<12} {cells}")
    console.print(f"parity (max |diff|): {result['parity_max_abs_diff']}")


@bench.command("e2e")
def bench_e2e(
    events: Annotated[int, typer.Option(min=1000, help="events per throughput run")] = 500_000,
    rate: Annotated[float, typer.Option(help="offered events/s for the latency runs")] = 5000.0,
    latency_seconds: Annotated[float, typer.Option(help="measured latency window")] = 20.0,
    warmup_seconds: Annotated[float, typer.Option(help="offered, not measured")] = 5.0,
    max_seconds: Annotated[float, typer.Option(
        help="measure a variant too slow to drain --events over this long")] = 120.0,
    partitions: Annotated[int, typer.Option(min=1)] = 4,
    audit_scope: Annotated[str, typer.Option(help="FRAUDSCORE_AUDIT_SCOPE of the engines")]
    = "alerts",
    variants: Annotated[str, typer.Option(help="comma-separated")]
    = "confluent_1w,confluent_2w,faust,naive",
    env: Annotated[list[str] | None, typer.Option(
        "--env", help="FRAUDSCORE_NAME=VALUE for every variant's workers (repeatable)")] = None,
    broker_warmup_events: Annotated[int, typer.Option(
        min=0, help="drained through one worker first, unmeasured: the broker's JIT warm-up "
        "falls on no variant (0 = off)")] = 300_000,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Engines end to end on Kafka + Redis, side by side: events/s and p50/p99 latency."""
    import json

    from app.bench_e2e import E2EConfig, run

    settings = _settings()
    overrides = [item.partition("=") for item in env or []]
    if any(not sep or not name.startswith("FRAUDSCORE_") for name, sep, _ in overrides):
        raise _fail("--env takes FRAUDSCORE_NAME=VALUE", 2)
    cfg = E2EConfig(events=events, rate=rate, latency_s=latency_seconds,
                    warmup_s=warmup_seconds, partitions=partitions, max_seconds=max_seconds,
                    audit_scope=audit_scope,
                    variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
                    engine_env=tuple((name, value) for name, _, value in overrides),
                    broker_warmup_events=broker_warmup_events)
    try:
        result = run(settings.kafka_bootstrap_servers, settings.redis_url, cfg,
                     progress=lambda line: console.print(line, markup=False, highlight=False))
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    if json_output:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            console.print(f"{k}: {v}")


@app.command()
def schemas(check: Annotated[bool, typer.Option(help="fail if files differ")] = False) -> None:
    """Write (or check) the JSON Schema files generated from the topic models."""
    from app.schemas import SCHEMA_DIR, json_schemas, write_json_schemas

    if check:
        stale = [n for n, text in json_schemas().items()
                 if not (SCHEMA_DIR / n).exists() or (SCHEMA_DIR / n).read_text() != text]
        if stale:
            raise _fail(f"schemas out of date: {', '.join(stale)}; run `fraudscore schemas`")
        console.print("schemas up to date")
        return
    for path in write_json_schemas():
        console.print(f"wrote {path}")


@app.command()
def replay(
    start: Annotated[str, typer.Option(
        "--from", help="start: YYYY-MM-DD or an ISO 8601 time (UTC unless it has a zone)")],
    end: Annotated[str, typer.Option(
        "--to", help="end: a date includes that whole day; a time is exclusive")],
    model: Annotated[Path, typer.Option(help="model A: a model folder or a registry (LATEST)")],
    out: Annotated[Path, typer.Option(
        help="output folder; created, or replaced when it holds an earlier replay")],
    source: Annotated[str, typer.Option(
        help="`kafka` (the transactions topic) or a JSONL/Parquet/handbook file")] = "kafka",
    format: Annotated[DataFormat, typer.Option("--format")] = DataFormat.auto,
    model_version: Annotated[str | None, typer.Option(help="model A's version")] = None,
    compare: Annotated[Path | None, typer.Option(
        help="model B: a model folder or a registry (default with --compare-version: "
             "model A's registry)")] = None,
    compare_version: Annotated[str | None, typer.Option(help="model B's version")] = None,
    labels: Annotated[str | None, typer.Option(
        help="labels file or topic; default: the handbook's own, or the labels topic")] = None,
    topic: Annotated[str | None, typer.Option(
        help="transactions topic (default: FRAUDSCORE_TOPIC_TRANSACTIONS)")] = None,
    alert_budget: Annotated[int, typer.Option(help="alerts analysts handle per day")] = 100,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    reason: Annotated[str, typer.Option(help="why: recorded in the audit trail")] = "replay",
    analyst: Annotated[str | None, typer.Option(
        help="who you are, if not your OS user (both are recorded)")] = None,
    audit_file: Annotated[Path | None, typer.Option(
        help="write the audit record to this file instead of the audit topic")] = None,
) -> None:
    """Re-score a past range with model A (and B): scores, changed decisions with reasons,
    metrics, drift and an offline HTML report, without touching live state. The access is
    audited (who, why, which range and models, outcome) unless FRAUDSCORE_AUDIT_SCOPE=off."""
    import getpass
    import time

    from app.replay import ModelSpec, ReplayError, ReplayRequest, parse_time, run_replay

    settings = _settings()

    def audit(outcome: str, why: str) -> None:
        """Record the access; a failed replay's own error stays the message shown."""
        if settings.audit_scope == "off":
            return
        from app.audit_kafka import record_access

        user = getpass.getuser()
        try:
            record_access(settings, os_user=user, actor=analyst or user, action="replay",
                          outcome=outcome, object_type="time_range",
                          object_id=f"{start}..{end} {source}", reason=why,
                          audit_file=audit_file or settings.audit_file,
                          model_version=" vs ".join(
                              f"{m}@{v or 'latest'}" for m, v in
                              ((model, model_version), (compare, compare_version)) if m))
        except Exception as exc:  # an unaudited access is a failed one
            raise _fail(f"the replay could not be audited: {exc}", 2) from None

    if compare is None and compare_version is not None:
        compare = model
    began = time.perf_counter()
    try:
        request = ReplayRequest(
            start=parse_time(start, "--from"), end=parse_time(end, "--to", end=True), out=out,
            model=ModelSpec(model, model_version),
            compare=ModelSpec(compare, compare_version) if compare is not None else None,
            source=source, fmt=format.value, labels=labels, topic=topic,
            alert_budget=alert_budget)
        summary = run_replay(request, settings, progress=progress, console=console)
    except ReplayError as exc:
        try:
            audit("failure", f"{reason} [failed: {exc}]")
        except typer.Exit:
            console.print("[yellow]warning: this failed replay could not be audited[/yellow]")
        raise _fail(str(exc), 2) from None
    audit("success", reason)
    stdout = Console()
    stdout.print(f"replayed {summary['events']:,} events in {time.perf_counter() - began:.1f} s"
                 f" ({summary['history_events']:,} earlier events for features) → {out}")
    for m in summary["models"]:
        d = m["decisions"]
        line = (f"model {m['label']} {m['version']}: {d['review']:,} review, "
                f"{d['block']:,} block")
        metrics = (summary["metrics"] or {}).get(m["label"])
        if metrics:
            line += (f"; AUC {metrics['auc_roc']:.3f}, AP {metrics['average_precision']:.3f}, "
                     f"CP@100 {metrics['card_precision_at_100']:.3f}")
        stdout.print(line)
    if len(summary["models"]) > 1:
        stdout.print(f"{summary['changed']:,} decisions change from A to B")
    stdout.print(f"report: {out / 'report.html'}")


from app.cli_security import alerts_app, audit_app, keys_app  # noqa: E402

app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(alerts_app, name="alerts")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(2)
