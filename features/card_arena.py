"""Worker-memory card histories in one columnar arena: the state a worker's partitions own.

Every cached card owns a region of one shared record array holding its kept events in
(time, arrival) order, with room to grow, and running sums of cents and of small amounts
beside them. A batch then reads only its events' window bounds (binary searches inside each
card's region) instead of gathering every history it touches, and appends in place.
Regions have power-of-two sizes: one that outgrows its room moves to a free region of the
next size (freed regions are kept per size for reuse), so nothing is ever compacted and no
batch pays for the whole cache; after a trim the live records slide back to the region's
start. The arena doubles when no free region fits.

Redis holds the same records (see :mod:`features.online`); while a card is ``ordered`` its
Redis value is byte for byte its region, so new records are appended there too. A late
event (older than its card's newest) is inserted in time order here, and the card's Redis
value is then replaced whole on the next write.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from features.definitions import SMALL_AMOUNT, TERMINAL_WINDOWS_DAYS
from features.windows import card_features_at, first_after, ragged

# One stored card event: the card windows' inputs (nothing personal: terminal, device and
# country as opaque equality keys), the transaction id's hash (redelivery), and the counts
# it was scored with: terminal windows (counts, then frauds, in TERMINAL_WINDOWS_DAYS
# order), then labels so far (card labels, card frauds, terminal labels, terminal frauds).
CARD_RECORD = np.dtype([
    ("t_us", "<i8"), ("amount", "<f8"), ("terminal", "<u4"), ("device", "<u4"),
    ("country", "<u4"), ("tx", "<u8"), ("inputs", "<u4", (2 * len(TERMINAL_WINDOWS_DAYS) + 4,)),
])
# The card keys' kind names the record size: records of another layout (another release)
# are never read as these; their keys expire by TTL.
CARD_KIND = f"card{CARD_RECORD.itemsize}"
# The same records as opaque bytes. numpy copies a record with a sub-array field field by
# field (a 1M-record copy 58 ms, 500 scattered ones 59 µs); as raw bytes 2.8 ms and 2.4 µs.
_RAW = np.dtype((np.void, CARD_RECORD.itemsize))
_NONE = np.iinfo(np.int64).min


def whole_records(blob: bytes | None) -> bytes:
    """Stored card events; a blob that is not whole records is treated as empty."""
    if not blob or len(blob) % CARD_RECORD.itemsize:
        return b""
    return bytes(blob)


def take_records(rec: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``rec[idx]`` for CARD_RECORD arrays, copied as raw bytes (see ``_RAW``)."""
    return rec.view(_RAW)[idx].view(CARD_RECORD)


def _grown(a: np.ndarray, size: int, fill: object = 0) -> np.ndarray:
    out = np.full(size, fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


def _cents(amount: np.ndarray) -> np.ndarray:
    return np.rint(amount * 100.0).astype(np.int64)


def _running(values: np.ndarray, counts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running sums of `values` restarted per group (groups of `counts` rows, in order),
    each continuing from its `first`."""
    total = np.cumsum(values)
    before = np.concatenate(([0], total))[np.cumsum(counts) - counts]
    return total - np.repeat(before - first, counts)


class CardArena:
    """Card token → its kept events, columnar; least recently used cards are evicted."""

    def __init__(self, capacity: int, key: Callable[[str], str],
                 shard: Callable[[str], int] = lambda token: 0) -> None:
        self.capacity = capacity
        self._key = key  # a card's Redis key
        self._shard = shard  # the store shard (one hash slot on Redis Cluster) of a card
        self.clear()

    def clear(self) -> None:
        self.slot: dict[str, int] = {}
        self.tokens: list[str | None] = []
        self.keys: list[str | None] = []  # per slot, its card's Redis key
        self.shard = np.zeros(0, dtype=np.int64)  # per slot, its card's store shard
        self._free: list[int] = []
        self.base = np.zeros(0, dtype=np.int64)  # region [base, base + cap)
        self.cap = np.zeros(0, dtype=np.int64)
        self.start = np.zeros(0, dtype=np.int64)  # live records [start, start + length)
        self.length = np.zeros(0, dtype=np.int64)
        self.ordered = np.zeros(0, dtype=bool)  # Redis holds exactly the live records
        self.renewed = np.zeros(0, dtype=np.float64)  # when the key's TTL was last renewed
        self.used = np.zeros(0, dtype=np.int64)  # the batch that last read the card
        self.clock = 0
        # np.zeros takes untouched pages lazily from the OS: sizing the arena for the cache
        # up front costs memory only as it fills, and spares the growing cache its copies
        # (a full cache of cards with about 60 events each fills 128-record regions; one
        # doubling of an 8M-record arena stalled its batch 1.1 s, mostly first-touch faults)
        size = max(1024, min(128 * self.capacity, 1 << 25))
        self.rec = np.zeros(size, dtype=CARD_RECORD)
        self.raw = self.rec.view(_RAW)  # the same memory: bulk copies go through it
        self.t = np.zeros(size, dtype=np.int64)  # rec["t_us"], contiguous: binary searches
        self.cum_cents = np.zeros(size, dtype=np.int64)
        self.cum_small = np.zeros(size, dtype=np.int64)
        self.top = 0  # space past every region
        self._pools: dict[int, list[int]] = {}  # region size → bases of free regions

    def __len__(self) -> int:
        return len(self.slot)

    # ---- cards --------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[str]) -> np.ndarray:
        """Slots of `tokens` (-1: not cached); marks the cached ones as used now."""
        self.clock += 1
        slots = np.fromiter(map(self.slot.get, tokens, itertools.repeat(-1)), dtype=np.int64,
                            count=len(tokens))
        self.used[slots[slots >= 0]] = self.clock
        return slots

    def load(self, tokens: Sequence[str], blobs: Sequence[bytes | None]) -> None:
        """Cache cards read from Redis (`blobs`: their values, None when absent)."""
        wholes = [whole_records(b) for b in blobs]
        counts = np.fromiter(map(len, wholes), dtype=np.int64,
                             count=len(wholes)) // CARD_RECORD.itemsize
        recs = np.frombuffer(b"".join(wholes), dtype=CARD_RECORD)
        slots = self._new_slots(tokens)
        self._reserve(slots, counts)
        group = np.repeat(np.arange(len(slots)), counts)
        t = recs["t_us"]
        # (time, arrival) order within each card; Redis values are usually in it already
        # (appends), and then the sort and its copy of every record are skipped
        backwards = (t[1:] < t[:-1]) & (group[1:] == group[:-1])
        moved = np.zeros(len(slots), dtype=np.int64)
        if backwards.any():
            order = np.lexsort((np.arange(len(recs)), t, group))
            moved = np.bincount(group[order != np.arange(len(recs))], minlength=len(slots))
            recs = take_records(recs, order)
        corrupt = np.fromiter((bool(b) and not w for b, w in zip(blobs, wholes, strict=True)),
                              dtype=bool, count=len(blobs))
        self.ordered[slots] = (moved == 0) & ~corrupt
        dest = np.repeat(self.start[slots], counts) + (
            np.arange(len(recs)) - np.repeat(np.cumsum(counts) - counts, counts))
        self.raw[dest] = recs.view(_RAW)
        self.t[dest] = recs["t_us"]
        zero = np.zeros(len(slots), dtype=np.int64)
        self.cum_cents[dest] = _running(_cents(recs["amount"]), counts, zero)
        self.cum_small[dest] = _running((recs["amount"] <= SMALL_AMOUNT).astype(np.int64),
                                        counts, zero)
        self.length[slots] = counts

    def _new_slots(self, tokens: Sequence[str]) -> np.ndarray:
        fresh = len(tokens) - len(self._free)
        if fresh > 0:
            size = len(self.tokens) + fresh
            self.tokens += [None] * fresh
            self.keys += [None] * fresh
            self._free += range(size - fresh, size)
            if size > len(self.base):
                grow = max(size, 2 * len(self.base))
                self.base, self.cap = _grown(self.base, grow), _grown(self.cap, grow)
                self.start, self.length = _grown(self.start, grow), _grown(self.length, grow)
                self.ordered = _grown(self.ordered, grow)
                self.renewed = _grown(self.renewed, grow, -np.inf)
                self.used = _grown(self.used, grow)
                self.shard = _grown(self.shard, grow)
        slots = np.array(self._free[-len(tokens):][::-1] if tokens else [], dtype=np.int64)
        del self._free[len(self._free) - len(tokens):]
        for token, s in zip(tokens, slots.tolist(), strict=True):
            self.slot[token] = s
            self.tokens[s] = token
            self.keys[s] = self._key(token)
            self.shard[s] = self._shard(token)
        self.base[slots] = self.start[slots] = self.top
        self.cap[slots] = self.length[slots] = 0
        self.renewed[slots] = -np.inf
        self.used[slots] = self.clock
        return slots

    def drop(self, tokens: Sequence[str]) -> None:
        """Forget cards (their regions are freed for reuse)."""
        gone = [self.slot.pop(t) for t in tokens if t in self.slot]
        for s in gone:
            self.tokens[s] = self.keys[s] = None
        self._free += gone
        at = np.array(gone, dtype=np.int64)
        self._release(self.base[at], self.cap[at])
        self.cap[at] = 0

    def evict(self) -> None:
        """Above capacity: drop the least recently used tenth, never the last batch's."""
        excess = len(self.slot) - self.capacity
        if excess <= 0:
            return
        live = np.fromiter(self.slot.values(), dtype=np.int64, count=len(self.slot))
        live = live[self.used[live] < self.clock]
        k = min(len(live), excess + self.capacity // 10)
        if k:
            victims = live[np.argpartition(self.used[live], k - 1)[:k]]
            self.drop([self.tokens[s] for s in victims.tolist()])  # type: ignore[misc]

    def records_of(self, token: str) -> bytes | None:
        """A cached card's live records, as its Redis value holds them when ordered."""
        s = self.slot.get(token)
        return None if s is None else self.records(s)

    def records(self, slot: int, skip: int = 0) -> bytes:
        """A card's live records but the first `skip`, as bytes."""
        a = int(self.start[slot])
        return self.rec[a + skip:a + int(self.length[slot])].tobytes()

    # ---- records ------------------------------------------------------------------------

    def newest(self, slots: np.ndarray) -> np.ndarray:
        """Per slot, its newest event time (int64 min when it has none)."""
        last = self.t[np.maximum(self.start[slots] + self.length[slots] - 1, 0)]
        return np.where(self.length[slots] > 0, last, _NONE)

    def oldest(self, slots: np.ndarray) -> np.ndarray:
        """Per slot, its oldest event time (int64 max when it has none)."""
        first = self.t[np.minimum(self.start[slots], len(self.t) - 1)]
        return np.where(self.length[slots] > 0, first, np.iinfo(np.int64).max)

    def find(self, slots: np.ndarray, t_us: np.ndarray, tx: np.ndarray) -> np.ndarray:
        """Per event, the arena position of its card's record of the same transaction (a
        redelivery: same event time, same id hash), or -1."""
        times = self.t
        start, end = self.start[slots], self.start[slots] + self.length[slots]
        lo = _first_at_least(times, start, end, t_us)
        hi = first_after(times, lo, end, t_us)
        found = np.full(len(slots), -1, dtype=np.int64)
        owner, pos = ragged(lo, hi)
        hit = self.rec["tx"][pos] == tx[owner]
        found[owner[hit]] = pos[hit]
        return found

    def features(self, pos: np.ndarray, slots: np.ndarray, out: np.ndarray) -> None:
        """Card window columns of the records at `pos` (of cards `slots`) into `out`."""
        rec = self.rec
        card_features_at(self.t, rec["amount"], self.cum_cents, self.cum_small,
                         rec["terminal"], rec["device"], rec["country"], self.start[slots],
                         pos, out)

    def insert(self, slots: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Add new records (`slots`: their cards) in (time, input) order; returns their
        arena positions. A card whose new events are not all at or after its newest one
        has its region re-sorted and is marked not ``ordered``."""
        n = len(new)
        order = np.lexsort((np.arange(n), new["t_us"], slots))
        rec = take_records(new, order)
        touched, first, counts = np.unique(slots[order], return_index=True, return_counts=True)
        late = rec["t_us"][first] < self.newest(touched)
        self._reserve(touched, counts)
        group = np.repeat(np.arange(len(touched)), counts)
        dest = (self.start[touched] + self.length[touched])[group] + (np.arange(n) - first[group])
        if late.any():
            fast = ~late[group]
            self._place(dest[fast], take_records(rec, fast), counts[~late], touched[~late])
            for g in np.flatnonzero(late).tolist():
                rows = slice(int(first[g]), int(first[g] + counts[g]))
                dest[rows] = self._merge(int(touched[g]), rec[rows])
        else:
            self._place(dest, rec, counts, touched)
        pos = np.empty(n, dtype=np.int64)
        pos[order] = dest
        return pos

    def _place(self, dest: np.ndarray, rec: np.ndarray, counts: np.ndarray,
               slots: np.ndarray) -> None:
        """Append records at the ends of their cards' regions (room reserved)."""
        s = self.start[slots]
        last = np.maximum(s + self.length[slots] - 1, 0)
        has = self.length[slots] > 0
        self.raw[dest] = rec.view(_RAW)
        self.t[dest] = rec["t_us"]
        self.cum_cents[dest] = _running(_cents(rec["amount"]), counts,
                                        np.where(has, self.cum_cents[last], 0))
        self.cum_small[dest] = _running((rec["amount"] <= SMALL_AMOUNT).astype(np.int64), counts,
                                        np.where(has, self.cum_small[last], 0))
        self.length[slots] += counts

    def _merge(self, slot: int, rec: np.ndarray) -> np.ndarray:
        """Insert late records into one card's region in time order (rare: the slow path)."""
        a = int(self.start[slot])
        b = a + int(self.length[slot])
        both = np.concatenate([self.raw[a:b], rec.view(_RAW)]).view(CARD_RECORD)
        order = np.lexsort((np.arange(len(both)), both["t_us"]))
        both = take_records(both, order)
        self.raw[a:a + len(both)] = both.view(_RAW)
        self.t[a:a + len(both)] = both["t_us"]
        self.cum_cents[a:a + len(both)] = np.cumsum(_cents(both["amount"]))
        self.cum_small[a:a + len(both)] = np.cumsum(both["amount"] <= SMALL_AMOUNT)
        self.length[slot] = len(both)
        self.ordered[slot] = False
        where = np.empty(len(both), dtype=np.int64)
        where[order] = np.arange(len(both))
        return a + where[b - a:]

    def head_through(self, slot: int, horizon: int) -> int:
        """How many of a card's leading records are at or before `horizon`."""
        a = int(self.start[slot])
        return int(np.searchsorted(self.t[a:a + int(self.length[slot])], horizon, side="right"))

    def drop_head(self, slots: np.ndarray, k: np.ndarray) -> None:
        """Drop each card's `k` leading records (`slots` distinct)."""
        self.start[slots] += k
        self.length[slots] -= k

    # ---- space --------------------------------------------------------------------------

    def _reserve(self, slots: np.ndarray, extra: np.ndarray) -> None:
        """Room for `extra` more records after each card's live ones (`slots` distinct).
        A region with room enough once its trimmed head is reclaimed slides back to its
        start; one too small moves to a free region of the next power-of-two size."""
        need = self.length[slots] + extra
        short = self.start[slots] + need > self.base[slots] + self.cap[slots]
        if not short.any():
            return
        slots, need = slots[short], need[short]
        slide = need <= self.cap[slots]
        movers = slots[~slide]
        new_cap = np.left_shift(1, np.ceil(np.log2(np.maximum(need[~slide], 8))).astype(np.int64))
        new_base = self._alloc(new_cap)
        self._copy(np.concatenate([slots[slide], movers]),
                   np.concatenate([self.base[slots[slide]], new_base]))
        self._release(self.base[movers], self.cap[movers])
        self.start[slots[slide]] = self.base[slots[slide]]
        self.base[movers] = self.start[movers] = new_base
        self.cap[movers] = new_cap

    def _copy(self, slots: np.ndarray, dest: np.ndarray) -> None:
        """Move each card's live records to start at `dest` (gathered first: ranges may
        overlap)."""
        owner, src = ragged(self.start[slots], self.start[slots] + self.length[slots])
        to = dest[owner] + (src - self.start[slots][owner])
        self.raw[to] = self.raw[src]
        self.t[to] = self.t[src]
        self.cum_cents[to] = self.cum_cents[src]
        self.cum_small[to] = self.cum_small[src]

    def _alloc(self, caps: np.ndarray) -> np.ndarray:
        """Bases of new regions of these (power-of-two) sizes: freed ones first, then new
        space at the end (the arena doubles when full; nothing is ever compacted)."""
        bases = np.empty(len(caps), dtype=np.int64)
        fresh = np.ones(len(caps), dtype=bool)
        if self._pools:
            for i, cap in enumerate(caps.tolist()):
                pool = self._pools.get(cap)
                if pool:
                    bases[i] = pool.pop()
                    fresh[i] = False
        sizes = caps[fresh]
        end = self.top + int(sizes.sum())
        if end > len(self.rec):
            self._grow(max(end, 2 * len(self.rec)))
        bases[fresh] = self.top + np.cumsum(sizes) - sizes
        self.top = end
        return bases

    def _release(self, bases: np.ndarray, caps: np.ndarray) -> None:
        for base, cap in zip(bases.tolist(), caps.tolist(), strict=True):
            if cap:
                self._pools.setdefault(cap, []).append(base)

    def _grow(self, size: int) -> None:
        for name in ("raw", "t", "cum_cents", "cum_small"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[:self.top] = old[:self.top]
            setattr(self, name, new)
        self.rec = self.raw.view(CARD_RECORD)


def _first_at_least(values: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                    x: np.ndarray) -> np.ndarray:
    return first_after(values, lo, hi, x - 1)
