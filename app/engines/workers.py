"""`--workers N`: N scoring processes in one consumer group, supervised.

Each worker is a separate process (the GIL and ONNX Runtime's single-thread sessions make
processes the unit of scale) with a stable index: it names the worker's transactional id
and static group membership, so a restarted worker fences its predecessor and takes its
partitions back without a group-wide rebalance. The supervisor forwards SIGTERM/SIGINT
(each worker finishes or aborts its batch, then leaves) and restarts a worker that died,
with backoff, so one poison bug does not take the service down silently.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

log = logging.getLogger("fraudscore.workers")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_GRACE_S = 60.0


# Young-generation collections only after this many net new container objects. A batch
# keeps some 10k objects alive at once (records, parsed events, outputs): at CPython's
# default of 700 every batch ran about 7 collections that promoted its short-lived objects
# into older generations, 5-6 % of the pipeline's time (gc callbacks, 1,000-event batches).
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Call once a worker has loaded its model: what exists then (modules, model, schemas)
    lives as long as the process, so it is frozen out of every later collection, and
    batch-sized garbage is left to reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def supervise(n: int, target: Callable[[int], None], stop: threading.Event,
              first_id: int = 0) -> int:
    """Run `target(worker_id)` in N processes until `stop`; returns the exit status."""
    ctx = mp.get_context("spawn")  # no forked Kafka/Redis clients or ORT sessions
    procs: dict[int, BaseProcess] = {}
    failures: dict[int, int] = {}
    restart_at: dict[int, float] = {}

    def start(i: int) -> None:
        p = ctx.Process(target=target, args=(i,), name=f"fraudscore-worker-{i}", daemon=False)
        p.start()
        procs[i] = p
        log.info("worker %d started (pid %s)", i, p.pid)

    for i in range(first_id, first_id + n):
        start(i)
    status = 0
    while not stop.wait(0.5):
        now = time.monotonic()
        for i, p in list(procs.items()):
            if p.is_alive() or i in restart_at:
                continue
            failures[i] = failures.get(i, 0) + 1
            delay = RESTART_BACKOFF_S[min(failures[i], len(RESTART_BACKOFF_S)) - 1]
            log.error("worker %d exited with %s; restarting in %.0fs", i, p.exitcode, delay)
            restart_at[i] = now + delay
            status = 1
        for i, when in list(restart_at.items()):
            if now >= when:
                del restart_at[i]
                start(i)
    for p in procs.values():
        if p.is_alive() and p.pid is not None:
            p.terminate()  # SIGTERM: the worker finishes or aborts its batch
    deadline = time.monotonic() + STOP_GRACE_S
    for i, p in procs.items():
        p.join(max(deadline - time.monotonic(), 0.1))
        if p.is_alive():
            log.error("worker %d did not stop within %.0fs; killing it", i, STOP_GRACE_S)
            p.kill()
            p.join(5)
            status = 1
        elif p.exitcode not in (0, -signal.SIGTERM):
            status = 1
    return status
