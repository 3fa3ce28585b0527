"""Worker process set-up that needs no servers."""

from __future__ import annotations

import gc

from app.engines.workers import GC_YOUNG_THRESHOLD, tune_gc


def test_tune_gc_freezes_startup_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    survivors = [[i] for i in range(1000)]  # tracked containers alive at start-up
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > len(survivors)  # frozen: no collection scans them
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
