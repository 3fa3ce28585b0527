"""The feature arithmetic, vectorised, shared by the offline and the online computation.

:func:`card_features` takes a table of card events (history and new events alike), sorts it
by (card, time, arrival) and answers every window with binary searches and cumulative sums,
so its cost is O(n log n) whatever the window lengths; offline runs it over a whole history.
Online, :func:`card_features_at` answers the same windows for a batch's events inside the
worker's card arena (each card's events contiguous and in order, with running sums), with
the same integer-cents arithmetic, so both compute the same numbers bit for bit.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from features.definitions import (
    BURST_WINDOW_US,
    CARD_LOOKBACK_US,
    CARD_WINDOWS_DAYS,
    DAY_US,
    HOUR_US,
    INDEX,
    NIGHT_LAST_HOUR,
    RECENT_WINDOW_US,
    SECOND_US,
    SECONDS_SINCE_CAP,
    SMALL_AMOUNT,
    TERMINAL_DELAY_HOURS,
    TERMINAL_WINDOWS_DAYS,
)

_INT64_HEADROOM = 2**62


@dataclass(frozen=True)
class CardEvents:
    """Columnar card events; `card` is a dense index, the keys are opaque equality keys."""

    card: np.ndarray  # int64
    t_us: np.ndarray  # int64 microseconds since the epoch (UTC)
    amount: np.ndarray  # float64
    terminal: np.ndarray  # uint32 hash of the terminal id
    device: np.ndarray  # uint32, 0 = unknown
    country: np.ndarray  # uint32, 0 = unknown

    def __len__(self) -> int:
        return len(self.t_us)


def terminal_hash(terminal_ids: np.ndarray) -> np.ndarray:
    """Stable 32-bit hash of terminal ids (only compared for equality within one card).
    One CRC per id: hashing only the unique ids sorted them first, which cost 4x more (0.29
    against 0.07 ms for 1,000 ids, nearly all distinct in a live batch)."""
    crc = zlib.crc32
    return np.fromiter((crc(str(u).encode()) for u in terminal_ids), dtype=np.uint32,
                       count=len(terminal_ids))


def country_keys(codes: np.ndarray) -> np.ndarray:
    """ISO country codes as uint32 keys (0 = unknown); countries are not personal data."""
    raw = np.asarray(codes, dtype=object)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint32)
    arr = np.where(pd.isna(raw), "", raw).astype("U2")
    chars = arr.view(np.uint32).reshape(-1, 2).astype(np.uint32)
    known = (chars[:, 0] > 0) & (chars[:, 1] > 0)
    return np.where(known, chars[:, 0] * 256 + chars[:, 1], 0).astype(np.uint32)


def transaction_features(t_us: np.ndarray, amount: np.ndarray, out: np.ndarray) -> None:
    """Stateless features: amount and UTC calendar flags."""
    days = t_us // DAY_US
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    hour = (t_us - days * DAY_US) // HOUR_US
    out[:, INDEX["amount"]] = amount
    out[:, INDEX["is_weekend"]] = weekday >= 5
    out[:, INDEX["is_night"]] = hour <= NIGHT_LAST_HOUR


def _previous_same(group: np.ndarray, value: np.ndarray) -> np.ndarray:
    """For rows already sorted by (group, time), the row of the previous equal value in the
    same group, or -1."""
    n = len(group)
    order = np.lexsort((np.arange(n), value, group))
    prev = np.full(n, -1, dtype=np.int64)
    same = (group[order][1:] == group[order][:-1]) & (value[order][1:] == value[order][:-1])
    prev[order[1:][same]] = order[:-1][same]
    return prev


def sorted_order(ev: CardEvents, stored: int = 0) -> np.ndarray:
    """Row order by (card, time, input order).

    When the first `stored` rows are each card's history already in time order and the
    rest are newer events (the online case), a stable sort on the card alone suffices.
    """
    n = len(ev)
    if stored:
        order = np.argsort(ev.card, kind="stable")
        t = ev.t_us[order]
        same = ev.card[order][1:] == ev.card[order][:-1]
        if not np.any(same & (t[1:] < t[:-1])):
            return order
    return np.lexsort((np.arange(n), ev.t_us, ev.card))


def card_features(ev: CardEvents, out: np.ndarray, rows: np.ndarray | None = None,
                  order: np.ndarray | None = None) -> None:
    """Fill the card columns of `out` for `rows` (default: all, in input order); `out` has
    one row per requested row.

    Each row sees the rows of its card that precede it in (time, input order): for a stream
    in time order that is "every earlier transaction", as offline. Online passes the stored
    history plus the batch and asks only for the batch rows.
    """
    n = len(ev)
    if n == 0:
        return
    span = int(ev.t_us.max()) - int(ev.t_us.min()) + CARD_LOOKBACK_US + 2
    limit = max(1, _INT64_HEADROOM // span)
    if int(ev.card.max()) + 1 > limit:  # times centuries apart: a few cards at a time
        _card_features_in_groups(ev, out, np.arange(n) if rows is None else rows, limit)
        return
    order = sorted_order(ev) if order is None else order
    card = ev.card[order]
    t = ev.t_us[order]
    amount = ev.amount[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    want = rank if rows is None else rank[rows]  # sorted positions to compute
    res = np.empty((len(want), out.shape[1]), dtype=np.float64)

    # A strictly ordered int64 key per row: card in the high part, time in the low part.
    base = int(t.min()) - CARD_LOOKBACK_US - 1
    span = int(t.max()) - base + 1
    key = card * span + (t - base)
    k = key[want]
    group_start = np.searchsorted(card, card[want], side="left")

    # Sums in integer cents: exact whatever history a window starts from, so a store holding
    # only recent events agrees bit for bit with a computation over the whole history.
    cents = np.concatenate(([0], np.cumsum(np.rint(amount * 100.0).astype(np.int64))))
    for days in CARD_WINDOWS_DAYS:
        lo = np.searchsorted(key, k - days * DAY_US, side="right")
        count = want - lo + 1
        res[:, INDEX[f"card_count_{days}d"]] = count
        res[:, INDEX[f"card_mean_amount_{days}d"]] = (cents[want + 1] - cents[lo]) / 100.0 / count
    lo_lookback = np.searchsorted(key, k - CARD_LOOKBACK_US, side="right")
    mean_30d = res[:, INDEX["card_mean_amount_30d"]]
    # sums are in whole cents: amounts under half a cent (3-decimal currencies) sum to 0
    res[:, INDEX["card_amount_ratio_30d"]] = np.divide(amount[want], mean_30d,
                                                       out=np.ones(len(want)), where=mean_30d > 0)

    lo_recent = np.searchsorted(key, k - RECENT_WINDOW_US, side="right")
    base_n = lo_recent - lo_lookback
    base_mean = np.divide(cents[lo_recent] - cents[lo_lookback], 100.0 * base_n,
                          out=np.zeros(len(want)), where=base_n > 0)
    recent_max = slice_max(amount, lo_recent, want)
    baseline_columns(amount[want], base_mean, recent_max, want > lo_recent, res)

    has_prev = want > group_start
    gap = (t[want] - np.where(has_prev, t[want - 1], t[want])) / SECOND_US
    res[:, INDEX["card_secs_since_prev"]] = np.where(has_prev, np.minimum(gap, SECONDS_SINCE_CAP),
                                                     SECONDS_SINCE_CAP)

    small = np.concatenate(([0], np.cumsum(amount <= SMALL_AMOUNT)))
    lo_burst = np.searchsorted(key, k - BURST_WINDOW_US, side="right")
    res[:, INDEX["card_small_count_10m"]] = small[want + 1] - small[lo_burst]

    term, dev, ctry = (v[order].astype(np.int64) for v in (ev.terminal, ev.device, ev.country))
    if rows is None:  # every row: O(n log n) forms over the sorted rows
        lo_all = np.searchsorted(key, key - DAY_US, side="right")
        distinct = _distinct_in_window(card, term, lo_all)
        res[:, INDEX["card_distinct_terminals_1d"]] = distinct[want]
        for column, v in (("card_new_device", dev), ("card_new_country", ctry)):
            prev = _previous_same(card, v)[want]
            res[:, INDEX[column]] = (v[want] != 0) & ~((prev >= 0) & (prev >= lo_lookback))
    else:  # a few rows: look at their windows directly
        lo_day = np.searchsorted(key, k - DAY_US, side="right")
        res[:, INDEX["card_distinct_terminals_1d"]] = distinct_in_slices(term, lo_day, want)
        for column, v in (("card_new_device", dev), ("card_new_country", ctry)):
            seen = seen_in_slices(v, lo_lookback, want)
            res[:, INDEX[column]] = (v[want] != 0) & ~seen

    columns = [INDEX[c] for c in CARD_COLUMNS]
    out[:, columns] = res[:, columns]


def _card_features_in_groups(ev: CardEvents, out: np.ndarray, rows: np.ndarray,
                             limit: int) -> None:
    """:func:`card_features` for `rows`, over groups of fewer than `limit` cards each (so
    each group's int64 keys fit); cards never see each other, so the result is the same."""
    group = ev.card // limit
    for g in np.unique(group[rows]).tolist():
        sel = np.flatnonzero(group == g)
        mine = np.flatnonzero(group[rows] == g)
        part = CardEvents(card=ev.card[sel] - g * limit, t_us=ev.t_us[sel],
                          amount=ev.amount[sel], terminal=ev.terminal[sel],
                          device=ev.device[sel], country=ev.country[sel])
        res = np.zeros((len(mine), out.shape[1]), dtype=np.float64)
        card_features(part, res, rows=np.searchsorted(sel, rows[mine]))
        columns = [INDEX[c] for c in CARD_COLUMNS]
        out[np.ix_(mine, columns)] = res[:, columns]


def baseline_columns(amount: np.ndarray, base_mean: np.ndarray, recent_max: np.ndarray,
                     has_recent: np.ndarray, res: np.ndarray) -> None:
    """Amount and the card's largest recent amount, each over its mean 14-30 days before."""
    known = base_mean > 0
    res[:, INDEX["card_amount_ratio_baseline"]] = np.divide(
        amount, base_mean, out=np.ones(len(amount)), where=known)
    res[:, INDEX["card_max_ratio_14d"]] = np.divide(
        recent_max, base_mean, out=np.zeros(len(amount)), where=known & has_recent)


def slice_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(values[lo_i:hi_i]) per i (0 for an empty slice).

    Few short slices (online: a batch's windows inside the arena) are read directly; many
    (offline: every row's window) go through a sparse table, O(n log L) for windows of up to
    L rows, instead of materialising every window's rows."""
    n = len(lo)
    out = np.zeros(n, dtype=np.float64)
    length = np.maximum(hi - lo, 0)
    total = int(length.sum())
    if total == 0:
        return out
    if total <= 4 * len(values) // max(int(length.max()).bit_length(), 1) or n < 64:
        _, pos = ragged(lo, hi)
        full = length > 0  # slices lie back to back in `pos`: one reduceat over them
        first = (np.cumsum(length) - length)[full]
        out[full] = np.maximum.reduceat(values[pos], first)
        return out
    rows = np.flatnonzero(length > 0)
    level = np.frexp(length[rows].astype(np.float64))[1] - 1  # floor(log2(length))
    table = np.asarray(values, dtype=np.float64)
    for k in range(int(level.max()) + 1):
        mine = rows[level == k]
        if mine.size:
            out[mine] = np.maximum(table[lo[mine]], table[hi[mine] - (1 << k)])
        if k < int(level.max()):
            table = np.maximum(table[:-(1 << k)], table[1 << k:])
    return out


def ragged(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slice id, position) for every position of the slices [lo_i, hi_i)."""
    lengths = np.maximum(hi - lo, 0)
    owner = np.repeat(np.arange(len(lo)), lengths)
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return owner, starts + np.arange(int(lengths.sum()))


def distinct_in_slices(value: np.ndarray, lo: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Distinct values among positions [lo_i, at_i] for each i."""
    owner, pos = ragged(lo, at + 1)
    pairs = np.unique(owner * (2**32) + value[pos])
    return np.bincount(pairs // (2**32), minlength=len(at)).astype(np.float64)


def seen_in_slices(value: np.ndarray, lo: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Whether value[at_i] occurs among positions [lo_i, at_i)."""
    prev = at - 1  # most often the card's previous event has it: no need to look further
    seen = (prev >= lo) & (value[np.maximum(prev, 0)] == value[at])
    rest = np.flatnonzero(~seen)
    if rest.size:
        owner, pos = ragged(lo[rest], at[rest])
        hit = value[pos] == value[at[rest]][owner]
        seen[rest] = np.bincount(owner[hit], minlength=len(rest)) > 0
    return seen


def _distinct_in_window(card: np.ndarray, value: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Distinct values among rows [lo_i, i] for every i (rows sorted by card and time).

    Row j counts for row i when it is the first of its value inside i's window, that is
    prev_j < lo_i <= j <= i. lo is non-decreasing, so those i form a range: add +1/-1 at
    its ends and take a running sum.
    """
    n = len(card)
    prev = _previous_same(card, value)
    j = np.arange(n)
    first_i = np.maximum(np.searchsorted(lo, prev, side="right"), j)
    last_i = np.searchsorted(lo, j, side="right") - 1
    ok = first_i <= last_i
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, first_i[ok], 1)
    np.add.at(diff, last_i[ok] + 1, -1)
    return np.cumsum(diff)[:n].astype(np.float64)


def first_after(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray
                ) -> np.ndarray:
    """Per i, the first position in [lo_i, hi_i) whose value exceeds x_i (hi_i if none), for
    slices sorted ascending: one vectorised binary search over many slices of one array."""
    lo, hi = lo.copy(), hi.copy()
    last = len(values) - 1
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) >> 1
        right = active & (values[np.minimum(mid, last)] <= x)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


def card_features_at(rec_t: np.ndarray, amount: np.ndarray, cum_cents: np.ndarray,
                     cum_small: np.ndarray, terminal: np.ndarray, device: np.ndarray,
                     country: np.ndarray, start: np.ndarray, pos: np.ndarray,
                     out: np.ndarray) -> None:
    """:func:`card_features` for the events at `pos` of a columnar store in which each
    card's events lie contiguous from `start` (per requested row) in (time, arrival) order,
    with inclusive running sums of cents and of small amounts.

    Each window is a binary search inside the card's own rows and a difference of running
    sums, so the cost does not grow with the history held; the arithmetic is that of
    :func:`card_features`, so the numbers are the same bit for bit.
    """
    n = len(pos)
    if n == 0:
        return
    res = np.empty((n, out.shape[1]), dtype=np.float64)
    t = rec_t[pos]
    spans = [days * DAY_US for days in CARD_WINDOWS_DAYS] + [BURST_WINDOW_US]
    for span in (CARD_LOOKBACK_US, RECENT_WINDOW_US):
        if span not in spans:
            spans.append(span)
    bounds = first_after(rec_t, np.tile(start, len(spans)), np.tile(pos, len(spans)),
                         np.concatenate([t - span for span in spans])).reshape(len(spans), n)
    for j, days in enumerate(CARD_WINDOWS_DAYS):
        lo = bounds[j]
        count = pos - lo + 1
        cents = cum_cents[pos] - cum_cents[lo] + np.rint(amount[lo] * 100.0).astype(np.int64)
        res[:, INDEX[f"card_count_{days}d"]] = count
        res[:, INDEX[f"card_mean_amount_{days}d"]] = cents / 100.0 / count
    lo_burst, lo_lookback = bounds[len(CARD_WINDOWS_DAYS)], bounds[spans.index(CARD_LOOKBACK_US)]
    mean_30d = res[:, INDEX["card_mean_amount_30d"]]
    res[:, INDEX["card_amount_ratio_30d"]] = np.divide(amount[pos], mean_30d,
                                                       out=np.ones(n), where=mean_30d > 0)
    lo_recent = bounds[spans.index(RECENT_WINDOW_US)]
    base_n = lo_recent - lo_lookback
    last_base = np.maximum(lo_recent - 1, lo_lookback)  # inclusive sums: [lo, lo_recent)
    base_cents = (cum_cents[last_base] - cum_cents[lo_lookback]
                  + np.rint(amount[lo_lookback] * 100.0).astype(np.int64))
    base_mean = np.divide(base_cents, 100.0 * base_n, out=np.zeros(n), where=base_n > 0)
    recent_max = slice_max(amount, lo_recent, pos)
    baseline_columns(amount[pos], base_mean, recent_max, pos > lo_recent, res)
    has_prev = pos > start
    gap = (t - np.where(has_prev, rec_t[pos - has_prev], t)) / SECOND_US
    res[:, INDEX["card_secs_since_prev"]] = np.where(has_prev, np.minimum(gap, SECONDS_SINCE_CAP),
                                                     SECONDS_SINCE_CAP)
    res[:, INDEX["card_small_count_10m"]] = (cum_small[pos] - cum_small[lo_burst]
                                             + (amount[lo_burst] <= SMALL_AMOUNT))
    lo_day = bounds[CARD_WINDOWS_DAYS.index(1)]
    res[:, INDEX["card_distinct_terminals_1d"]] = distinct_in_slices(terminal, lo_day, pos)
    for column, v in (("card_new_device", device), ("card_new_country", country)):
        res[:, INDEX[column]] = (v[pos] != 0) & ~seen_in_slices(v, lo_lookback, pos)
    columns = [INDEX[c] for c in CARD_COLUMNS]
    out[:, columns] = res[:, columns]


CARD_COLUMNS: tuple[str, ...] = (
    *[f"card_count_{d}d" for d in CARD_WINDOWS_DAYS],
    *[f"card_mean_amount_{d}d" for d in CARD_WINDOWS_DAYS],
    "card_amount_ratio_30d", "card_secs_since_prev", "card_small_count_10m",
    "card_distinct_terminals_1d", "card_new_device", "card_new_country",
    "card_amount_ratio_baseline", "card_max_ratio_14d",
)


def terminal_window_bounds(hour: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per window length (days): the [first, end) hour buckets of the delayed window."""
    end = hour - TERMINAL_DELAY_HOURS
    return {d: (end - 24 * d, end) for d in TERMINAL_WINDOWS_DAYS}


def terminal_columns(counts: dict[int, np.ndarray], frauds: dict[int, np.ndarray],
                     out: np.ndarray) -> None:
    """Counts and fraud shares of the delayed terminal windows."""
    for d in TERMINAL_WINDOWS_DAYS:
        c = counts[d].astype(np.float64)
        out[:, INDEX[f"terminal_count_{d}d"]] = c
        out[:, INDEX[f"terminal_risk_{d}d"]] = np.divide(
            frauds[d], c, out=np.zeros_like(c), where=c > 0
        )


def label_rate(n: np.ndarray, fraud: np.ndarray) -> np.ndarray:
    n = n.astype(np.float64)
    return np.divide(fraud.astype(np.float64), n, out=np.zeros_like(n), where=n > 0)


def hours_of(t_us: np.ndarray) -> np.ndarray:
    return np.floor_divide(t_us, HOUR_US)
