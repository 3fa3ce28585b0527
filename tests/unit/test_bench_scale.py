"""`bench features --processes`: a worker process that dies ends the run with an error."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from app.bench import _results


def test_a_dead_process_is_named_instead_of_waited_for() -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    dead = ctx.Process(target=os._exit, args=(3,), name="owner-1")
    dead.start()
    dead.join(timeout=30)
    with pytest.raises(RuntimeError, match="owner-1 exited with code 3"):
        _results([dead], out)


def test_results_are_collected_from_every_process() -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    for i in range(2):
        out.put((10 * (i + 1), 0.0, 1.0))
    procs = [ctx.Process(target=os._exit, args=(0,)) for _ in range(2)]
    assert sorted(r[0] for r in _results(procs, out)) == [10, 20]
