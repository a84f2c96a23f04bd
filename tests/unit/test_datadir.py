"""The data dir: its lock (exit 3), node ID persistence and mismatch (exit 4), paths."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.datadir import DataDir, DataDirError, DataDirLocked, NodeIDMismatch

HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from worker.datadir import DataDir
    d = DataDir(sys.argv[1])
    d.lock()
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
    """
)

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[DataDir]:
    data_dir = DataDir(tmp_path / "data")
    data_dir.lock()
    yield data_dir
    data_dir.unlock()


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "data"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(DataDirLocked) as info:
            DataDir(path).lock()
        assert info.value.exit_code == 3
        assert str(path) in str(info.value)
        assert f"pid {holder.pid}" in str(info.value)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        assert holder.stdout is not None
        holder.stdout.close()
    # The holder is gone, so the kernel released its lock.
    with DataDir(path) as data_dir:
        assert data_dir.locked


def test_lock_is_exclusive_within_a_process_too(locked: DataDir) -> None:
    with pytest.raises(DataDirLocked):
        DataDir(locked.path).lock()
    locked.lock()  # idempotent for the holder
    locked.unlock()
    locked.unlock()
    other = DataDir(locked.path)
    other.lock()
    other.unlock()


def test_lock_creates_the_tree_with_mode_0700(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "new" / "data")
    with data_dir:
        for path in (data_dir.path, data_dir.results_dir(), data_dir.broker_dir()):
            assert path.is_dir()
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert data_dir.lock_path.read_text().strip().isdigit()


def test_paths(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path / "d")
    assert data_dir.db_path() == tmp_path / "d" / "worker.db"
    assert data_dir.results_dir() == tmp_path / "d" / "results"
    assert data_dir.results_dir("e-1") == tmp_path / "d" / "results" / "e-1"
    assert data_dir.broker_dir() == tmp_path / "d" / "broker"
    assert DataDir("relative").path.is_absolute()


def test_generated_node_id_is_persisted(locked: DataDir) -> None:
    assert locked.persisted_node_id() is None
    node_id = locked.resolve_node_id(None, has_executions=False)
    assert re.fullmatch(f"n-{UUID4}", node_id)
    assert locked.node_id_path.read_text() == node_id + "\n"
    assert locked.resolve_node_id(None, has_executions=True) == node_id
    assert locked.resolve_node_id("", has_executions=True) == node_id
    assert not list(locked.path.glob(".*tmp"))  # the atomic write left nothing behind


def test_requested_node_id_is_persisted(locked: DataDir) -> None:
    assert locked.resolve_node_id("n1", has_executions=False) == "n1"
    assert locked.persisted_node_id() == "n1"
    assert locked.resolve_node_id("n1", has_executions=True) == "n1"
    assert locked.resolve_node_id(None, has_executions=True) == "n1"


def test_different_node_id_with_executions_is_a_mismatch(locked: DataDir) -> None:
    locked.resolve_node_id("n1", has_executions=False)
    with pytest.raises(NodeIDMismatch) as info:
        locked.resolve_node_id("n2", has_executions=True)
    assert info.value.exit_code == 4
    assert (info.value.persisted, info.value.requested) == ("n1", "n2")
    assert "n1" in str(info.value) and "n2" in str(info.value)
    assert locked.persisted_node_id() == "n1"


def test_different_node_id_without_executions_is_adopted(locked: DataDir) -> None:
    locked.resolve_node_id("n1", has_executions=False)
    assert locked.resolve_node_id("n2", has_executions=False) == "n2"
    assert locked.persisted_node_id() == "n2"


def test_node_id_survives_a_new_data_dir_object(tmp_path: Path) -> None:
    with DataDir(tmp_path / "d") as first:
        node_id = first.resolve_node_id(None, has_executions=False)
    with DataDir(tmp_path / "d") as second:
        assert second.resolve_node_id(None, has_executions=False) == node_id


def test_corrupt_persisted_node_id(locked: DataDir) -> None:
    locked.node_id_path.write_text("bad id\n")
    with pytest.raises(DataDirError, match="invalid node ID 'bad id'"):
        locked.resolve_node_id(None, has_executions=False)


def test_resolve_needs_the_lock_and_a_valid_id(tmp_path: Path, locked: DataDir) -> None:
    with pytest.raises(RuntimeError, match="lock"):
        DataDir(tmp_path / "other").resolve_node_id("n1", has_executions=False)
    with pytest.raises(ValueError, match="invalid node ID"):
        locked.resolve_node_id("n1\n", has_executions=False)
