"""CPU of one scoring batch against its size, on the real Redis and without Kafka.

Fits ``cpu = fixed + per_event * n`` over batch sizes 25 to 1,000 (median of the repeats,
sizes interleaved). The fixed part is what a batch costs however few events it holds: under
light input the engine's batches are small, so it sets how long each waits.

    eval "$(scripts/stack.sh up)"
    FRAUDSCORE_REDIS_URL=$REDIS_URL .venv/bin/python scripts/batch_cost.py

Prints one JSON object. Needs the token, PII and audit keys the service needs; random ones
are used when they are not set.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = (25, 50, 100, 200, 400, 1000)
REPEATS = 12


def main() -> None:
    for name in ("FRAUDSCORE_TOKEN_KEY", "FRAUDSCORE_PII_KEY", "FRAUDSCORE_AUDIT_KEY"):
        os.environ.setdefault(name, base64.b64encode(os.urandom(32)).decode())
    import redis

    from app import factory
    from app.bench_e2e import simulate_stream, train_model
    from app.config import load_settings
    from app.pipeline import InputRecord

    namespace = f"batch-cost-{uuid.uuid4().hex[:8]}"  # a namespace of its own, dropped after
    os.environ["FRAUDSCORE_REDIS_NAMESPACE"] = namespace
    settings = load_settings()
    ref = train_model(Path(tempfile.mkdtemp()))
    token_key, pii_key = factory.keys_from_settings(settings)
    client = redis.Redis.from_url(settings.redis_url)
    scorer = factory.build_scorer(settings, client, ref, token_key, pii_key)
    stream = simulate_stream(2000 + REPEATS * sum(SIZES), seed=3)
    records = [InputRecord(v, k, "transactions", 0, i)
               for i, (k, v) in enumerate(zip(stream.keys, stream.values, strict=True))]
    at = 0

    def one(n: int) -> tuple[float, float]:
        nonlocal at
        batch, at = records[at:at + n], at + n
        cpu, wall = time.process_time(), time.perf_counter()
        scorer.process(batch)
        scorer.batch_committed()
        return time.process_time() - cpu, time.perf_counter() - wall

    try:
        one(2000)  # first-call costs (the explainer, caches) stay out
        got: dict[int, list[tuple[float, float]]] = {n: [] for n in SIZES}
        for _ in range(REPEATS):
            for n in SIZES:
                got[n].append(one(n))
    finally:
        for key in client.scan_iter(f"{namespace}*", count=10_000):
            client.unlink(key)
    cpu_ms = np.array([np.median([c for c, _ in got[n]]) * 1000 for n in SIZES])
    per_event, fixed = np.polyfit(np.array(SIZES), cpu_ms, 1)
    print(json.dumps({
        "batches": {str(n): {"cpu_ms": round(float(c), 2),
                             "wall_ms": round(float(np.median([w for _, w in got[n]])) * 1000, 2),
                             "cpu_us_per_event": round(float(c) / n * 1000, 1)}
                    for n, c in zip(SIZES, cpu_ms, strict=True)},
        "fit": {"fixed_cpu_ms": round(float(fixed), 2),
                "cpu_us_per_event": round(float(per_event) * 1000, 1)},
        "audit_scope": settings.audit_scope,
    }))


if __name__ == "__main__":
    main()
