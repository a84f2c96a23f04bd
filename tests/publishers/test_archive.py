"""Deterministic archives: same content, same bytes, whatever the disk metadata."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from tests.publishers import make_results
from worker.errors import PublishError
from worker.publishers.archive import Stopped, build_file, write_archive


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def test_same_content_gives_same_bytes(tmp_path: Path) -> None:
    first = make_results(tmp_path / "one")
    a = tmp_path / "a.tar.gz"
    b = tmp_path / "b.tar.gz"
    info_a = await write_archive(first, a)
    info_b = await write_archive(first, b)
    assert a.read_bytes() == b.read_bytes()
    assert info_a == info_b
    assert info_a.size == a.stat().st_size


async def test_disk_metadata_does_not_matter(tmp_path: Path) -> None:
    first = make_results(tmp_path / "one")
    # The same content, created in another order, with other times and read bits.
    second = tmp_path / "two"
    files = tree_files(first)
    for name in reversed(sorted(files)):
        path = second / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
    (second / "outputs" / "empty-folder").mkdir()
    (second / "outputs" / "run.sh").chmod(0o700)
    (second / "outputs" / "a.txt").chmod(0o600)
    for i, path in enumerate(sorted(second.rglob("*"))):
        os.utime(path, (1_000_000 + i, 2_000_000_000 - i))
    a = tmp_path / "a.tar.gz"
    b = tmp_path / "b.tar.gz"
    await write_archive(first, a)
    await write_archive(second, b)
    assert a.read_bytes() == b.read_bytes()
    (second / "outputs" / "a.txt").write_text("changed\n")
    await write_archive(second, b)
    assert a.read_bytes() != b.read_bytes()


async def test_archive_layout(tmp_path: Path) -> None:
    root = make_results(tmp_path / "results")
    (root / "outputs" / "link").symlink_to("a.txt")
    target = tmp_path / "out.tar.gz"
    await write_archive(root, target)
    data = target.read_bytes()
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\0\0\0\0"  # gzip header mtime
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names, key=os.fsencode)
        assert "outputs/empty-folder" in names
        assert "outputs" in names
        assert names.index("outputs") < names.index("outputs/a.txt")
        for member in members:
            assert (member.mtime, member.uid, member.gid) == (0, 0, 0)
            assert (member.uname, member.gname) == ("", "")
            if member.isdir():
                assert member.mode == 0o755
        modes = {m.name: m.mode for m in members}
        assert modes["outputs/run.sh"] == 0o755
        assert modes["outputs/a.txt"] == 0o644
        link = tar.extractfile("outputs/link")
        assert link is not None
        assert link.read() == b"alpha\n"
        extracted = tmp_path / "extracted"
        tar.extractall(extracted, filter="data")
    (root / "outputs" / "link").unlink()
    (extracted / "outputs" / "link").unlink()
    assert tree_files(extracted) == tree_files(root)
    assert (extracted / "outputs" / "empty-folder").is_dir()


async def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    target = tmp_path / "out.tar.gz"
    await write_archive(tmp_path / "results", target)
    with tarfile.open(target, mode="r:gz") as tar:
        assert tar.getmembers() == []


@pytest.mark.parametrize(
    ("kind", "message"),
    [("escape", "leaves the results folder"), ("fifo", "not a regular file")],
)
async def test_refused_entries(tmp_path: Path, kind: str, message: str) -> None:
    root = make_results(tmp_path / "results")
    if kind == "escape":
        (root / "outputs" / "leak").symlink_to("/etc/hostname")
    else:
        os.mkfifo(root / "outputs" / "pipe")
    target = tmp_path / "out" / "x.tar.gz"
    target.parent.mkdir()
    with pytest.raises(PublishError, match=message):
        await write_archive(root, target)
    assert list(target.parent.iterdir()) == []


def test_stopped_build_leaves_nothing(tmp_path: Path) -> None:
    root = make_results(tmp_path / "results")
    target = tmp_path / "out" / "x.tar.gz"
    target.parent.mkdir()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        build_file(root, target, stop)
    assert list(target.parent.iterdir()) == []


async def test_cancelled_write_leaves_nothing(tmp_path: Path) -> None:
    root = make_results(tmp_path / "results")
    (root / "outputs" / "big").write_bytes(os.urandom(4 << 20))
    target = tmp_path / "out" / "x.tar.gz"
    target.parent.mkdir()
    task = asyncio.create_task(write_archive(root, target))
    await asyncio.sleep(0)  # let it start its thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(target.parent.iterdir()) == []
