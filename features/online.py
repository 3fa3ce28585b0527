"""Online feature state: the owned cards in worker memory, Redis the durable shared copy.

Per micro-batch the store makes at most one read (new label-log entries, and only what is
not cached yet) and one write (one atomic Lua call per shard touched: card appends, one
terminal chunk per event hour). The cards are spread over a fixed number of **shards**
(``shards``, recorded per namespace), each one hash slot, so on Redis Cluster every shard's
script touches one slot and the shards spread over the primaries; the label state shares
one more slot, since its counters and log must change together. On one Redis primary the
read is one MULTI; on a Cluster it is one MULTI on the label slot and one pipeline for the
cards and buckets (routed per node). Keys (``S`` = the card's shard, ``crc32(token) %
shards``):

- ``{ns}:card92:{<ns>.s<S>}:<token>``: the card's recent events, ``CARD_RECORD`` each (92
  bytes: the window inputs, the transaction id's 64-bit hash, and the terminal and label
  counts the event was scored with, so a redelivered event is recognised and gets its first
  features back), appended each batch, rewritten when trimmed to 31 days;
- ``{ns}:tb:{<ns>.s<S>}:<hour>``: per shard and event hour a list with one chunk per batch:
  the 64-bit keys (``terminal_keys``) of the terminals of that shard's events and their
  transaction counts; a reader sums every shard's chunks (chunks of length-prefixed names,
  the format before keys, are still read);
- label state, all in slot ``{<ns>.lab}``: ``{ns}:cl:…`` / ``{ns}:tl:…`` labels so far per
  card / terminal, one field per name holding ``labels + frauds << 32``;
  ``{ns}:tf:…:<hour>`` terminal → on-time frauds, for the delayed terminal windows;
  ``{ns}:lab:…:<hour>`` transaction id → its first label (label redelivery);
  ``{ns}:lablog:…`` / ``{ns}:labseq:…``: a capped stream with one entry per applied label
  batch (sequence-numbered), which every worker tails to keep its cached label counts and
  terminal buckets exact whichever worker applied the labels.

After a rebalance the engine calls :meth:`RedisFeatureStore.invalidate` (the card cache is
dropped; label caches are global and stay valid through the log). A worker that misses log
entries (a gap in the sequence) drops its label caches and reloads what it needs.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b

import numpy as np
import pandas as pd
import redis

from features.card_arena import CARD_KIND, CARD_RECORD, CardArena, take_records
from features.definitions import (
    CARD_LOOKBACK_US,
    DAY_US,
    HOUR_US,
    INDEX,
    N_FEATURES,
    TERMINAL_DELAY_HOURS,
    TERMINAL_WINDOWS_DAYS,
)
from features.windows import (
    hours_of,
    label_rate,
    terminal_columns,
    terminal_window_bounds,
    transaction_features,
)

_N_WIN = len(TERMINAL_WINDOWS_DAYS)
_CARD_LAB, _TERM_LAB = 2 * _N_WIN, 2 * _N_WIN + 2
_LONGEST_TERMINAL_HOURS = 24 * max(TERMINAL_WINDOWS_DAYS)
_SPARE_SUMS = 2 * _N_WIN  # window-sum arrays kept for reuse: one event hour's worth
# Event hours whose window sums a worker keeps, the least recently used dropped first. A
# worker's partitions sit at different hours (up to the partition alignment bound apart):
# each partition's current hour must stay, or every hour it enters is summed from scratch
# (~1,500 bucket additions instead of 10). Keeping the 4 *newest* hours did that to the
# partitions behind: 70 of 308 window sums in a 200,000-event drain started from scratch.
_SUM_HOURS = 6
# Redelivered events up to this much older than their card's newest event get exactly
# their first features back (the card keeps that much history beyond the lookback).
REDELIVERY_US = DAY_US
_KEEP_US = CARD_LOOKBACK_US + REDELIVERY_US
_RENEW_S = 86_400.0  # a worker renews a card key's TTL at most daily (wall clock)
TRIM_SLACK_US = 7 * DAY_US  # records older than kept linger up to this long (memory vs CPU)
# refreshed by every write: an idle card expires whole
_CARD_TTL_MS = (_KEEP_US + TRIM_SLACK_US) // 1000
_BUCKET_TTL_S = (TERMINAL_DELAY_HOURS + _LONGEST_TERMINAL_HOURS + 48) * 3600
_LABEL_TTL_S = TERMINAL_DELAY_HOURS * 3600 + 40 * 86_400  # "already labelled" is kept this long
_LOG_MAXLEN = 4096  # label-log entries kept (one per applied label batch)
_LOG_READ = 1024  # entries read per batch; more means "too far behind": reload instead
_LOW32 = (1 << 32) - 1

# One batch's writes, atomically. KEYS: cards to append to, cards to trim (or replace), then
# one terminal bucket per event hour. ARGV: per appended card "1" (renew its TTL) or "0",
# the number of appended cards, the number of trimmed ones, card TTL (ms), bucket TTL (s),
# every appended card's new records in one buffer, their byte lengths ("92 184 ..."); per
# trimmed card the bytes to drop from its start (-1: replace the value) and its new
# records; per hour its (terminals, counts) chunk. Trimming happens here, so only new records
# cross the network.
_WRITE_BATCH = """
local renew, na, nt, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local blob, pos, i = ARGV[6], 1, 0
for len in string.gmatch(ARGV[7], '%d+') do
  i = i + 1
  local stop = pos + tonumber(len)
  redis.call('APPEND', KEYS[i], string.sub(blob, pos, stop - 1))
  if string.byte(renew, i) == 49 then redis.call('PEXPIRE', KEYS[i], ttl) end
  pos = stop
end
local a = 8
for i = na + 1, na + nt do
  local cut = tonumber(ARGV[a])
  local kept = ''
  if cut >= 0 then kept = redis.call('GETRANGE', KEYS[i], cut, -1) end
  redis.call('SET', KEYS[i], kept .. ARGV[a + 1], 'PX', ttl)
  a = a + 2
end
for k = na + nt + 1, #KEYS do
  redis.call('RPUSH', KEYS[k], ARGV[a])
  redis.call('EXPIRE', KEYS[k], ARGV[5])
  a = a + 1
end
return na + nt
"""
# Append one label batch to the log with the next sequence number. KEYS: log, sequence.
_LOG_LABELS = """
local seq = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, 'c', ARGV[2],
           't', ARGV[3], 'f', ARGV[4], 'h', ARGV[5])
return seq
"""


class FeatureStoreUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error; nothing was applied."""


class InvalidEvent(ValueError):
    """An event that must not reach the state; the message names the row and the reason."""


class StaleEvents(InvalidEvent):
    """Events older than their card's kept history (more than 31 days before its newest
    event): whether they were applied before cannot be known, so none of the batch was
    applied; the caller dead-letters `rows` and sends the rest again."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.reason = (f"event time more than {_KEEP_US // DAY_US} days before its card's "
                       "newest event: too late to apply exactly once")
        super().__init__(f"row {int(rows[0])}: {self.reason} ({len(rows)} such rows)")


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
class _PendingWrite:
    # per connection (one per Redis node written to): its pool, and the script calls sent
    # on it, (keys, args) each, whose replies are not read yet
    sends: list[tuple[redis.ConnectionPool, redis.Connection,
                      list[tuple[list[str], list[bytes | int | str]]]]]
    cards: list[str]  # the batch's cards: dropped from the cache if the write fails


@dataclass(frozen=True)
class LabelBatch:
    transaction_ids: Sequence[str]
    cards: Sequence[str]
    terminals: Sequence[str]
    t_us: np.ndarray  # the transaction's event time
    reported_us: np.ndarray
    is_fraud: np.ndarray  # bool


def transaction_hashes(ids: Sequence[str]) -> np.ndarray:
    """64-bit keys of transaction ids (SipHash-2-4 with pandas' fixed key: stable)."""
    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


class _Counters:
    """Cached (labels, frauds) per name; Redis holds the truth, the label log the changes."""

    def __init__(self, limit: int = 2_000_000) -> None:
        self.limit = limit
        self.clear()

    def clear(self) -> None:
        self.slot: dict[str, int] = {}
        self.n = np.zeros(1024, dtype=np.int64)
        self.f = np.zeros(1024, dtype=np.int64)

    def missing(self, names: Sequence[str]) -> list[str]:
        slot = self.slot
        return [x for x in names if x not in slot]

    def put(self, names: Sequence[str], packed: Sequence[bytes | None]) -> None:
        if len(self.slot) + len(names) > self.limit:
            self.clear()  # reloaded on demand, a batch at a time
        start = len(self.slot)
        if start + len(names) > len(self.n):
            size = max(2 * len(self.n), start + len(names))
            self.n = np.resize(self.n, size)
            self.f = np.resize(self.f, size)
        v = np.fromiter((int(p) if p is not None else 0 for p in packed), dtype=np.int64,
                        count=len(packed))
        self.n[start:start + len(names)] = v & _LOW32
        self.f[start:start + len(names)] = v >> 32
        self.slot.update(zip(names, range(start, start + len(names)), strict=True))

    def get(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.fromiter(map(self.slot.__getitem__, names), dtype=np.int64, count=len(names))
        return self.n[idx], self.f[idx]

    def add(self, names: Sequence[str], fraud: np.ndarray) -> None:
        """One label per name (fraud or not), for cached names only."""
        get = self.slot.get
        idx = np.fromiter((get(x, -1) for x in names), dtype=np.int64, count=len(names))
        known = idx >= 0
        np.add.at(self.n, idx[known], 1)
        np.add.at(self.f, idx[known], fraud[known].astype(np.int64))


class _TerminalCounters:
    """Cached (labels, frauds) per terminal, by the index `_TerminalWindows` gives it."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.loaded = np.zeros(0, dtype=bool)
        self.n = np.zeros(0, dtype=np.int64)
        self.f = np.zeros(0, dtype=np.int64)

    def _fit(self, size: int) -> None:
        if size > len(self.loaded):
            grow = max(size, 2 * len(self.loaded), 1024)
            self.loaded = _grown(self.loaded, grow)
            self.n, self.f = _grown(self.n, grow), _grown(self.f, grow)

    def missing(self, idx: np.ndarray) -> np.ndarray:
        self._fit(int(idx.max()) + 1 if len(idx) else 0)
        return idx[~self.loaded[idx]]

    def put(self, idx: Sequence[int], packed: Sequence[bytes | None]) -> None:
        v = np.fromiter((int(p) if p is not None else 0 for p in packed), dtype=np.int64,
                        count=len(packed))
        at = np.asarray(idx, dtype=np.int64)
        self.n[at], self.f[at], self.loaded[at] = v & _LOW32, v >> 32, True

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.n[idx], self.f[idx]

    def add(self, idx: np.ndarray, fraud: np.ndarray) -> None:
        """One label per row, for loaded terminals only."""
        self._fit(int(idx.max()) + 1 if len(idx) else 0)
        known = self.loaded[idx]
        np.add.at(self.n, idx[known], 1)
        np.add.at(self.f, idx[known], fraud[known].astype(np.int64))


class _TerminalWindows:
    """Worker-local hour buckets of every terminal and the window sums built from them."""

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self.index: dict[str, int] = {}
        self.names: list[str] = []  # "" until this worker sees the terminal's name
        self.keys = np.zeros(0, dtype=np.uint64)  # terminal_keys of each index
        self._sorted_keys = np.zeros(0, dtype=np.uint64)
        self._sorted_idx = np.zeros(0, dtype=np.int64)
        self.buckets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.sums: dict[int, tuple[float, dict[int, np.ndarray], dict[int, np.ndarray]]] = {}
        self._spare: list[np.ndarray] = []

    def idx(self, terminals: Sequence[str]) -> np.ndarray:
        index = self.index
        found = np.fromiter(map(index.get, terminals, itertools.repeat(-1)), dtype=np.int64,
                            count=len(terminals))
        if (found < 0).any():
            new = [t for t in dict.fromkeys(terminals) if t not in index]
            ids = self.idx_of_keys(terminal_keys(new)).tolist()
            for name, i in zip(new, ids, strict=True):
                self.names[i] = name
            index.update(zip(new, ids, strict=True))
            found = np.fromiter(map(index.__getitem__, terminals), dtype=np.int64,
                                count=len(terminals))
        return found

    def idx_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Indexes of terminals by key, new keys indexed on the way: a bucket written by
        other workers names terminals this one has not seen (its name comes when it does)."""
        sk = self._sorted_keys
        order = np.argsort(keys)  # sorted needles search 3x faster (0.3 ms for 8,000)
        pos = np.empty(len(keys), dtype=np.int64)
        pos[order] = np.minimum(np.searchsorted(sk, keys[order]), max(len(sk) - 1, 0))
        hit = sk[pos] == keys if len(sk) else np.zeros(len(keys), dtype=bool)
        out = np.empty(len(keys), dtype=np.int64)
        out[hit] = self._sorted_idx[pos[hit]]
        if not hit.all():
            fresh, inverse = np.unique(keys[~hit], return_inverse=True)
            ids = np.arange(len(self.names), len(self.names) + len(fresh), dtype=np.int64)
            self.names.extend([""] * len(fresh))
            self.keys = np.concatenate([self.keys, fresh])
            at = np.searchsorted(sk, fresh)  # one copy of the sorted map, not a sort
            self._sorted_keys = np.insert(sk, at, fresh)
            self._sorted_idx = np.insert(self._sorted_idx, at, ids)
            out[~hit] = ids[inverse.reshape(-1)]
        return out

    def clear(self) -> None:
        self.buckets.clear()
        self.sums.clear()

    def hours_to_load(self, hours: np.ndarray) -> list[int]:
        """Buckets that the windows of these event hours need and that are not cached."""
        now = time.monotonic()
        for h in list(self.sums):
            if now - self.sums[h][0] > self.refresh_s:
                self.clear()  # refresh: other workers' counts of late partitions
                break
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
        """Cache one hour: `chunks` are the batches' (terminal keys, counts) (a terminal may
        repeat: the window sums add them up)."""
        parts = [_unpack_counts(chunk) for chunk in chunks]
        keys = np.concatenate([np.zeros(0, dtype=np.uint64), *[k for k, _ in parts]])
        fraud_idx = self.idx([k.decode() for k in frauds])
        idx = np.concatenate([self.idx_of_keys(keys), fraud_idx])
        c = np.zeros(len(idx), dtype=np.int64)
        c[: len(keys)] = np.concatenate([np.zeros(0, dtype=np.int64), *[n for _, n in parts]])
        f = np.zeros(len(idx), dtype=np.int64)
        f[len(keys):] = [int(v) for v in frauds.values()]
        self.buckets[hour] = (idx, c, f)

    def add_counts(self, hour: int, idx: np.ndarray, counts: np.ndarray) -> None:
        """Keep a cached bucket in step with transactions this worker just wrote into it."""
        if hour in self.buckets:
            b_idx, c, f = self.buckets[hour]
            self.buckets[hour] = (np.concatenate([b_idx, idx]), np.concatenate([c, counts]),
                                  np.concatenate([f, np.zeros(len(idx), dtype=np.int64)]))
        self._forget_sums(hour)

    def add_frauds(self, hours: np.ndarray, terminals: Sequence[str]) -> None:
        """Keep cached buckets in step with on-time frauds applied (by any worker)."""
        for hour, terminal in zip(hours.tolist(), terminals, strict=True):
            if hour in self.buckets:
                idx, c, f = self.buckets[hour]
                self.buckets[hour] = (np.append(idx, self.idx([terminal])), np.append(c, 0),
                                      np.append(f, 1))
            self._forget_sums(hour)

    def _forget_sums(self, hour: int) -> None:
        for h in [h for h in self.sums if h - TERMINAL_DELAY_HOURS - _LONGEST_TERMINAL_HOURS - 1
                  <= hour < h - TERMINAL_DELAY_HOURS]:
            self._drop_sums(h)

    def _drop_sums(self, hour: int) -> None:
        _, counts, frauds = self.sums.pop(hour)
        self._spare = [*counts.values(), *frauds.values(), *self._spare][:_SPARE_SUMS]

    def _buffer(self, size: int, like: np.ndarray | None = None) -> np.ndarray:
        """A zeroed window-sum array for `size` terminals, `like`'s values first: a dropped
        hour's array when one is big enough. Fresh arrays cost their page faults (10 of
        200,000 terminals: about 1 ms a new event hour); these are already mapped. Arrays
        are longer than the terminals they count; the rest is 0."""
        for i, spare in enumerate(self._spare):
            if len(spare) >= size:
                out = self._spare.pop(i)
                break
        else:
            out = np.empty(size + size // 8 + 1024, dtype=np.int64)
        n = 0 if like is None else min(len(like), size)  # past `size`, `like` holds 0
        if like is not None:
            out[:n] = like[:n]
        out[n:] = 0
        return out

    def window_sums(self, hour: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per-terminal counts and on-time frauds of the delayed windows at `hour`."""
        cached = self.sums.pop(hour, None)
        if cached is not None:  # terminals indexed since then had no counts: 0 (caller)
            self.sums[hour] = cached  # most recently used last
            return cached[1], cached[2]
        size = len(self.names)
        prev = self.sums.get(hour - 1)
        counts, frauds = {}, {}
        for d, (first, end) in terminal_window_bounds(np.array([hour])).items():
            lo, hi = int(first[0]), int(end[0])
            if prev is not None:  # slide by one hour: add the newest bucket, drop the oldest
                c, f = self._buffer(size, prev[1][d]), self._buffer(size, prev[2][d])
                self._add(c, f, hi - 1, +1)
                self._add(c, f, lo - 1, -1)
            else:
                c, f = self._buffer(size), self._buffer(size)
                for b in range(lo, hi):
                    self._add(c, f, b, +1)
            counts[d], frauds[d] = c, f
        self.sums[hour] = (prev[0] if prev is not None else time.monotonic(), counts, frauds)
        while len(self.sums) > _SUM_HOURS:
            self._drop_sums(next(iter(self.sums)))  # the least recently used
        return counts, frauds

    def _add(self, c: np.ndarray, f: np.ndarray, bucket: int, sign: int) -> None:
        part = self.buckets.get(bucket)
        if part is None:
            return
        idx, bc, bf = part
        inside = idx < len(c)
        if not inside.all():
            idx, bc, bf = idx[inside], bc[inside], bf[inside]
        # scattered adds cost what the bucket holds, not what the worker has ever seen (a
        # bincount over 200,000 terminals took 3 ms)
        np.add.at(c, idx, bc if sign > 0 else -bc)
        np.add.at(f, idx, bf if sign > 0 else -bf)

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
        cache_cards: int = 250_000,
        terminal_refresh_s: float = 300.0,
        cache_labels: int = 2_000_000,
        shards: int = 1,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self._r = client
        self._ns = namespace
        self._shards = shards
        self._cluster = isinstance(client, redis.RedisCluster)
        # the owned cards' kept events, as in Redis; the least recently used are evicted
        self._arena = CardArena(cache_cards, key=self._card_key, shard=self._shard_of)
        self._terminals = _TerminalWindows(terminal_refresh_s)
        self._card_labels = _Counters(cache_labels)
        self._term_labels = _TerminalCounters()
        self._log_id: bytes | None = None  # the last label-log entry applied (None: unknown)
        self._log_seq = 0
        self._write_script = client.register_script(_WRITE_BATCH)
        self._pending: _PendingWrite | None = None  # a batch's write sent, reply not read

    # ---- keys ---------------------------------------------------------------------------

    def _k(self, kind: str, tag: object) -> str:
        return f"{self._ns}:{kind}:{{{tag}}}"

    def _shard_of(self, card: str) -> int:
        return zlib.crc32(card.encode()) % self._shards if self._shards > 1 else 0

    def _card_key(self, card: str) -> str:
        return f"{self._ns}:{CARD_KIND}:{{{self._ns}.s{self._shard_of(card)}}}:{card}"

    def _bucket_key(self, shard: int, hour: int) -> str:
        return f"{self._ns}:tb:{{{self._ns}.s{shard}}}:{hour}"

    def _lk(self, kind: str, part: object = None) -> str:
        """A key of the label state: all in one slot, as they change together."""
        key = f"{self._ns}:{kind}:{{{self._ns}.lab}}"
        return key if part is None else f"{key}:{part}"

    def check_shards(self) -> None:
        """Record this namespace's shard count on first use; raise ValueError when it was
        created with another (its cards would be looked for in the wrong slots)."""
        key = self._lk("shards")
        try:
            self._r.set(key, self._shards, nx=True)
            stored = int(self._r.get(key) or self._shards)
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"reading the shard count: {exc}") from exc
        if stored != self._shards:
            raise ValueError(f"namespace {self._ns!r} was created with {stored} shards, "
                             f"not {self._shards}")

    def invalidate(self) -> None:
        """Forget cached card state (after a rebalance another worker may own the cards)."""
        with contextlib.suppress(FeatureStoreUnavailable):  # the caches go below anyway
            self.flush()
        self._arena.clear()

    def exchange_progress(self, topic: str, mine: dict[int, tuple[int, bool]],
                          fresh_s: float = 60.0) -> dict[int, tuple[int, bool]]:
        """Publish this worker's partitions' (latest event time µs, data left) and return
        every worker's, in one round trip: the engine aligns partitions across workers.
        Entries nobody refreshed for `fresh_s` (a partition whose owner died and has not
        been reassigned yet, or that no longer exists) stop holding the others back."""
        self.flush()
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

    def update_many(self, batch: EventBatch, defer_write: bool = False) -> np.ndarray:
        """Features for a batch (rows in input order), applying each new event exactly once.

        An event whose transaction is already in its card's history (a redelivery) changes
        nothing and gets the features it got the first time; a repeat inside the batch gets
        those of its first occurrence. With `defer_write` the batch's write is sent but its
        reply is left for :meth:`flush`, so Redis applies it while the caller scores and
        emits the batch; the caller must flush before it commits the batch's outputs (any
        later call of this store flushes first).
        """
        self.flush()
        n = len(batch)
        if n == 0:
            return np.empty((0, N_FEATURES), dtype=np.float64)
        _check(batch)
        cards = list(dict.fromkeys(batch.cards))
        term_idx = self._terminals.idx(batch.terminals.tolist())
        self._sync(cards, np.unique(term_idx), hours_of(batch.t_us))
        arena = self._arena
        row_slot = arena.lookup(batch.cards)

        tx = transaction_hashes(batch.transaction_ids)
        _, first, inverse = np.unique(tx, return_index=True, return_inverse=True)
        first_of = first[inverse.reshape(-1)]
        is_first = first_of == np.arange(n)
        seen_at = arena.find(row_slot, batch.t_us, tx)
        new = is_first & (seen_at < 0)
        _refuse_stale(batch.t_us, new, arena.newest(row_slot), first_of)
        out = np.empty((n, N_FEATURES), dtype=np.float64)
        again = np.flatnonzero(is_first & (seen_at >= 0))
        if again.size:
            out[again] = self._features_of_stored(seen_at[again], row_slot[again])
        fresh = np.flatnonzero(new)
        if fresh.size:
            fresh_slot = row_slot[fresh]
            try:
                records, pos, res = self._compute(batch, fresh, fresh_slot, tx[fresh], term_idx)
                trims = self._write(fresh_slot, records, term_idx[fresh], cards)
                # Redis runs the write while the card windows are computed; aged-out
                # records leave the cache after that, as a long batch's oldest events
                # may still need them
                arena.features(pos, fresh_slot, res)
                out[fresh] = res
                arena.drop_head(*trims)
            except BaseException:
                self._forget(cards)  # the cache may hold what Redis does not: reload them
                raise
        copies = np.flatnonzero(~is_first)
        out[copies] = out[first_of[copies]]
        arena.evict()
        if not defer_write:
            self.flush()
        return out

    def flush(self) -> None:
        """Wait for the last batch's write; on failure the caches it touched are dropped
        (Redis may hold none, part or all of it: reloading tells) and
        :class:`FeatureStoreUnavailable` is raised."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        failure: redis.RedisError | None = None
        for pool, conn, calls in pending.sends:
            try:
                for keys, args in calls:
                    try:
                        conn.read_response()
                    except redis.exceptions.NoScriptError:  # Redis restarted: not applied
                        self._write_script(keys=keys, args=args)
            except redis.RedisError as exc:
                conn.disconnect()  # replies left unread on it must not reach the next user
                failure = failure or exc
            finally:
                pool.release(conn)
        if failure is not None:
            self._forget(pending.cards)
            if self._cluster and isinstance(failure, (redis.exceptions.MovedError,
                                                      redis.exceptions.AskError)):
                with contextlib.suppress(redis.RedisError):
                    self._r.nodes_manager.initialize()  # slots moved: route the retry anew
            raise FeatureStoreUnavailable(f"writing feature state: {failure}") from failure

    def _forget(self, cards: Sequence[str]) -> None:
        """Drop what a write that may have failed put in the caches: reloaded on demand."""
        self._arena.drop(cards)
        self._terminals.clear()

    def _sync(self, cards: list[str], terminals: np.ndarray, hours: np.ndarray) -> None:
        """Bring the caches up to date: label-log entries since the last batch, then
        whatever these events need that is not cached (cards, label counts, buckets). The
        label part is read atomically (one MULTI on the label slot), so the counts and the
        log position agree; cards and hour buckets need no such guarantee."""
        for _ in range(2):
            cached = self._arena.lookup(cards).tolist()
            missing = [c for c, slot in zip(cards, cached, strict=True) if slot < 0]
            by_shard: dict[int, list[str]] = {}
            for c in missing:
                by_shard.setdefault(self._shard_of(c), []).append(c)
            miss_cl = self._card_labels.missing(cards)
            miss_tl = self._term_labels.missing(terminals).tolist()
            load_hours = self._terminals.hours_to_load(hours)
            names = self._terminals.names
            labels: list[tuple[object, ...]] = [
                ("XREVRANGE", self._lk("lablog"), "+", "-", "COUNT", 1),
                ("GET", self._lk("labseq")),
            ] if self._log_id is None else [
                ("XRANGE", self._lk("lablog"), b"(" + self._log_id, "+", "COUNT", _LOG_READ)]
            cl_groups = [miss_cl] if miss_cl else []
            tl_groups = [[names[i] for i in miss_tl]] if miss_tl else []
            # one hash per kind: 16 shard hashes cost a batch about 30 HMGETs
            labels += [("HMGET", self._lk("cl"), *g) for g in cl_groups]
            labels += [("HMGET", self._lk("tl"), *g) for g in tl_groups]
            labels += [("HGETALL", self._lk("tf", h)) for h in load_hours]
            data: list[tuple[object, ...]] = [
                ("MGET", *[self._card_key(c) for c in group]) for group in by_shard.values()]
            data += [("LRANGE", self._bucket_key(shard, h), 0, -1)
                     for h in load_hours for shard in range(self._shards)]
            try:
                replies, rest = self._read(labels, data)
            except redis.RedisError as exc:
                raise FeatureStoreUnavailable(f"reading feature state: {exc}") from exc
            if self._log_id is None:
                last, now_seq = _stream(replies[0]), replies[1]
                self._log_id = last[0][0] if last else b"0-0"
                self._log_seq = int(now_seq or 0)
                k = 2
            else:
                if not self._apply_log(_stream(replies[0])):
                    # missed entries (trimmed or too many): start the label caches afresh
                    self._card_labels.clear()
                    self._term_labels.clear()
                    self._terminals.clear()
                    self._log_id = None
                    continue
                k = 1
            for members in cl_groups:
                self._card_labels.put(members, replies[k])
                k += 1
            index = self._terminals.index
            for members in tl_groups:
                self._term_labels.put([index[m] for m in members], replies[k])
                k += 1
            if by_shard:
                self._arena.load([c for group in by_shard.values() for c in group],
                                 [b for blobs in rest[:len(by_shard)] for b in blobs])
            j = len(by_shard)
            for h in load_hours:
                chunks = [c for part in rest[j:j + self._shards] for c in part]
                self._terminals.store(h, chunks, _as_dict(replies[k]))
                j += self._shards
                k += 1
            return
        raise FeatureStoreUnavailable("label log: entries keep going missing")

    def _read(self, atomic: list[tuple[object, ...]], rest: list[tuple[object, ...]]
              ) -> tuple[list, list]:
        """Replies of the commands `atomic` and `rest`: one MULTI for both on one Redis; on
        a Cluster a MULTI on `atomic`'s one slot, then `rest` routed per node. (Commands by
        name: a cluster pipeline refuses its mget() method, though one slot's MGET is fine.)"""
        pipe = self._r.pipeline(transaction=True)
        for cmd in atomic if self._cluster else [*atomic, *rest]:
            pipe.execute_command(*cmd)
        replies = pipe.execute()
        if not self._cluster:
            return replies[:len(atomic)], replies[len(atomic):]
        if not rest:
            return replies, []
        pipe = self._r.pipeline(transaction=False)
        for cmd in rest:
            pipe.execute_command(*cmd)
        return replies, pipe.execute()

    def _apply_log(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> bool:
        """Apply label batches logged since the last read to the cached counts; False when
        some were missed (the sequence has a gap) and the caches can no longer be trusted."""
        if not entries:
            return True
        if len(entries) >= _LOG_READ or int(entries[0][1][b"seq"]) != self._log_seq + 1:
            return False
        for entry_id, fields in entries:
            cards, terms = _unpack_names(fields[b"c"]), _unpack_names(fields[b"t"])
            flag = np.frombuffer(fields[b"f"], dtype=np.int8)
            self._card_labels.add(cards, flag > 0)
            self._term_labels.add(self._terminals.idx(terms), flag > 0)
            on_time = np.flatnonzero(flag == 2)
            if on_time.size:
                hours = np.frombuffer(fields[b"h"], dtype="<i8")[on_time]
                self._terminals.add_frauds(hours, [terms[i] for i in on_time])
            self._log_id, self._log_seq = entry_id, int(fields[b"seq"])
        return True

    def _compute(self, batch: EventBatch, fresh: np.ndarray, fresh_slot: np.ndarray,
                 tx: np.ndarray, term_idx: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fresh rows' records, added to the card cache, their arena positions and
        their features but the card windows (read from the cache by the caller)."""
        t_us = batch.t_us[fresh]
        amount = batch.amount[fresh]
        res = np.zeros((len(fresh), N_FEATURES), dtype=np.float64)
        transaction_features(t_us, amount, res)

        # terminal windows from the cached hour buckets
        term_idx = term_idx[fresh]
        hours = hours_of(t_us)
        counts = {d: np.zeros(len(fresh), dtype=np.int64) for d in TERMINAL_WINDOWS_DAYS}
        frauds = {d: np.zeros(len(fresh), dtype=np.int64) for d in TERMINAL_WINDOWS_DAYS}
        for h in np.unique(hours):
            rows = np.flatnonzero(hours == h)
            c_sum, f_sum = self._terminals.window_sums(int(h))
            idx = term_idx[rows]
            inside = idx < len(c_sum[TERMINAL_WINDOWS_DAYS[0]])
            for d in TERMINAL_WINDOWS_DAYS:
                counts[d][rows[inside]] = c_sum[d][idx[inside]]
                frauds[d][rows[inside]] = f_sum[d][idx[inside]]
        _add_same_batch(term_idx, hours, counts)
        terminal_columns(counts, frauds, res)

        # labels reported so far
        fresh_cards = (batch.cards if len(fresh) == len(batch)
                       else [batch.cards[i] for i in fresh.tolist()])
        card_n, card_f = self._card_labels.get(fresh_cards)
        term_n, term_f = self._term_labels.get(term_idx)
        res[:, INDEX["card_label_fraud_rate"]] = label_rate(card_n, card_f)
        res[:, INDEX["terminal_label_fraud_rate"]] = label_rate(term_n, term_f)

        new = np.empty(len(fresh), dtype=CARD_RECORD)
        new["t_us"], new["amount"], new["tx"] = t_us, amount, tx
        new["terminal"], new["device"] = batch.terminal_keys[fresh], batch.device[fresh]
        new["country"] = batch.country[fresh]
        new["inputs"] = np.column_stack(
            [counts[d] for d in TERMINAL_WINDOWS_DAYS] + [frauds[d] for d in TERMINAL_WINDOWS_DAYS]
            + [card_n, card_f, term_n, term_f])

        # the new events join their cards' histories, in which each reads its card windows
        return new, self._arena.insert(fresh_slot, new), res

    def _write(self, fresh_slot: np.ndarray, new: np.ndarray, term_idx: np.ndarray,
               cards: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Persist the fresh events and their terminal counts, one atomic script call per
        shard touched: per card, its new records appended (one buffer for the shard's
        cards, split server-side); about once a week the leading records that aged out
        dropped, and a card whose cached order no longer matches Redis (a late event)
        replaced whole; per event hour, the terminal counts of the shard's events. The
        calls are sent, one pipeline per Redis node, and their replies read by `flush`.
        Returns the cards to trim in the cache and how many leading records each drops
        (left to the caller: the batch's card windows may still read them)."""
        arena = self._arena
        size = CARD_RECORD.itemsize
        row_shard = arena.shard[fresh_slot]
        # as inserted, the cards of a shard together
        order = np.lexsort((np.arange(len(new)), new["t_us"], fresh_slot, row_shard))
        rec = take_records(new, order)
        by_card = fresh_slot[order]
        starts = np.flatnonzero(np.r_[True, by_card[1:] != by_card[:-1]])
        touched = by_card[starts]
        n_new = np.diff(np.r_[starts, len(rec)])
        newest = np.maximum.reduceat(rec["t_us"], starts)
        # trim once the oldest record is TRIM_SLACK_US past what the newest event needs:
        # a trim rewrites the card server-side, so do it about once a week, not per event
        horizon = newest - _KEEP_US
        trim = arena.oldest(touched) <= horizon - TRIM_SLACK_US
        special = trim | ~arena.ordered[touched]
        now = time.monotonic()
        renew = (now - arena.renewed[touched] >= _RENEW_S) & ~special
        card_keys = arena.keys
        card_shard = arena.shard[touched]
        renew_flag = np.where(renew, 49, 48).astype(np.uint8)
        n_bytes = (n_new * size).tolist()
        row_end = np.r_[starts[1:], len(rec)]
        # the terminal counts per (shard, event hour, terminal), sorted in that order
        hours = hours_of(new["t_us"])
        hour_list, hour_of = np.unique(hours, return_inverse=True)
        n_terms = len(self._terminals.names)
        combo, combo_n = np.unique(
            (row_shard * len(hour_list) + hour_of.reshape(-1)) * n_terms + term_idx,
            return_counts=True)
        combo_group = combo // n_terms  # shard * hours + hour index
        group_at = np.flatnonzero(np.r_[True, combo_group[1:] != combo_group[:-1], True])
        combo_term = combo % n_terms
        term_keys = self._terminals.keys
        groups = combo_group[group_at[:-1]].tolist()
        g = 0
        trimmed: list[int] = []
        cuts: list[int] = []
        calls: list[tuple[list[str], list[bytes | int | str]]] = []
        bounds = np.flatnonzero(np.r_[True, card_shard[1:] != card_shard[:-1], True]).tolist()
        for a, b in itertools.pairwise(bounds):
            shard = int(card_shard[a])
            ra, rb = int(starts[a]), int(row_end[b - 1])
            plain = range(a, b)
            trim_keys: list[str] = []
            trim_args: list[bytes | int | str] = []
            if special[a:b].any():  # rare: a card a week
                plain = [i for i in plain if not special[i]]
                rows = np.concatenate([np.arange(starts[i], row_end[i]) for i in plain]
                                      or [np.zeros(0, dtype=np.int64)])
                blob = take_records(rec, rows).tobytes()
                renew_bytes = renew_flag[plain].tobytes()
                for i in range(a, b):
                    if not special[i]:
                        continue
                    slot = int(touched[i])
                    trim_keys.append(card_keys[slot])
                    cut = arena.head_through(slot, int(horizon[i])) if trim[i] else 0
                    if cut:
                        trimmed.append(slot)
                        cuts.append(cut)
                    if arena.ordered[slot]:
                        trim_args += [cut * size, rec[starts[i]:row_end[i]].tobytes()]
                    else:
                        trim_args += [-1, arena.records(slot, skip=cut)]
                        arena.ordered[slot] = True
            else:
                blob = rec[ra:rb].tobytes()
                renew_bytes = renew_flag[a:b].tobytes()
            slots = touched.tolist() if b - a == len(touched) else touched[a:b].tolist()
            keys = ([card_keys[s] for s in slots] if isinstance(plain, range)
                    else [card_keys[int(touched[i])] for i in plain])
            args: list[bytes | int | str] = [
                renew_bytes, len(keys), len(trim_keys), _CARD_TTL_MS, _BUCKET_TTL_S, blob,
                " ".join([str(n_bytes[i]) for i in plain]), *trim_args]
            keys += trim_keys
            while g < len(groups) and groups[g] // len(hour_list) == shard:
                lo, hi = group_at[g], group_at[g + 1]
                keys.append(self._bucket_key(shard, int(hour_list[groups[g] % len(hour_list)])))
                args.append(_pack_counts(term_keys[combo_term[lo:hi]], combo_n[lo:hi]))
                g += 1
            calls.append((keys, args))
        self._pending = _PendingWrite(self._send(calls), cards)
        # Redis runs the scripts while the caller goes on (flush undoes the caches on
        # failure)
        arena.renewed[touched[renew | special]] = now
        combo_hour = combo_group % len(hour_list)
        for j, h in enumerate(hour_list.tolist()):  # a terminal may repeat across shards
            at = combo_hour == j
            self._terminals.add_counts(h, combo_term[at], combo_n[at])
        return np.array(trimmed, dtype=np.int64), np.array(cuts, dtype=np.int64)

    def _send(self, calls: list[tuple[list[str], list[bytes | int | str]]]
              ) -> list[tuple[redis.ConnectionPool, redis.Connection,
                              list[tuple[list[str], list[bytes | int | str]]]]]:
        """Send the write script `calls` without waiting for their replies: on one Redis
        all on one connection, on a Cluster one connection per node (the node owning the
        call's slot)."""
        by_pool: dict[int, tuple[redis.ConnectionPool, list]] = {}
        for keys, args in calls:
            pool = (self._r.get_node_from_key(keys[0]).redis_connection.connection_pool
                    if self._cluster else self._r.connection_pool)
            by_pool.setdefault(id(pool), (pool, []))[1].append((keys, args))
        sends = []
        sha = self._write_script.sha
        try:
            for pool, mine in by_pool.values():
                conn = pool.get_connection()
                sends.append((pool, conn, mine))
                conn.send_packed_command(conn.pack_commands(
                    [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in mine]))
        except redis.RedisError as exc:
            for pool, conn, _ in sends:
                conn.disconnect()
                pool.release(conn)
            raise FeatureStoreUnavailable(f"writing feature state: {exc}") from exc
        return sends

    def _features_of_stored(self, pos: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """The features stored events got when they were new: card windows recomputed over
        the history before them (exact), terminal and label parts from the recorded counts."""
        rec = take_records(self._arena.rec, pos)
        res = np.zeros((len(pos), N_FEATURES), dtype=np.float64)
        transaction_features(rec["t_us"], rec["amount"], res)
        self._arena.features(pos, slots, res)
        inputs = rec["inputs"].astype(np.int64)
        terminal_columns({d: inputs[:, j] for j, d in enumerate(TERMINAL_WINDOWS_DAYS)},
                         {d: inputs[:, _N_WIN + j] for j, d in enumerate(TERMINAL_WINDOWS_DAYS)},
                         res)
        res[:, INDEX["card_label_fraud_rate"]] = label_rate(inputs[:, _CARD_LAB],
                                                            inputs[:, _CARD_LAB + 1])
        res[:, INDEX["terminal_label_fraud_rate"]] = label_rate(inputs[:, _TERM_LAB],
                                                                inputs[:, _TERM_LAB + 1])
        return res

    # ---- labels -------------------------------------------------------------------------

    def apply_labels(self, labels: LabelBatch) -> int:
        """Apply fraud reports once each (first report wins); returns how many were new.

        Counters, buckets and the label-log entry are written in one MULTI, so workers that
        tail the log (this one included, on its next batch) see every label exactly once.
        """
        self.flush()
        n = len(labels.transaction_ids)
        if n == 0:
            return 0
        tx_ids = list(labels.transaction_ids)
        hours = hours_of(labels.t_us)
        groups = {int(h): np.flatnonzero(hours == h) for h in np.unique(hours)}
        try:
            pipe = self._r.pipeline(transaction=False)
            for h, rows in groups.items():
                pipe.hmget(self._lk("lab", h), [tx_ids[i] for i in rows])
            known = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"reading labels: {exc}") from exc
        new = np.ones(n, dtype=bool)
        for rows, values in zip(groups.values(), known, strict=True):
            new[rows] = [v is None for v in values]
        _, first = np.unique(transaction_hashes(tx_ids), return_index=True)
        once = np.zeros(n, dtype=bool)
        once[first] = True
        apply = np.flatnonzero(new & once)
        if apply.size == 0:
            return 0
        delay_us = TERMINAL_DELAY_HOURS * HOUR_US
        fraud = labels.is_fraud[apply].astype(bool)
        on_time = fraud & (labels.reported_us[apply] <= labels.t_us[apply] + delay_us)
        cards = [labels.cards[i] for i in apply.tolist()]
        terms = [labels.terminals[i] for i in apply.tolist()]
        try:
            pipe = self._r.pipeline(transaction=True)
            for h in np.unique(hours[apply]).tolist():
                rows = apply[hours[apply] == h]
                key = self._lk("lab", h)
                pipe.hset(key, mapping={tx_ids[i]: int(bool(labels.is_fraud[i])) for i in rows})
                pipe.expire(key, _LABEL_TTL_S)
            self._incr_counters(pipe, "cl", cards, fraud)
            self._incr_counters(pipe, "tl", terms, fraud)
            pairs: dict[tuple[int, str], int] = {}
            for h, term in zip(hours[apply][on_time].tolist(),
                               [terms[i] for i in np.flatnonzero(on_time)], strict=True):
                pairs[(h, term)] = pairs.get((h, term), 0) + 1
            for (h, term), c in pairs.items():
                pipe.hincrby(self._lk("tf", h), term, c)
            for h in {h for h, _ in pairs}:
                pipe.expire(self._lk("tf", h), _BUCKET_TTL_S)
            flag = fraud.astype(np.int8) + on_time.astype(np.int8)  # 0, 1 fraud, 2 on time
            # EVAL, not EVALSHA: a script missing after a restart would fail alone inside the
            # MULTI while the counters above were applied
            pipe.execute_command("EVAL", _LOG_LABELS, 2, self._lk("lablog"), self._lk("labseq"),
                                 _LOG_MAXLEN, _pack_names(cards), _pack_names(terms),
                                 flag.tobytes(), hours[apply].astype("<i8").tobytes())
            pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"writing labels: {exc}") from exc
        return int(apply.size)

    def _incr_counters(self, pipe: redis.client.Pipeline, kind: str, names: Sequence[str],
                       fraud: np.ndarray) -> None:
        """Add one label (and `fraud`) per row to each name's packed counter, aggregated."""
        totals: dict[str, int] = {}
        for name, f in zip(names, fraud.tolist(), strict=True):
            totals[name] = totals.get(name, 0) + 1 + (int(f) << 32)
        for name, v in totals.items():
            pipe.hincrby(self._lk(kind), name, v)

    # ---- bootstrap ----------------------------------------------------------------------

    def load_history(self, events: EventBatch, labels: LabelBatch, until_us: int,
                     chunk: int = 5_000) -> None:
        """Write the state a stream would have left at `until_us`, from a whole history.

        Much faster than streaming it (no per-batch features), and the result is the same
        for every later event: each card's kept events, the terminal hour buckets, and the
        labels reported so far (first report per transaction). Loaded events are known for
        redelivery; their recorded terminal and label counts are not (zeros).
        """
        self.flush()
        before = events.t_us < until_us
        t_us = events.t_us[before]
        cards = np.asarray(events.cards, dtype=object)[before]
        recent = t_us > until_us - _KEEP_US
        rec = np.zeros(int(recent.sum()), dtype=CARD_RECORD)
        rec["t_us"] = t_us[recent]
        rec["amount"] = events.amount[before][recent]
        rec["terminal"] = events.terminal_keys[before][recent]
        rec["device"] = events.device[before][recent]
        rec["country"] = events.country[before][recent]
        ids = np.asarray(events.transaction_ids, dtype=object)[before][recent]
        rec["tx"] = transaction_hashes(ids)
        owner = cards[recent]
        order = np.argsort(owner, kind="stable")
        names, starts = np.unique(owner[order], return_index=True)
        ends = np.r_[starts[1:], len(order)]
        card_ttl_ms = int((_KEEP_US + DAY_US) // 1000)
        pipe = self._r.pipeline(transaction=False)
        for name, a, b in zip(names.tolist(), starts, ends, strict=True):
            pipe.set(self._card_key(name), take_records(rec, order[a:b]).tobytes(), px=card_ttl_ms)
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
            key = self._bucket_key(int(h) % self._shards, int(h))  # any shard's list will do
            pipe.rpush(key, _pack_counts(terminal_keys(list(mapping)),
                                         np.fromiter(mapping.values(), np.int64)))
            pipe.expire(key, _BUCKET_TTL_S)
            if len(pipe) >= chunk:
                pipe.execute()
        pipe.execute()
        self._load_labels(labels, until_us)
        self.invalidate()
        self._card_labels.clear()
        self._term_labels.clear()
        self._terminals = _TerminalWindows(self._terminals.refresh_s)
        self._log_id = None

    def _load_labels(self, labels: LabelBatch, until_us: int) -> None:
        """Labels reported by `until_us`, aggregated: the first report per transaction."""
        rep = labels.reported_us <= until_us
        ids = np.asarray(labels.transaction_ids, dtype=object)[rep]
        order = np.lexsort((ids.astype(str), labels.reported_us[rep]))
        _, first = np.unique(ids[order], return_index=True)
        pick = np.flatnonzero(rep)[order[first]]
        fraud = labels.is_fraud[pick].astype(bool)
        hours = hours_of(labels.t_us[pick])
        pipe = self._r.pipeline(transaction=False)
        for h in np.unique(hours):
            rows = pick[hours == h]
            pipe.hset(self._lk("lab", int(h)), mapping={
                labels.transaction_ids[i]: int(bool(labels.is_fraud[i])) for i in rows})
            pipe.expire(self._lk("lab", int(h)), _LABEL_TTL_S)
        for kind, owners in (("cl", labels.cards), ("tl", labels.terminals)):
            self._incr_counters(pipe, kind, [owners[i] for i in pick.tolist()], fraud)
        on_time = labels.is_fraud[pick] & (
            labels.reported_us[pick] <= labels.t_us[pick] + TERMINAL_DELAY_HOURS * HOUR_US)
        for h in np.unique(hours[on_time]):
            rows = pick[on_time & (hours == h)]
            terms, c = np.unique(np.asarray(labels.terminals, dtype=object)[rows].astype(str),
                                 return_counts=True)
            pipe.hset(self._lk("tf", int(h)), mapping=dict(zip(terms.tolist(), c.tolist(),
                                                               strict=True)))
            pipe.expire(self._lk("tf", int(h)), _BUCKET_TTL_S)
        pipe.execute()


def _as_dict(reply: dict[bytes, bytes] | list[bytes]) -> dict[bytes, bytes]:
    """A hash reply as a dict (a cluster pipeline's MULTI leaves it a flat list)."""
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))


def _stream(reply: list) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries with their fields as dicts (a cluster pipeline's MULTI leaves lists)."""
    return [(entry_id, _as_dict(fields)) for entry_id, fields in reply]


def _check(batch: EventBatch) -> None:
    """Refuse the whole batch before anything is read or written: bad rows never reach state."""
    bad_amount = ~(np.isfinite(batch.amount) & (batch.amount > 0))
    if bad_amount.any():
        i = int(np.flatnonzero(bad_amount)[0])
        raise InvalidEvent(f"row {i}: amount must be a finite number > 0")
    for name, values in (("transaction_id", batch.transaction_ids), ("card", batch.cards),
                         ("terminal", batch.terminals)):
        if set(map(type, values)) <= {str} and "" not in set(values):
            continue
        i = next(i for i, v in enumerate(values) if not isinstance(v, str) or not v)
        raise InvalidEvent(f"row {i}: missing {name}")


def _refuse_stale(t_us: np.ndarray, new: np.ndarray, newest: np.ndarray,
                  first_of: np.ndarray) -> None:
    """Raise :class:`StaleEvents` for new events older than their card's kept history
    (`newest`: per event, its card's newest stored event time, int64 min when none), and
    for their repeats in the batch (`first_of`: each row's first occurrence): a repeat left
    behind would be new on the retry and refused again."""
    stale = (new & (t_us + _KEEP_US <= newest))[first_of]
    if stale.any():
        raise StaleEvents(np.flatnonzero(stale))


def _pack_names(names: Sequence[str]) -> bytes:
    encoded = [x.encode() for x in names]
    lengths = np.fromiter(map(len, encoded), dtype="<u4", count=len(encoded))
    return len(encoded).to_bytes(4, "little") + lengths.tobytes() + b"".join(encoded)


def _unpack_names(blob: bytes) -> list[str]:
    return _unpack_names_at(blob)[0]


def _unpack_names_at(blob: bytes) -> tuple[list[str], int]:
    """The names packed at the start of `blob`, and where they end."""
    count = int.from_bytes(blob[:4], "little")
    lengths = np.frombuffer(blob, dtype="<u4", count=count, offset=4).astype(np.int64)
    ends = (4 + 4 * count + np.cumsum(lengths)).tolist()
    starts = [4 + 4 * count, *ends[:-1]]
    names = [blob[a:b].decode() for a, b in zip(starts, ends, strict=True)]
    return names, (ends[-1] if ends else 4)


_KEYED = b"\xff\xff\xff\xff"  # no name list is that long: marks a chunk of terminal keys


def terminal_keys(names: Sequence[str]) -> np.ndarray:
    """64-bit keys of terminal names, the same in every process (unlike `hash`): hour
    buckets hold keys, so that reading one is a searchsorted, not thousands of dict
    lookups (5.7 ms of 8,000 names among 200,000). Two of 200,000 terminals share a key
    with odds of about 1e-9."""
    digest = b"".join(blake2b(n.encode(), digest_size=8).digest() for n in names)
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def _pack_counts(keys: np.ndarray, counts: np.ndarray) -> bytes:
    """One hour-bucket chunk: the marker, the number of terminals, their keys, their counts."""
    return (_KEYED + len(keys).to_bytes(4, "little") + keys.astype("<u8").tobytes()
            + counts.astype("<u4").tobytes())


def _unpack_counts(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Terminal keys and counts of a chunk; chunks of names (written before keys, still in
    buckets during a rolling upgrade) are keyed here."""
    if blob[:4] != _KEYED:
        names, end = _unpack_names_at(blob)
        return terminal_keys(names), np.frombuffer(blob, dtype="<u4", count=len(names),
                                                   offset=end).astype(np.int64)
    n = int.from_bytes(blob[4:8], "little")
    keys = np.frombuffer(blob, dtype="<u8", count=n, offset=8).astype(np.uint64)
    return keys, np.frombuffer(blob, dtype="<u4", count=n, offset=8 + 8 * n).astype(np.int64)
