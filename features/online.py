"""Online feature state in Redis: one read and one atomic write per batch.

Keys (each carries a hash tag, so it maps to one Redis Cluster slot):

- ``{ns}:card:{<token>}``: the card's recent events (``CARD_EVENT`` records, 28 bytes
  each, at most 30 days plus the batch), appended each batch, rewritten when trimmed;
- ``{ns}:cl:{<shard>}`` / ``{ns}:tl:{<shard>}``: labels so far per card / terminal, fields
  ``<name>:n`` and ``<name>:f`` kept by ``HINCRBY`` in 16 shard hashes (one HMGET each);
- ``{ns}:th:{<hour>}``: per hour, a list with one "terminal<TAB>count" chunk per batch
  (one RPUSH per batch, summed by the reader), and ``{ns}:tf:{<hour>}``: terminal →
  on-time frauds (HINCRBY per label), for the delayed terminal windows;
- ``{ns}:seen:{<hour>}``: transaction id → the features it got (redelivery), and
  ``{ns}:lab:{<hour>}``: transaction id → its first label (label redelivery).

The worker keeps the cards it owns in memory (Redis stays the durable copy, written every
batch); after a rebalance the engine calls :meth:`RedisFeatureStore.invalidate`. Terminal
hour buckets older than the 7-day delay are settled, so they are cached and re-read only
every ``terminal_refresh_s``.
"""

from __future__ import annotations

import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis

from features.definitions import (
    CARD_EVENT,
    CARD_LOOKBACK_US,
    DAY_US,
    FEATURE_NAMES,
    HOUR_US,
    INDEX,
    N_FEATURES,
    TERMINAL_DELAY_HOURS,
    TERMINAL_WINDOWS_DAYS,
)
from features.windows import (
    CardEvents,
    card_features,
    hours_of,
    label_rate,
    sorted_order,
    terminal_columns,
    terminal_window_bounds,
    transaction_features,
)

_FEATURE_BYTES = N_FEATURES * 8
_LONGEST_TERMINAL_HOURS = 24 * max(TERMINAL_WINDOWS_DAYS)
# One batch's writes, atomically. KEYS: the card keys, then per event hour its terminal
# bucket (a list of "terminal\tcount" chunks, one per batch) and its snapshot hash. ARGV:
# n_cards, card TTL (ms), bucket TTL (s), snapshot TTL (s), n_hours; per card a mode ('s'
# rewrite / 'a' append) and bytes; per hour the chunk, the count of snapshots, (id, bytes)*.
_WRITE_BATCH = """
local n = tonumber(ARGV[1])
local a = 6
for i = 1, n do
  if ARGV[a] == 's' then
    redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[2])
  else
    redis.call('APPEND', KEYS[i], ARGV[a + 1])
  end
  a = a + 2
end
local k = n + 1
for h = 1, tonumber(ARGV[5]) do
  local bucket, seen = KEYS[k], KEYS[k + 1]
  k = k + 2
  redis.call('RPUSH', bucket, ARGV[a])
  redis.call('EXPIRE', bucket, ARGV[3])
  local ns = tonumber(ARGV[a + 1])
  a = a + 2
  if ns > 0 then
    redis.call('HSET', seen, unpack(ARGV, a, a + 2 * ns - 1))
    a = a + 2 * ns
  end
  redis.call('EXPIRE', seen, ARGV[4])
end
return n
"""
_CARD_TTL_MS = (CARD_LOOKBACK_US + 2 * DAY_US) // 1000  # > lookback + the rewrite interval
_SHARDS = 16  # label counters live in 16 hashes per kind: one HMGET each per batch


class FeatureStoreUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error; nothing was applied."""


@dataclass(frozen=True)
class EventBatch:
    """A micro-batch as the store needs it: tokens and keys only, no personal data."""

    transaction_ids: Sequence[str]
    cards: Sequence[str]  # card tokens
    terminals: np.ndarray  # terminal ids (object array of str)
    terminal_keys: np.ndarray  # uint32 hashes of the terminal ids
    t_us: np.ndarray  # int64
    amount: np.ndarray  # float64
    device: np.ndarray  # uint32, 0 = unknown
    country: np.ndarray  # uint32, 0 = unknown

    def __len__(self) -> int:
        return len(self.t_us)


@dataclass(frozen=True)
class LabelBatch:
    transaction_ids: Sequence[str]
    cards: Sequence[str]
    terminals: Sequence[str]
    t_us: np.ndarray  # the transaction's event time
    reported_us: np.ndarray
    is_fraud: np.ndarray  # bool


class _TerminalWindows:
    """Worker-local hour buckets of every terminal and the window sums built from them."""

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.index: dict[str, int] = {}
        self.buckets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.sums: dict[int, tuple[float, dict[int, np.ndarray], dict[int, np.ndarray]]] = {}

    def idx(self, terminals: Sequence[str]) -> np.ndarray:
        get = self.index.setdefault
        return np.fromiter((get(t, len(self.index)) for t in terminals), dtype=np.int64,
                           count=len(terminals))

    def hours_to_load(self, hours: np.ndarray) -> list[int]:
        """Buckets that the windows of these event hours need and that are not cached."""
        now = time.monotonic()
        for h in list(self.sums):
            if now - self.sums[h][0] > self.refresh_s:
                del self.sums[h]
                self.buckets.clear()  # stale: other workers may have added labels
        needed: set[int] = set()
        unique_hours = np.unique(hours).tolist()
        for h in unique_hours:
            if h in self.sums:
                continue
            end = h - TERMINAL_DELAY_HOURS
            needed.update(range(end - _LONGEST_TERMINAL_HOURS - 1, end))
        # buckets far behind every hour in play are no longer needed
        self.evict_before(min(unique_hours) - TERMINAL_DELAY_HOURS - _LONGEST_TERMINAL_HOURS - 48)
        return sorted(b for b in needed if b not in self.buckets)

    def store(self, hour: int, chunks: list[bytes], frauds: dict[bytes, bytes]) -> None:
        """Cache one hour: `chunks` are the batches' "terminal\tcount" lines."""
        counts: dict[str, int] = {}
        for chunk in chunks:
            for line in chunk.decode().splitlines():
                name, _, c = line.rpartition("\t")
                counts[name] = counts.get(name, 0) + int(c)
        names = list(counts)
        idx = self.idx(names)
        c = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
        f = np.zeros(len(names), dtype=np.int64)
        if frauds:
            pos = {name: i for i, name in enumerate(names)}
            for k, v in frauds.items():
                name = k.decode()
                if name not in pos:  # a label for a transaction counted elsewhere
                    pos[name] = len(names)
                    names.append(name)
                    idx = np.append(idx, self.idx([name]))
                    c = np.append(c, 0)
                    f = np.append(f, 0)
                f[pos[name]] = int(v)
        self.buckets[hour] = (idx, c, f)

    def add_counts(self, hour: int, names: list[str], counts: list[int]) -> None:
        """Keep a cached bucket in step with transactions this worker just wrote into it."""
        if hour in self.buckets:
            idx, c, f = self.buckets[hour]
            new_idx = self.idx(names)
            self.buckets[hour] = (np.concatenate([idx, new_idx]),
                                  np.concatenate([c, np.asarray(counts, dtype=np.int64)]),
                                  np.concatenate([f, np.zeros(len(names), dtype=np.int64)]))
        for h in [h for h in self.sums if h - TERMINAL_DELAY_HOURS - _LONGEST_TERMINAL_HOURS - 1
                  <= hour < h - TERMINAL_DELAY_HOURS]:
            del self.sums[h]

    def add_fraud(self, hour: int, terminal: str) -> None:
        """Keep a cached bucket in step with a label this worker applied."""
        if hour in self.buckets:
            idx, c, f = self.buckets[hour]
            t = self.idx([terminal])[0]
            hit = np.flatnonzero(idx == t)
            if hit.size:
                f = f.copy()
                f[hit[0]] += 1
            else:
                idx, c, f = np.append(idx, t), np.append(c, 0), np.append(f, 1)
            self.buckets[hour] = (idx, c, f)
        for h in [h for h in self.sums if h - TERMINAL_DELAY_HOURS - _LONGEST_TERMINAL_HOURS
                  <= hour < h - TERMINAL_DELAY_HOURS]:
            del self.sums[h]

    def window_sums(self, hour: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per-terminal counts and on-time frauds of the delayed windows at `hour`."""
        cached = self.sums.get(hour)
        if cached is not None:
            return cached[1], cached[2]
        size = len(self.index)
        prev = self.sums.get(hour - 1)
        counts, frauds = {}, {}
        for d, (first, end) in terminal_window_bounds(np.array([hour])).items():
            lo, hi = int(first[0]), int(end[0])
            if prev is not None:  # slide by one hour: add the newest bucket, drop the oldest
                c, f = _grown(prev[1][d], size), _grown(prev[2][d], size)
                self._add(c, f, hi - 1, +1)
                self._add(c, f, lo - 1, -1)
            else:
                c = np.zeros(size, dtype=np.int64)
                f = np.zeros(size, dtype=np.int64)
                for b in range(lo, hi):
                    self._add(c, f, b, +1)
            counts[d], frauds[d] = c, f
        self.sums[hour] = (prev[0] if prev is not None else time.monotonic(), counts, frauds)
        for old in sorted(self.sums)[:-4]:  # a few recent hours are enough
            del self.sums[old]
        return counts, frauds

    def _add(self, c: np.ndarray, f: np.ndarray, bucket: int, sign: int) -> None:
        part = self.buckets.get(bucket)
        if part is None:
            return
        idx, bc, bf = part
        c += sign * np.bincount(idx, weights=bc, minlength=len(c)).astype(np.int64)[: len(c)]
        f += sign * np.bincount(idx, weights=bf, minlength=len(f)).astype(np.int64)[: len(f)]

    def evict_before(self, hour: int) -> None:
        for b in [b for b in self.buckets if b < hour]:
            del self.buckets[b]


def _add_same_batch(term_idx: np.ndarray, hours: np.ndarray,
                    counts: dict[int, np.ndarray]) -> None:
    """Count the batch's own events in each other's delayed windows (a batch that spans more
    than the 7-day delay, as when replaying history in large batches)."""
    if len(hours) == 0 or int(hours.max() - hours.min()) < TERMINAL_DELAY_HOURS:
        return
    span = int(hours.max() - hours.min()) + TERMINAL_DELAY_HOURS + _LONGEST_TERMINAL_HOURS + 2
    base = int(hours.min()) - TERMINAL_DELAY_HOURS - _LONGEST_TERMINAL_HOURS - 1
    key = np.sort(term_idx * span + (hours - base))
    for d, (first, end) in terminal_window_bounds(hours).items():
        lo = np.searchsorted(key, term_idx * span + (first - base), side="left")
        hi = np.searchsorted(key, term_idx * span + (end - base), side="left")
        counts[d] += hi - lo


def _grown(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=a.dtype)
    out[: len(a)] = a
    return out


class RedisFeatureStore:
    """Features for micro-batches (`update_many`) and label feedback (`apply_labels`)."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "fs",
        snapshot_ttl_s: int = 86_400,
        cache_cards: int = 500_000,
        terminal_refresh_s: float = 300.0,
    ) -> None:
        self._r = client
        self._ns = namespace
        self._ttl = snapshot_ttl_s
        # card token → (its recent events as CARD_EVENT bytes, event time of the last full
        # rewrite or None when unknown)
        self._cards: OrderedDict[str, tuple[bytes, int | None]] = OrderedDict()
        self._cache_cards = cache_cards
        self._terminals = _TerminalWindows(terminal_refresh_s)
        self._write_script = client.register_script(_WRITE_BATCH)

    # ---- keys ---------------------------------------------------------------------------

    def _k(self, kind: str, tag: object) -> str:
        return f"{self._ns}:{kind}:{{{tag}}}"

    def invalidate(self) -> None:
        """Forget cached card state (after a rebalance another worker may own the cards)."""
        self._cards.clear()

    def exchange_progress(self, topic: str, mine: dict[int, tuple[int, bool]],
                          fresh_s: float = 60.0) -> dict[int, tuple[int, bool]]:
        """Publish this worker's partitions' (latest event time µs, data left) and return
        every worker's, in one round trip: the engine aligns partitions across workers.
        Entries nobody refreshed for `fresh_s` (a partition whose owner died and has not
        been reassigned yet, or that no longer exists) stop holding the others back."""
        key = self._k("progress", topic)
        now_ms = int(time.time() * 1000)
        try:
            pipe = self._r.pipeline(transaction=False)
            if mine:
                pipe.hset(key, mapping={str(p): f"{t}:{int(left)}:{now_ms}"
                                        for p, (t, left) in mine.items()})
            pipe.hgetall(key)
            everyone = pipe.execute()[-1]
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"partition progress: {exc}") from exc
        out: dict[int, tuple[int, bool]] = {}
        for p, v in everyone.items():
            t, left, at = v.decode().split(":")
            if now_ms - int(at) <= fresh_s * 1000:
                out[int(p)] = (int(t), left == "1")
        return out

    def ping(self) -> None:
        """Raise :class:`FeatureStoreUnavailable` unless Redis answers (readiness checks)."""
        try:
            self._r.ping()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"ping: {exc}") from exc

    # ---- events -------------------------------------------------------------------------

    def update_many(self, batch: EventBatch) -> np.ndarray:
        """Features for a batch (rows in input order), applying each new event exactly once."""
        n = len(batch)
        if n == 0:
            return np.empty((0, N_FEATURES), dtype=np.float64)
        _check(batch)
        tx_ids = list(batch.transaction_ids)
        ev_hours = hours_of(batch.t_us)
        seen_rows = {int(h): np.flatnonzero(ev_hours == h) for h in np.unique(ev_hours)}
        cards = list(dict.fromkeys(batch.cards))
        missing = [c for c in cards if c not in self._cards]
        terminals = list(dict.fromkeys(batch.terminals.tolist()))
        load_hours = self._terminals.hours_to_load(ev_hours)

        replies = self._read(tx_ids, seen_rows, cards, missing, terminals, load_hours)
        snapshots, card_blobs, card_labels, term_labels, buckets = replies
        for c, blob in zip(missing, card_blobs, strict=True):
            self._remember(c, _whole_records(blob), None)
        for h, (counts, frauds) in zip(load_hours, buckets, strict=True):
            self._terminals.store(h, counts, frauds)

        out = np.empty((n, N_FEATURES), dtype=np.float64)
        replayed = np.zeros(n, dtype=bool)
        for rows, values in zip(seen_rows.values(), snapshots, strict=True):
            for i, v in zip(rows, values, strict=True):
                if v is not None and len(v) == _FEATURE_BYTES:
                    out[i] = np.frombuffer(v, dtype="<f8")
                    replayed[i] = True
        _, first, dup_of = np.unique(np.asarray(tx_ids, dtype=object), return_index=True,
                                     return_inverse=True)
        first_of = first[dup_of]
        fresh = np.flatnonzero(~replayed & (first_of == np.arange(n)))
        copies = np.flatnonzero(~replayed & (first_of != np.arange(n)))
        if fresh.size:
            computed = self._compute(batch, fresh, cards, card_labels, terminals, term_labels,
                                     out)
            self._write(batch, fresh, out, tx_ids, cards, computed)
        out[copies] = out[first_of[copies]]
        return out

    def _read(self, tx_ids: list[str], seen_rows: dict[int, np.ndarray], cards: list[str],
              missing: list[str], terminals: list[str], load_hours: list[int]) -> tuple:
        try:
            pipe = self._r.pipeline(transaction=False)
            for hour, rows in seen_rows.items():
                pipe.hmget(self._k("seen", hour), [tx_ids[i] for i in rows])
            if missing:
                pipe.mget([self._k("card", c) for c in missing])
            card_shards = self._read_counters(pipe, "cl", cards)
            term_shards = self._read_counters(pipe, "tl", terminals)
            for h in load_hours:
                pipe.lrange(self._k("th", h), 0, -1)
                pipe.hgetall(self._k("tf", h))
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"reading feature state: {exc}") from exc
        k = len(seen_rows)
        snapshots = replies[:k]
        if missing:
            card_blobs = replies[k]
            k += 1
        else:
            card_blobs = []
        card_labels = _decode_counters(card_shards, replies[k:k + len(card_shards)], len(cards))
        k += len(card_shards)
        term_labels = _decode_counters(term_shards, replies[k:k + len(term_shards)],
                                       len(terminals))
        k += len(term_shards)
        flat = replies[k:]
        buckets = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(load_hours))]
        return snapshots, card_blobs, card_labels, term_labels, buckets

    def _read_counters(self, pipe: redis.client.Pipeline, kind: str, names: list[str]
                       ) -> list[np.ndarray]:
        """Queue one HMGET per shard hash; returns the name positions of each shard."""
        shards = np.fromiter((zlib.crc32(nm.encode()) % _SHARDS for nm in names), dtype=np.int64,
                             count=len(names))
        groups = []
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            fields = [f"{names[i]}{suffix}" for i in rows for suffix in (":n", ":f")]
            pipe.hmget(self._k(kind, int(shard)), fields)
            groups.append(rows)
        return groups

    def _incr_counters(self, pipe: redis.client.Pipeline, kind: str, names: np.ndarray,
                       fraud: np.ndarray) -> None:
        """Add one label (and `fraud`) per row to each name's counters, aggregated."""
        uniq, inverse = np.unique(names.astype(str), return_inverse=True)
        n = np.bincount(inverse, minlength=len(uniq))
        f = np.bincount(inverse, weights=fraud.astype(np.int64), minlength=len(uniq))
        for name, cn, cf in zip(uniq.tolist(), n.tolist(), f.astype(np.int64).tolist(),
                                strict=True):
            key = self._k(kind, zlib.crc32(name.encode()) % _SHARDS)
            pipe.hincrby(key, f"{name}:n", cn)
            if cf:
                pipe.hincrby(key, f"{name}:f", cf)

    def _remember(self, card: str, blob: bytes, rewritten_us: int | None) -> None:
        self._cards[card] = (blob, rewritten_us)
        self._cards.move_to_end(card)
        while len(self._cards) > self._cache_cards:
            self._cards.popitem(last=False)

    def _compute(self, batch: EventBatch, fresh: np.ndarray, cards: list[str],
                 card_labels: np.ndarray, terminals: list[str],
                 term_labels: np.ndarray, out: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Features of the fresh rows into `out`; returns what `_write` persists."""
        t_us = batch.t_us[fresh]
        res = np.zeros((len(fresh), N_FEATURES), dtype=np.float64)
        transaction_features(t_us, batch.amount[fresh], res)

        # card windows: stored recent events of these cards, then the fresh events
        card_pos = {c: i for i, c in enumerate(cards)}
        batch_card = np.fromiter((card_pos[batch.cards[i]] for i in fresh), dtype=np.int64,
                                 count=len(fresh))
        blobs = [self._cards[c][0] for c in cards]
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        lengths //= CARD_EVENT.itemsize
        stored = np.frombuffer(b"".join(blobs), dtype=CARD_EVENT)
        hist_card = np.repeat(np.arange(len(cards)), lengths)
        recent = stored["t_us"] > int(t_us.min()) - CARD_LOOKBACK_US
        stored, hist_card = stored[recent], hist_card[recent]
        events = CardEvents(
            card=np.concatenate([hist_card, batch_card]),
            t_us=np.concatenate([stored["t_us"], t_us]),
            amount=np.concatenate([stored["amount"], batch.amount[fresh]]),
            terminal=np.concatenate([stored["terminal"], batch.terminal_keys[fresh]]),
            device=np.concatenate([stored["device"], batch.device[fresh]]),
            country=np.concatenate([stored["country"], batch.country[fresh]]),
        )
        card_part = np.zeros((len(fresh), N_FEATURES), dtype=np.float64)
        card_features(events, card_part, rows=np.arange(len(stored), len(events)),
                      order=sorted_order(events, stored=len(stored)))
        res[:, _CARD_COLS] = card_part[:, _CARD_COLS]
        kept = np.bincount(hist_card, minlength=len(cards))

        # terminal windows from the cached hour buckets
        term_idx = self._terminals.idx(batch.terminals[fresh].tolist())
        hours = hours_of(t_us)
        counts = {d: np.zeros(len(fresh), dtype=np.int64) for d in TERMINAL_WINDOWS_DAYS}
        frauds = {d: np.zeros(len(fresh), dtype=np.int64) for d in TERMINAL_WINDOWS_DAYS}
        for h in np.unique(hours):
            rows = np.flatnonzero(hours == h)
            c_sum, f_sum = self._terminals.window_sums(int(h))
            idx = term_idx[rows]
            inside = idx < len(next(iter(c_sum.values())))
            for d in TERMINAL_WINDOWS_DAYS:
                counts[d][rows[inside]] = c_sum[d][idx[inside]]
                frauds[d][rows[inside]] = f_sum[d][idx[inside]]
        _add_same_batch(term_idx, hours, counts)
        terminal_columns(counts, frauds, res)

        # labels reported so far
        cl = card_labels[batch_card]
        res[:, INDEX["card_label_fraud_rate"]] = label_rate(cl[:, 0], cl[:, 1])
        term_pos = {t: i for i, t in enumerate(terminals)}
        tpos = np.fromiter((term_pos[t] for t in batch.terminals[fresh].tolist()),
                           dtype=np.int64, count=len(fresh))
        tl = term_labels[tpos]
        res[:, INDEX["terminal_label_fraud_rate"]] = label_rate(tl[:, 0], tl[:, 1])
        out[fresh] = res

        # the new events join the cached history (trimmed to the lookback)
        new = np.empty(len(fresh), dtype=CARD_EVENT)
        new["t_us"], new["amount"] = t_us, batch.amount[fresh]
        new["terminal"], new["device"] = batch.terminal_keys[fresh], batch.device[fresh]
        new["country"] = batch.country[fresh]
        return batch_card, new, kept

    def _write(self, batch: EventBatch, fresh: np.ndarray, out: np.ndarray, tx_ids: list[str],
               cards: list[str], computed: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Persist the fresh events, their terminal counts and feature snapshots in one
        atomic script call (one command, so the client does not pack a thousand).

        A card's blob is appended to; it is rewritten (trimmed, with a fresh TTL) at most
        about once a day, or when most of it has aged out of the lookback.
        """
        batch_card, new, kept = computed
        order = np.argsort(batch_card, kind="stable")
        bounds = np.searchsorted(batch_card[order], np.arange(len(cards) + 1))
        added_all = new[order].tobytes()
        size = CARD_EVENT.itemsize
        now_us = int(batch.t_us[fresh].max())
        horizon = int(batch.t_us[fresh].min()) - CARD_LOOKBACK_US
        keys: list[str] = []
        args: list[bytes | str | int] = []
        updated: dict[str, tuple[bytes, int | None]] = {}
        for ci, card in enumerate(cards):
            lo, hi = int(bounds[ci]), int(bounds[ci + 1])
            if hi == lo:
                continue
            blob, rewritten = self._cards[card]
            added = added_all[lo * size:hi * size]
            total = len(blob) // size
            if rewritten is None or now_us - rewritten > DAY_US or (total - kept[ci]) * 4 > total:
                events = np.frombuffer(blob, dtype=CARD_EVENT)
                merged = events[events["t_us"] > horizon].tobytes() + added
                args += ["s", merged]
                updated[card] = (merged, now_us)
            else:
                args += ["a", added]
                updated[card] = (blob + added, rewritten)
            keys.append(self._k("card", card))
        n_cards = len(keys)
        hours = hours_of(batch.t_us[fresh])
        terms = batch.terminals[fresh]
        unique_hours = np.unique(hours)
        written: list[tuple[int, list[str], list[int]]] = []
        for h in unique_hours:
            rows = np.flatnonzero(hours == h)
            names, counts = np.unique(terms[rows].astype(str), return_counts=True)
            written.append((int(h), names.tolist(), counts.tolist()))
            keys += [self._k("th", int(h)), self._k("seen", int(h))]
            args.append("".join(f"{name}\t{c}\n" for name, c in
                                zip(names.tolist(), counts.tolist(), strict=True)))
            args.append(len(rows))
            for i in rows:
                args += [tx_ids[fresh[i]], out[fresh[i]].astype("<f8").tobytes()]
        bucket_ttl = int((TERMINAL_DELAY_HOURS + _LONGEST_TERMINAL_HOURS + 48) * 3600)
        header = [n_cards, _CARD_TTL_MS, bucket_ttl, self._ttl, len(unique_hours)]
        try:
            self._write_script(keys=keys, args=header + args)
        except redis.RedisError as exc:
            for card in cards:  # our cache may now be ahead of Redis: reload next time
                self._cards.pop(card, None)
            raise FeatureStoreUnavailable(f"writing feature state: {exc}") from exc
        for card, (blob, rewritten) in updated.items():
            self._remember(card, blob, rewritten)
        for hour, names, counts in written:
            self._terminals.add_counts(hour, names, counts)

    # ---- labels -------------------------------------------------------------------------

    def apply_labels(self, labels: LabelBatch) -> int:
        """Apply fraud reports once each (first report wins); returns how many were new."""
        n = len(labels.transaction_ids)
        if n == 0:
            return 0
        tx_ids = list(labels.transaction_ids)
        hours = hours_of(labels.t_us)
        groups = {int(h): np.flatnonzero(hours == h) for h in np.unique(hours)}
        try:
            pipe = self._r.pipeline(transaction=False)
            for h, rows in groups.items():
                pipe.hmget(self._k("lab", h), [tx_ids[i] for i in rows])
            known = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"reading labels: {exc}") from exc
        new = np.ones(n, dtype=bool)
        for rows, values in zip(groups.values(), known, strict=True):
            new[rows] = [v is None for v in values]
        _, first = np.unique(np.asarray(tx_ids, dtype=object), return_index=True)
        once = np.zeros(n, dtype=bool)
        once[first] = True
        apply = np.flatnonzero(new & once)
        if apply.size == 0:
            return 0
        delay_us = TERMINAL_DELAY_HOURS * HOUR_US
        label_ttl = int((delay_us // 1_000_000) + 40 * 86_400)
        fraud = labels.is_fraud[apply].astype(bool)
        on_time = fraud & (labels.reported_us[apply] <= labels.t_us[apply] + delay_us)
        terms = np.asarray(labels.terminals, dtype=object)[apply]
        try:
            pipe = self._r.pipeline(transaction=True)
            for h in np.unique(hours[apply]):
                rows = apply[hours[apply] == h]
                key = self._k("lab", int(h))
                pipe.hset(key, mapping={tx_ids[i]: int(bool(labels.is_fraud[i])) for i in rows})
                pipe.expire(key, label_ttl)
            self._incr_counters(pipe, "cl", np.asarray(labels.cards, dtype=object)[apply], fraud)
            self._incr_counters(pipe, "tl", terms, fraud)
            pairs = {}
            for h, term in zip(hours[apply][on_time].tolist(), terms[on_time].tolist(),
                               strict=True):
                pairs[(h, term)] = pairs.get((h, term), 0) + 1
            for (h, term), c in pairs.items():
                pipe.hincrby(self._k("tf", h), term, c)
            pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"writing labels: {exc}") from exc
        for (h, term), c in pairs.items():
            for _ in range(c):
                self._terminals.add_fraud(h, term)
        return int(apply.size)


    # ---- bootstrap ----------------------------------------------------------------------

    def load_history(self, events: EventBatch, labels: LabelBatch, until_us: int,
                     chunk: int = 5_000) -> None:
        """Write the state a stream would have left at `until_us`, from a whole history.

        Much faster than streaming it (no per-batch features), and the result is the same:
        the last 30 days of each card, the terminal hour buckets, and the labels reported
        so far (first report per transaction).
        """
        before = events.t_us < until_us
        t_us = events.t_us[before]
        cards = np.asarray(events.cards, dtype=object)[before]
        recent = t_us > until_us - CARD_LOOKBACK_US - DAY_US
        rec = np.empty(int(recent.sum()), dtype=CARD_EVENT)
        rec["t_us"] = t_us[recent]
        rec["amount"] = events.amount[before][recent]
        rec["terminal"] = events.terminal_keys[before][recent]
        rec["device"] = events.device[before][recent]
        rec["country"] = events.country[before][recent]
        owner = cards[recent]
        order = np.argsort(owner, kind="stable")
        names, starts = np.unique(owner[order], return_index=True)
        ends = np.r_[starts[1:], len(order)]
        card_ttl_ms = int((CARD_LOOKBACK_US + DAY_US) // 1000)
        pipe = self._r.pipeline(transaction=False)
        for name, a, b in zip(names.tolist(), starts, ends, strict=True):
            pipe.set(self._k("card", name), rec[order[a:b]].tobytes(), px=card_ttl_ms)
            if len(pipe) >= chunk:
                pipe.execute()
        hours = hours_of(t_us)
        terms = np.asarray(events.terminals, dtype=object)[before].astype(str)
        keep = hours >= hours_of(np.array([until_us]))[0] - TERMINAL_DELAY_HOURS \
            - _LONGEST_TERMINAL_HOURS - 2
        pairs = np.char.add(np.char.add(hours[keep].astype(str), "|"), terms[keep])
        uniq, counts = np.unique(pairs, return_counts=True)
        by_hour: dict[str, dict[str, int]] = {}
        for pair, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            h, term = pair.split("|", 1)
            by_hour.setdefault(h, {})[term] = c
        for h, mapping in by_hour.items():
            pipe.rpush(self._k("th", int(h)),
                       "".join(f"{name}\t{c}\n" for name, c in mapping.items()))
            if len(pipe) >= chunk:
                pipe.execute()
        pipe.execute()
        self.invalidate()
        self._terminals = _TerminalWindows(self._terminals.refresh_s)
        self._load_labels(labels, until_us, chunk)

    def _load_labels(self, labels: LabelBatch, until_us: int, chunk: int) -> None:
        """Labels reported by `until_us`, aggregated: the first report per transaction."""
        rep = labels.reported_us <= until_us
        ids = np.asarray(labels.transaction_ids, dtype=object)[rep]
        order = np.lexsort((ids.astype(str), labels.reported_us[rep]))
        _, first = np.unique(ids[order], return_index=True)
        pick = np.flatnonzero(rep)[order[first]]
        fraud = labels.is_fraud[pick].astype(np.int64)
        hours = hours_of(labels.t_us[pick])
        pipe = self._r.pipeline(transaction=False)
        for h in np.unique(hours):
            rows = pick[hours == h]
            pipe.hset(self._k("lab", int(h)), mapping={
                labels.transaction_ids[i]: int(bool(labels.is_fraud[i])) for i in rows})
        for kind, owners in (("cl", labels.cards), ("tl", labels.terminals)):
            self._incr_counters(pipe, kind, np.asarray(owners, dtype=object)[pick], fraud)
        on_time = labels.is_fraud[pick] & (
            labels.reported_us[pick] <= labels.t_us[pick] + TERMINAL_DELAY_HOURS * HOUR_US)
        for h in np.unique(hours[on_time]):
            rows = pick[on_time & (hours == h)]
            terms, c = np.unique(np.asarray(labels.terminals, dtype=object)[rows].astype(str),
                                 return_counts=True)
            pipe.hset(self._k("tf", int(h)), mapping=dict(zip(terms.tolist(), c.tolist(),
                                                              strict=True)))
        pipe.execute()


_CARD_COLS = [INDEX[name] for name in FEATURE_NAMES if name.startswith("card_")
              and name != "card_label_fraud_rate"]


class InvalidEvent(ValueError):
    """An event that must not reach the state; the message names the row and the reason."""


def _check(batch: EventBatch) -> None:
    """Refuse the whole batch before anything is read or written: bad rows never reach state."""
    bad_amount = ~(np.isfinite(batch.amount) & (batch.amount > 0))
    if bad_amount.any():
        i = int(np.flatnonzero(bad_amount)[0])
        raise InvalidEvent(f"row {i}: amount must be a finite number > 0")
    for name, values in (("transaction_id", batch.transaction_ids), ("card", batch.cards),
                         ("terminal", batch.terminals)):
        missing = [i for i, v in enumerate(values) if not isinstance(v, str) or not v]
        if missing:
            raise InvalidEvent(f"row {missing[0]}: missing {name}")


def _whole_records(blob: bytes | None) -> bytes:
    """Stored card events; a blob that is not whole records is treated as empty."""
    if not blob or len(blob) % CARD_EVENT.itemsize:
        return b""
    return bytes(blob)


def _decode_counters(groups: list[np.ndarray], replies: list[list[bytes | None]], n: int
                     ) -> np.ndarray:
    """(labels, frauds) per name from the shard HMGET replies; missing = 0."""
    out = np.zeros((n, 2), dtype=np.int64)
    for rows, values in zip(groups, replies, strict=True):
        flat = np.array([int(v) if v is not None else 0 for v in values], dtype=np.int64)
        out[rows] = flat.reshape(len(rows), 2)
    return out
