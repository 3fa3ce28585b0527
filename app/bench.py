"""`fraudscore bench features`: the feature store against the naive design, side by side.

Both run on the same real Redis, over the same simulated stream, in one process run:

- store: :class:`features.online.RedisFeatureStore` (one pipelined read, numpy windows,
  one MULTI write per batch, card state cached by the worker that owns it);
- naive: what a typical Python service does: per event, pipelined HGETALL of its card and
  terminal hashes, the windows computed in Python, HSET of the new event.

A second process issues GETs throughout and reports the latency other Redis users see.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import redis

from app.simulator import simulate
from features.card_arena import CARD_KIND
from features.definitions import CARD_WINDOWS_DAYS, DAY_US, HOUR_US, TERMINAL_DELAY_HOURS
from features.offline import events_from_frame, labels_from_frame, micros
from features.online import EventBatch, RedisFeatureStore
from features.stream import take_events


@dataclass(frozen=True)
class BenchConfig:
    customers: int = 20_000
    terminals: int = 40_000
    days: int = 35
    batch_size: int = 500
    stream_days: int = 2  # the last days are streamed; the first of them warms the caches
    seed: int = 9
    shards: int | None = None  # the store's card shards; None: 1 on one Redis, 16 on a Cluster
    # the two designs take turns every this many batches: both see the same machine load,
    # and each runs as a worker does, batch after batch (1: turns every batch, when each
    # batch starts on caches the other just cooled: the store's median 4.8 -> 6.2 ms)
    alternate: int = 10


def _client(url: str) -> redis.Redis | redis.RedisCluster:
    from app.factory import redis_client

    return redis_client(url)


def _store(client: redis.Redis | redis.RedisCluster, namespace: str, cfg: BenchConfig
           ) -> RedisFeatureStore:
    from app.factory import CLUSTER_SHARDS

    shards = cfg.shards or (CLUSTER_SHARDS if isinstance(client, redis.RedisCluster) else 1)
    return RedisFeatureStore(client, namespace=namespace, shards=shards)


def _slice(ev: EventBatch, a: int, b: int) -> EventBatch:
    return take_events(ev, np.arange(a, b))


def _probe(url: str, key: str, ready: mp.Event, stop: mp.Event,  # type: ignore[valid-type]
           out: mp.Queue) -> None:  # type: ignore[type-arg]
    """Another Redis user: a GET every millisecond, latencies in ms."""
    client = _client(url)
    client.set(key, b"x" * 64)
    ready.set()
    lat = []
    while not stop.is_set():
        t = time.perf_counter()
        client.get(key)
        lat.append((time.perf_counter() - t) * 1000)
        time.sleep(0.001)
    out.put(lat)


class NaiveStore:
    """Per-entity hashes, one HGETALL per event, Python loops: the common first design."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.r = client
        self.ns = namespace

    def load(self, ev: EventBatch, until_us: int) -> None:
        pipe = self.r.pipeline(transaction=False)
        recent = ev.t_us > until_us - 31 * DAY_US
        for i in np.flatnonzero(recent):
            pipe.hset(f"{self.ns}:c:{ev.cards[i]}", ev.transaction_ids[i],
                      f"{ev.t_us[i]},{ev.amount[i]}")
            hour = int(ev.t_us[i] // HOUR_US)
            pipe.hincrby(f"{self.ns}:t:{ev.terminals[i]}", str(hour), 1)
            if len(pipe) > 5000:
                pipe.execute()
        pipe.execute()

    def update_many(self, ev: EventBatch) -> list[list[float]]:
        pipe = self.r.pipeline(transaction=False)
        for i in range(len(ev)):
            pipe.hgetall(f"{self.ns}:c:{ev.cards[i]}")
            pipe.hgetall(f"{self.ns}:t:{ev.terminals[i]}")
        replies = pipe.execute()
        out = []
        pipe = self.r.pipeline(transaction=False)
        for i in range(len(ev)):
            t, amount = int(ev.t_us[i]), float(ev.amount[i])
            history = [tuple(v.decode().split(",")) for v in replies[2 * i].values()]
            row = [amount]
            for days in CARD_WINDOWS_DAYS:
                inside = [float(a) for ts, a in history if t - days * DAY_US < int(ts) <= t]
                row += [len(inside) + 1, (sum(inside) + amount) / (len(inside) + 1)]
            hour = t // HOUR_US
            counts = {int(h): int(c) for h, c in replies[2 * i + 1].items()}
            for days in CARD_WINDOWS_DAYS:
                end = hour - TERMINAL_DELAY_HOURS
                row.append(sum(c for h, c in counts.items() if end - 24 * days <= h < end))
            out.append(row)
            pipe.hset(f"{self.ns}:c:{ev.cards[i]}", ev.transaction_ids[i], f"{t},{amount}")
            pipe.hincrby(f"{self.ns}:t:{ev.terminals[i]}", str(hour), 1)
        pipe.execute()
        return out


def _drop(client: redis.Redis, pattern: str) -> None:
    keys = list(client.scan_iter(match=pattern, count=5000))
    for i in range(0, len(keys), 5000):
        client.delete(*keys[i:i + 5000])


BARRIER_TIMEOUT_S = 600.0  # warming one process's caches takes seconds, not minutes


@dataclass(frozen=True)
class _Stream:
    """A simulated history (loaded into the store first) and the days streamed after it;
    ``warm`` marks the first streamed day, when a worker's caches fill: a worker runs for
    days, so the bench measures after it."""

    history: EventBatch
    labels: Any  # LabelBatch
    until_us: int
    events: EventBatch
    warm: np.ndarray  # bool per streamed event

    @classmethod
    def simulated(cls, cfg: BenchConfig) -> _Stream:
        tx, labels = simulate(cfg.customers, cfg.terminals, cfg.days, cfg.seed)
        split = (tx["timestamp"].min().normalize()
                 + pd.Timedelta(days=cfg.days - cfg.stream_days))
        hist = (tx["timestamp"] < split).to_numpy()
        warm_until = split + pd.Timedelta(days=max(cfg.stream_days - 1, 0))
        return cls(events_from_frame(tx[hist]), labels_from_frame(labels),
                   int(micros(pd.Series([split]))[0]), events_from_frame(tx[~hist]),
                   (tx["timestamp"][~hist] < warm_until).to_numpy())

    def load(self, store: RedisFeatureStore) -> None:
        store.load_history(self.history, self.labels, self.until_us)


def run(url: str, cfg: BenchConfig) -> dict[str, float | int | str]:
    """Measure both designs on `url`; returns the JSON object the CLI prints."""
    stream = _Stream.simulated(cfg)
    events = stream.events
    client = _client(url)
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    store = _store(client, ns, cfg)
    naive = NaiveStore(client, f"{ns}-naive")
    stream.load(store)
    naive.load(stream.history, stream.until_us)

    n = len(events)
    warm = int(stream.warm.sum()) // cfg.batch_size * cfg.batch_size
    if cfg.stream_days == 1:
        warm = n // 5 // cfg.batch_size * cfg.batch_size
    if n - warm < cfg.batch_size:
        raise ValueError(f"only {n} events to stream: use more customers")
    bounds = list(range(0, n, cfg.batch_size))
    ctx = mp.get_context("spawn")
    ready, stop, queue = ctx.Event(), ctx.Event(), ctx.Queue()
    probe = ctx.Process(target=_probe, args=(url, f"{ns}-probe", ready, stop, queue),
                        daemon=True)
    probe.start()
    ready.wait(timeout=60)
    try:
        store_lat: list[float] = []
        naive_lat: list[float] = []
        step = max(cfg.alternate, 1)
        for turn in range(0, len(bounds), step):  # taking turns: the same machine load
            batches = [_slice(events, a, min(n, a + cfg.batch_size))
                       for a in bounds[turn:turn + step]]
            for side, lat in ((store, store_lat), (naive, naive_lat)):
                for a, batch in zip(bounds[turn:turn + step], batches, strict=True):
                    t = time.perf_counter()
                    side.update_many(batch)
                    if a >= warm:
                        lat.append(time.perf_counter() - t)
    finally:
        stop.set()
        probe_lat = queue.get(timeout=30) or [float("nan")]
        probe.join(timeout=10)
    memory_card = _memory(client, f"{ns}:{CARD_KIND}:*")
    memory_bucket = _memory(client, f"{ns}:tb:*")
    _drop(client, f"{ns}*")
    measured = n - warm
    store_s, naive_s = float(np.sum(store_lat)), float(np.sum(naive_lat))
    return {
        "store_events_per_s": round(measured / store_s),
        "naive_events_per_s": round(measured / naive_s),
        "ratio": round(naive_s / store_s, 2),
        "p50_ms_per_batch": round(float(np.median(store_lat)) * 1000, 2),
        "p99_ms_per_batch": round(float(np.quantile(store_lat, 0.99)) * 1000, 2),
        "naive_p50_ms_per_batch": round(float(np.median(naive_lat)) * 1000, 2),
        "other_client_p99_ms": round(float(np.quantile(probe_lat, 0.99)), 3),
        "batch_size": cfg.batch_size,
        "alternate_batches": step,
        "events_measured": measured,
        "cards": cfg.customers,
        "bytes_per_card_state": memory_card,
        "bytes_per_terminal_hour_bucket": memory_bucket,
        "redis_url": url.split("@")[-1],
        "shards": store._shards,
    }


def _owned_stream(url: str, namespace: str, events: EventBatch, warm: int, cfg: BenchConfig,
                  start: Any, out: Any) -> None:
    """One worker process: the events of the cards it owns, in time order. It warms its
    caches on the first streamed day, waits for the others, then times the second."""
    store = _store(_client(url), namespace, cfg)
    batch_size = cfg.batch_size
    for a in range(0, warm, batch_size):
        store.update_many(_slice(events, a, min(warm, a + batch_size)))
    start.wait()
    began = time.monotonic()
    for a in range(warm, len(events), batch_size):
        store.update_many(_slice(events, a, min(len(events), a + batch_size)))
    out.put((len(events) - warm, began, time.monotonic()))


def _results(procs: list[Any], out: Any) -> list[tuple[int, float, float]]:
    """One result per process; a process that dies (Redis gone, say) stops the run with an
    error naming it, instead of leaving the others waiting."""
    import queue

    done: list[tuple[int, float, float]] = []
    while len(done) < len(procs):
        try:
            done.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"bench process {dead[0].name} exited with code "
                                   f"{dead[0].exitcode}; see its traceback above") from None
    return done


def scale(url: str, cfg: BenchConfig, processes: Sequence[int] = (1, 2)
          ) -> dict[str, Any]:
    """The store with N worker processes, each owning a share of the cards (as consumer-group
    members own partitions), on one Redis: aggregate events/s over the second streamed day,
    from the first process's start to the last one's end. Each N gets a fresh namespace
    with the same history loaded, and all run in one call, side by side."""
    stream = _Stream.simulated(cfg)
    events, warm_mask = stream.events, stream.warm
    owner_hash = np.fromiter((zlib.crc32(c.encode()) for c in events.cards), dtype=np.int64,
                             count=len(events))
    client = _client(url)
    ctx = mp.get_context("spawn")
    result: dict[str, Any] = {"batch_size": cfg.batch_size, "cards": cfg.customers,
                              "processes": {}}
    for n in processes:
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        stream.load(_store(client, ns, cfg))
        start, out = ctx.Barrier(n, timeout=BARRIER_TIMEOUT_S), ctx.Queue()
        procs = []
        for part in range(n):
            idx = np.flatnonzero(owner_hash % n == part)
            procs.append(ctx.Process(target=_owned_stream, args=(
                url, ns, take_events(events, idx), int(warm_mask[idx].sum()), cfg, start, out)))
        try:
            for proc in procs:
                proc.start()
            done = _results(procs, out)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join(timeout=10)
            _drop(client, f"{ns}*")
        measured = sum(d[0] for d in done)
        wall = max(d[2] for d in done) - min(d[1] for d in done)
        result["processes"][str(n)] = {
            "events_per_s": round(measured / wall),
            "per_process_events_per_s": [round(d[0] / (d[2] - d[1])) for d in done],
            "events_measured": measured,
        }
    first = result["processes"][str(processes[0])]["events_per_s"]
    result["scaling"] = {k: round(v["events_per_s"] / first, 2)
                         for k, v in result["processes"].items()}
    return result


def _memory(client: redis.Redis, pattern: str, sample: int = 200) -> int:
    """Median MEMORY USAGE of a sample of keys."""
    sizes = []
    for key in client.scan_iter(match=pattern, count=1000):
        sizes.append(client.memory_usage(key) or 0)
        if len(sizes) >= sample:
            break
    return int(np.median(sizes)) if sizes else 0
