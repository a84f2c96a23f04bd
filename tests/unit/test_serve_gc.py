import gc
from collections.abc import Iterator

import pytest

from worker.serve import GC_THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_tune_gc_freezes_start_up_objects_and_collects_less_often(restore_gc: None) -> None:
    kept = [object() for _ in range(10)]  # alive at start-up, like the node's modules
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 700
    assert gc.get_freeze_count() > len(kept)
