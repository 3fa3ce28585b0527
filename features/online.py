"""Online feature state in Redis: one read and one atomic write per batch.

Layout (keys carry a hash tag per entity so they can live on Redis Cluster later):

- ``{ns}:card:{<token>}``: the card state, 12 little-endian float64 (96 bytes);
- ``{ns}:seen:{<event hour>}``: a hash, transaction id → the features that event got, kept
  for ``snapshot_ttl_s`` after its last write. Bucketing by the event's own hour lets a batch
  read and write its snapshots with one HMGET/HSET per hour instead of one command per event.

Redis writes are not part of the Kafka transaction, so a batch may be redelivered after its
state was written. The snapshot makes that safe: a redelivered event gets the features it
got the first time, and its state update is not applied twice. Snapshots and state change
together in one MULTI/EXEC, so a crash leaves either both or neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import redis

from features.definitions import N_FEATURES, STATE_DTYPE, STATE_SIZE
from features.kernel import Events, apply_events, empty_states

_STATE_BYTES = STATE_SIZE * STATE_DTYPE.itemsize
_FEATURE_BYTES = N_FEATURES * 8


class FeatureStoreUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error; the batch was not applied."""


class RedisFeatureStore:
    """Card features kept in Redis; `update_many` reads, computes and writes one batch."""

    def __init__(self, client: redis.Redis, namespace: str = "fs", snapshot_ttl_s: int = 86_400):
        self._r = client
        self._ns = namespace
        self._ttl = snapshot_ttl_s

    def _card_key(self, card: str) -> str:
        return f"{self._ns}:card:{{{card}}}"

    def _seen_key(self, hour: int) -> str:
        return f"{self._ns}:seen:{{{hour}}}"

    def update_many(
        self, cards: Sequence[str], transaction_ids: Sequence[str], events: Events
    ) -> np.ndarray:
        """Features for a batch (rows in input order), applying each new event exactly once."""
        n = len(events)
        if n == 0:
            return np.empty((0, N_FEATURES), dtype=np.float64)
        unique_cards, card_idx = np.unique(np.asarray(cards, dtype=object), return_inverse=True)
        tx_ids = list(transaction_ids)
        hours = np.floor(events.t / 3600.0).astype(np.int64)
        buckets = {int(h): np.flatnonzero(hours == h) for h in np.unique(hours)}
        card_keys = [self._card_key(c) for c in unique_cards]
        try:
            pipe = self._r.pipeline(transaction=False)
            for hour, rows in buckets.items():
                pipe.hmget(self._seen_key(hour), [tx_ids[i] for i in rows])
            pipe.mget(card_keys)
            *found, raw_states = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"reading feature state: {exc}") from exc
        snapshots: list[bytes | None] = [None] * n
        for rows, values in zip(buckets.values(), found, strict=True):
            for i, v in zip(rows, values, strict=True):
                snapshots[i] = v

        # A transaction id seen earlier in this batch is a duplicate delivery: it takes the
        # features of its first occurrence and is not applied again.
        _, first, dup_of = np.unique(
            np.asarray(transaction_ids, dtype=object), return_index=True, return_inverse=True
        )
        first_of = first[dup_of]
        out = np.empty((n, N_FEATURES), dtype=np.float64)
        replayed = np.fromiter(
            (s is not None and len(s) == _FEATURE_BYTES for s in snapshots), dtype=bool, count=n
        )
        if replayed.any():
            rows = np.flatnonzero(replayed)
            blob = b"".join(snapshots[i] for i in rows)
            out[rows] = np.frombuffer(blob, dtype=STATE_DTYPE).reshape(len(rows), N_FEATURES)
        fresh = np.flatnonzero(~replayed & (first_of == np.arange(n)))
        copies = np.flatnonzero(~replayed & (first_of != np.arange(n)))
        if fresh.size == 0:
            out[copies] = out[first_of[copies]]
            return out

        states = _decode_states(raw_states)
        out[fresh] = apply_events(states, card_idx[fresh], events.take(fresh))
        out[copies] = out[first_of[copies]]

        touched = np.unique(card_idx[fresh])
        try:
            pipe = self._r.pipeline(transaction=True)
            pipe.mset({card_keys[i]: states[i].astype(STATE_DTYPE).tobytes() for i in touched})
            fresh_hours = hours[fresh]
            for hour in np.unique(fresh_hours):
                rows = fresh[fresh_hours == hour]
                key = self._seen_key(int(hour))
                pipe.hset(key, mapping={tx_ids[i]: out[i].astype(STATE_DTYPE).tobytes()
                                        for i in rows})
                pipe.expire(key, self._ttl)
            pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"writing feature state: {exc}") from exc
        return out

    def load_states(self, cards: Sequence[str], states: np.ndarray, chunk: int = 10_000) -> None:
        """Bulk-load card states computed offline (bootstrapping a fresh store)."""
        for start in range(0, len(cards), chunk):
            part = slice(start, start + chunk)
            mapping = {
                self._card_key(c): s.astype(STATE_DTYPE).tobytes()
                for c, s in zip(cards[part], states[part], strict=True)
            }
            self._r.mset(mapping)


def _decode_states(raw: list[bytes | None]) -> np.ndarray:
    """Stored states as an (n, STATE_SIZE) array; missing or corrupt entries start empty."""
    states = empty_states(len(raw))
    ok = [i for i, v in enumerate(raw) if v is not None and len(v) == _STATE_BYTES]
    if ok:
        blob = b"".join(raw[i] for i in ok)  # type: ignore[misc]
        states[ok] = np.frombuffer(blob, dtype=STATE_DTYPE).reshape(len(ok), STATE_SIZE)
    return states
