import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.config import load_config
from worker.node import Node, StartupError
from worker.serve import EXIT_BROKER, GC_THRESHOLDS, serve, tune_gc


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


async def test_the_node_starts_with_the_collector_tuned(
    restore_gc: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery allocates an execution per live one: at CPython's thresholds the
    collector walked every module's objects again and again while it did."""
    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, int, int]] = []

    async def start(self: Node) -> None:  # observes the collector, then stops serve
        seen.append(gc.get_threshold())
        raise StartupError(EXIT_BROKER, "stopped by the test")

    monkeypatch.setattr(Node, "start", start)
    config = load_config({"nats_url": "nats://127.0.0.1:1", "data_dir": str(tmp_path / "data")}, {})
    assert await serve(config) == EXIT_BROKER
    assert seen == [GC_THRESHOLDS]
