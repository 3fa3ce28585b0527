"""Hour buckets name terminals by 64-bit key: pure logic of the key map and chunk format."""

from __future__ import annotations

import hashlib

import numpy as np

from features.definitions import TERMINAL_DELAY_HOURS, TERMINAL_WINDOWS_DAYS
from features.online import (
    _pack_counts,
    _pack_names,
    _TerminalWindows,
    _unpack_counts,
    terminal_keys,
)


def test_keys_are_stable_and_distinct() -> None:
    names = [f"T{i}" for i in range(50_000)]
    keys = terminal_keys(names)
    assert keys.dtype == np.uint64
    assert len(np.unique(keys)) == len(names)
    # the same in every process: blake2b's first 8 bytes, not Python's salted hash
    digest = hashlib.blake2b(b"T0", digest_size=8).digest()
    assert int(keys[0]) == int.from_bytes(digest, "little")
    assert (terminal_keys(names[::-1]) == keys[::-1]).all()


def test_key_first_then_name_share_one_index() -> None:
    w = _TerminalWindows(refresh_s=60.0)
    seen = w.idx(["a", "b"])
    # a bucket from another worker names "c" and "b" by key only
    by_key = w.idx_of_keys(terminal_keys(["c", "b", "c"]))
    assert by_key[1] == seen[1] and by_key[0] == by_key[2] and by_key[0] not in seen
    assert w.names[by_key[0]] == ""
    # when this worker sees "c" by name it gets the index the key already had
    assert w.idx(["c", "a"]).tolist() == [by_key[0], seen[0]]
    assert w.names[by_key[0]] == "c"
    assert (w.keys[[seen[0], seen[1], by_key[0]]] == terminal_keys(["a", "b", "c"])).all()


def test_many_keys_keep_the_sorted_map_consistent() -> None:
    rng = np.random.default_rng(3)
    w = _TerminalWindows(refresh_s=60.0)
    names = [f"T{i}" for i in range(5_000)]
    for _ in range(20):
        pick = rng.choice(len(names), 300).tolist()
        if rng.random() < 0.5:
            w.idx([names[i] for i in pick])
        else:
            w.idx_of_keys(terminal_keys([names[i] for i in pick]))
    assert len(np.unique(w.keys)) == len(w.keys) == len(w.names)
    ids = w.idx_of_keys(w.keys)
    assert (ids == np.arange(len(w.keys))).all()


def test_chunk_round_trip_and_name_chunks_still_read() -> None:
    keys = terminal_keys(["x", "y", "z"])
    counts = np.array([1, 7, 2])
    k, c = _unpack_counts(_pack_counts(keys, counts))
    assert (k == keys).all() and c.tolist() == [1, 7, 2]
    # the chunk format before keys: length-prefixed names, then their counts
    old = _pack_names(["x", "y", "z"]) + counts.astype("<u4").tobytes()
    k, c = _unpack_counts(old)
    assert (k == keys).all() and c.tolist() == [1, 7, 2]
    empty_k, empty_c = _unpack_counts(_pack_counts(np.zeros(0, dtype=np.uint64),
                                                   np.zeros(0, dtype=np.int64)))
    assert len(empty_k) == len(empty_c) == 0


def test_sliding_sums_match_a_fresh_sum_and_stay_bounded() -> None:
    """Each hour's window sums slide from the previous hour's into reused arrays; they
    equal sums built from scratch, and the arrays do not outgrow the terminals."""
    rng = np.random.default_rng(5)
    w = _TerminalWindows(refresh_s=1e9)
    fresh = _TerminalWindows(refresh_s=1e9)
    names = [f"T{i}" for i in range(3_000)]
    first = 1_000
    for b in range(first - TERMINAL_DELAY_HOURS - 24 * 30 - 2, first + 120):
        seen = min(len(names), 200 + 4 * (b - first + 1_000))  # terminals keep appearing
        pick = rng.choice(seen, 40)
        chunk = _pack_counts(terminal_keys([names[i] for i in pick]),
                             rng.integers(1, 4, len(pick)))
        fraud = {names[int(pick[0])].encode(): b"1"} if b % 5 == 0 else {}
        w.store(b, [chunk], fraud)
        fresh.store(b, [chunk], fraud)
    for h in range(first, first + 120):
        w.idx([f"N{h}-{i}" for i in range(60)])  # events bring terminals not in a bucket
        counts, frauds = w.window_sums(h)
        fresh.sums.clear()  # from scratch: no previous hour to slide from
        want_c, want_f = fresh.window_sums(h)
        for d in TERMINAL_WINDOWS_DAYS:
            n = len(w.names)
            ids = fresh.idx_of_keys(w.keys)  # the two maps index terminals differently
            assert (counts[d][: len(w.keys)] == want_c[d][ids]).all()
            assert (frauds[d][: len(w.keys)] == want_f[d][ids]).all()
            assert not counts[d][len(w.keys):].any()
            assert len(counts[d]) <= n + n // 8 + 1024


def test_partitions_at_different_hours_keep_sliding() -> None:
    """Two partitions 5 hours apart advance in turn: each one's previous hour stays cached,
    so every hour slides from it. Keeping the newest hours instead dropped the hour behind
    the moment it was summed, and each hour of the slower partition started from scratch."""
    w = _TerminalWindows(refresh_s=1e9)
    keys = terminal_keys([f"T{i}" for i in range(50)])
    first = 2_000
    for b in range(first - TERMINAL_DELAY_HOURS - 24 * 30 - 2, first + 30):
        w.store(b, [_pack_counts(keys, np.ones(len(keys), dtype=np.int64))], {})
    for step in range(20):
        for hour in (first + step, first + 5 + step):
            if step:
                assert hour - 1 in w.sums, f"hour {hour - 1} dropped before {hour} slid from it"
            counts, _ = w.window_sums(hour)
            assert counts[1][:50].tolist() == [24] * 50  # one per terminal and hour
    assert len(w.sums) <= 6
