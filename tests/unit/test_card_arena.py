"""The card arena's bookkeeping against a plain model: appends, late inserts, trims,
evictions and reloads in random order; regions never overlap and every card's records
and running sums stay exact while regions move, slide back and are reused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from features.card_arena import CARD_RECORD, CardArena
from features.definitions import SMALL_AMOUNT


def _records(rng: np.random.Generator, n: int, t0: int) -> np.ndarray:
    rec = np.zeros(n, dtype=CARD_RECORD)
    rec["t_us"] = t0 + rng.integers(0, 5, n)  # ties on purpose
    rec["amount"] = rng.choice([0.5, 3.0, 12.34, 99.99, 1e6], n)
    rec["tx"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    return rec


def _check(arena: CardArena, model: dict[str, list[np.void]]) -> None:
    assert set(arena.slot) == set(model)
    spans = []
    for token, kept in model.items():
        s = arena.slot[token]
        a, n = int(arena.start[s]), int(arena.length[s])
        assert arena.base[s] <= a and a + n <= arena.base[s] + arena.cap[s]
        spans.append((int(arena.base[s]), int(arena.base[s] + arena.cap[s])))
        expected = np.array(kept, dtype=CARD_RECORD)
        order = np.argsort(expected["t_us"], kind="stable")  # arrival breaks ties
        assert arena.records_of(token) == expected[order].tobytes()
        assert np.array_equal(arena.t[a:a + n], expected["t_us"][order])
        cents = np.rint(expected["amount"][order] * 100).astype(np.int64)
        assert np.array_equal(np.diff(arena.cum_cents[a:a + n]), cents[1:])
        small = (expected["amount"][order] <= SMALL_AMOUNT).astype(np.int64)
        assert np.array_equal(np.diff(arena.cum_small[a:a + n]), small[1:])
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # regions never overlap


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_every_card_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    arena = CardArena(capacity=25, key=lambda c: f"k:{c}")
    model: dict[str, list[np.void]] = {}
    clock = 1_000
    for _ in range(60):
        tokens = [f"c{i}" for i in rng.choice(60, size=rng.integers(1, 30), replace=False)]
        slots = arena.lookup(tokens)
        missing = [t for t, s in zip(tokens, slots.tolist(), strict=True) if s < 0]
        # a card read back from "Redis": a random history, arrival order not time order
        blobs = [_records(rng, int(rng.integers(0, 40)), clock - 50).tobytes()
                 for _ in missing]
        arena.load(missing, blobs)
        for token, blob in zip(missing, blobs, strict=True):
            model[token] = list(np.frombuffer(blob, dtype=CARD_RECORD))
        rows = rng.choice(tokens, size=int(rng.integers(1, 80)))
        clock += 10
        new = _records(rng, len(rows), clock)
        late = rng.random(len(rows)) < 0.1
        new["t_us"][late] -= rng.integers(10, 200, int(late.sum()))
        row_slots = arena.lookup(list(rows))
        pos = arena.insert(row_slots, new)
        assert np.array_equal(arena.t[pos], new["t_us"])
        order = np.lexsort((np.arange(len(rows)), new["t_us"]))
        for i in order.tolist():
            model[rows[i]].append(new[i])
        for token in rng.choice(tokens, size=2).tolist():  # trims
            horizon = clock - int(rng.integers(0, 100))
            slot = arena.slot[token]
            cut = arena.head_through(slot, horizon)
            arena.drop_head(np.array([slot]), np.array([cut]))
            kept = sorted(model[token], key=lambda r: r["t_us"])  # stable: arrival on ties
            assert cut == sum(r["t_us"] <= horizon for r in kept)
            model[token] = [r for r in kept if r["t_us"] > horizon]
        if rng.random() < 0.2:
            dropped = rng.choice(tokens, size=3).tolist()
            arena.drop(dropped)
            for token in dropped:
                model.pop(token, None)
        arena.evict()
        for token in [t for t in model if t not in arena.slot]:
            del model[token]
        # model order within a card: time, then arrival (the arena's order too)
        for token in model:
            kept = model[token]
            model[token] = [kept[i] for i in np.argsort([r["t_us"] for r in kept],
                                                        kind="stable")]
        _check(arena, model)
        assert len(arena) <= arena.capacity + len(tokens)
