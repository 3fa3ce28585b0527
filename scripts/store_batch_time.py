"""Time the feature store alone, a batch at a time, over `fraudscore bench features`' stream.

No naive side and no second client: the figure to compare two builds (run it in each
checkout, alternating) or two shard counts with. Prints JSON; `--profile N` prints the
cProfile of the timed batches' top N functions to stderr.

    eval "$(scripts/stack.sh up)"
    .venv/bin/python scripts/store_batch_time.py --shards 16 [--url redis://...]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.bench import BenchConfig, _client, _drop, _slice, _store, _Stream
from features.definitions import HOUR_US


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--customers", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key")
    ap.add_argument("--new-hour-only", action="store_true",
                    help="profile only the batches that start an event hour")
    args = ap.parse_args()
    cfg = BenchConfig(customers=args.customers, terminals=2 * args.customers,
                      batch_size=args.batch, shards=args.shards)
    stream = _Stream.simulated(cfg)
    client = _client(args.url)
    ns = f"batchtime-{uuid.uuid4().hex[:8]}"
    store = _store(client, ns, cfg)
    stream.load(store)
    ev, b = stream.events, args.batch
    warm = len(ev) // 2 // b * b  # the first half warms the caches
    for a in range(0, warm, b):
        store.update_many(_slice(ev, a, a + b))
    prof = cProfile.Profile() if args.profile else None
    lat, new_hour = [], []
    for a in range(warm, len(ev) - b + 1, b):
        batch = _slice(ev, a, a + b)
        # a batch that starts an event hour loads that hour's bucket and slides the sums
        new_hour.append(int(batch.t_us.max() // HOUR_US) not in store._terminals.sums)
        if prof and (new_hour[-1] or not args.new_hour_only):
            prof.enable()
        t = time.perf_counter()
        store.update_many(batch)
        lat.append(time.perf_counter() - t)
        if prof:
            prof.disable()
    _drop(client, f"{ns}*")
    hour = np.array(new_hour)
    ms = np.array(lat) * 1000
    print(json.dumps({"shards": store._shards, "batches": len(lat), "batch_size": b,
                      "median_ms_per_batch": round(float(np.median(lat)) * 1000, 2),
                      "mean_ms_per_batch": round(float(np.mean(lat)) * 1000, 2),
                      "p99_ms_per_batch": round(float(np.quantile(lat, 0.99)) * 1000, 2),
                      "max_ms_per_batch": round(float(np.max(lat)) * 1000, 2),
                      "new_hour_batches": int(hour.sum()),
                      "new_hour_median_ms": round(float(np.median(ms[hour])), 2)
                      if hour.any() else None,
                      "other_median_ms": round(float(np.median(ms[~hour])), 2)}))
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats(args.sort).print_stats(args.profile)


if __name__ == "__main__":
    main()
