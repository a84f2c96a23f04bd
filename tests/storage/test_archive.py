"""Safe extraction: what a good archive gives, and every member that is refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from worker.errors import EngineError
from worker.storage.archive import Budget, NewFile, extract, target

Member = tuple[tarfile.TarInfo, bytes | None]


def file(name: str, data: bytes, mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def entry(name: str, kind: bytes, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info, None


def tar(*members: Member, mode: str = "w:gz") -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as out:  # type: ignore[call-overload]
        for info, data in members:
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def zipped(*members: tuple[str | zipfile.ZipInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in members:
            out.writestr(name, data)
    buf.seek(0)
    return buf


@pytest.fixture
def box(tmp_path: Path) -> Path:
    """A folder to extract into, with a sibling that an escape would reach."""
    (tmp_path / "box").mkdir()
    return tmp_path / "box"


def nothing_escaped(box: Path) -> None:
    assert sorted(p.name for p in box.parent.iterdir()) == ["box"]
    assert not (box / "out").exists()  # removed on refusal


def test_tar_members_are_extracted(box: Path) -> None:
    src = tar(
        entry("dir", tarfile.DIRTYPE),
        file("dir/a.txt", b"alpha"),
        file("run.sh", b"#!/bin/sh\n", 0o4755),
        entry("dir/sub/link", tarfile.SYMTYPE, "../a.txt"),
        entry("hard", tarfile.LNKTYPE, "dir/a.txt"),
        file("./b/c.txt", b"gamma"),
    )
    extract(src, box / "out", kind="tar", max_bytes=1000)
    out = box / "out"
    assert (out / "dir/a.txt").read_bytes() == b"alpha"
    assert (out / "b/c.txt").read_bytes() == b"gamma"
    assert os.readlink(out / "dir/sub/link") == "../a.txt"
    assert (out / "dir/sub/link").read_bytes() == b"alpha"
    assert (out / "hard").read_bytes() == b"alpha"
    assert os.stat(out / "hard").st_ino == os.stat(out / "dir/a.txt").st_ino
    mode = stat.S_IMODE(os.stat(out / "run.sh").st_mode)
    assert mode & 0o111 and not mode & stat.S_ISUID  # executable, never setuid


def test_plain_tar_from_a_file(box: Path) -> None:
    path = box.parent / "x.tar"
    path.write_bytes(tar(file("a", b"1"), mode="w").getvalue())
    extract(path, box / "out", kind="tar", max_bytes=10)
    assert (box / "out/a").read_bytes() == b"1"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([file("../x", b"evil")], "must be relative"),
        ([file("a/../../x", b"evil")], "must be relative"),
        ([file("/tmp/x", b"evil")], "must be relative"),
        ([entry("etc", tarfile.SYMTYPE, "/etc")], "leaves the folder"),
        ([entry("up", tarfile.SYMTYPE, "../../x")], "leaves the folder"),
        ([entry("a/b", tarfile.SYMTYPE, "../../x")], "leaves the folder"),
        ([entry("pw", tarfile.LNKTYPE, "../../etc/passwd")], "must be relative"),
        ([entry("pw", tarfile.LNKTYPE, "/etc/passwd")], "must be relative"),
        ([entry("pw", tarfile.LNKTYPE, "missing")], "no such file"),
        ([entry("null", tarfile.CHRTYPE)], "not a file, folder or link"),
        ([entry("disk", tarfile.BLKTYPE)], "not a file, folder or link"),
        ([entry("fifo", tarfile.FIFOTYPE)], "not a file, folder or link"),
        ([file("a", b"1"), file("a", b"2")], "written twice"),
        # Writing through a symlink, even one that stays inside, is refused.
        (
            [entry("d", tarfile.DIRTYPE), entry("l", tarfile.SYMTYPE, "d"), file("l/x", b"1")],
            "not a folder",
        ),
        # A hard link reached through a symlink.
        (
            [file("f", b"1"), entry("l", tarfile.SYMTYPE, "."), entry("h", tarfile.LNKTYPE, "l/f")],
            "not a regular file",
        ),
        # b -> a/.. looks inside while a does not exist; a -> . then makes b the parent.
        (
            [entry("b", tarfile.SYMTYPE, "a/.."), entry("a", tarfile.SYMTYPE, ".")],
            "leaves the folder",
        ),
    ],
)
def test_tar_refusals(box: Path, members: list[Member], message: str) -> None:
    with pytest.raises(EngineError, match=message):
        extract(tar(*members), box / "out", kind="tar", max_bytes=1000)
    nothing_escaped(box)


def test_tar_bomb_stops_at_the_limit(box: Path) -> None:
    big = tarfile.TarInfo("zeros")
    big.size = 1 << 20
    src = tar((big, bytes(1 << 20)))
    assert len(src.getvalue()) < 10_000  # compresses well
    with pytest.raises(EngineError, match="larger than the limit of 4096 bytes"):
        extract(src, box / "out", kind="tar", max_bytes=4096)
    nothing_escaped(box)


def test_tar_header_lying_about_size_is_counted(box: Path) -> None:
    """Sizes are counted as written, so many small files add up too."""
    src = tar(*(file(f"f{i}", b"x" * 100) for i in range(20)))
    with pytest.raises(EngineError, match="larger than the limit of 1000"):
        extract(src, box / "out", kind="tar", max_bytes=1000)
    nothing_escaped(box)


def test_member_count_bound(box: Path) -> None:
    src = tar(*(file(f"f{i}", b"") for i in range(5)))
    with pytest.raises(EngineError, match="more than 3 members"):
        extract(src, box / "out", kind="tar", max_bytes=1000, max_members=3)


def test_not_an_archive(box: Path) -> None:
    with pytest.raises(EngineError, match="not a valid tar archive"):
        extract(io.BytesIO(b"hello, not a tar"), box / "out", kind="tar", max_bytes=1000)
    with pytest.raises(EngineError, match="not a valid zip archive"):
        extract(io.BytesIO(b"hello, not a zip"), box / "out", kind="zip", max_bytes=1000)
    nothing_escaped(box)


def test_zip_members_are_extracted(box: Path) -> None:
    extract(zipped(("a/b.txt", b"beta"), ("c", b"")), box / "out", kind="zip", max_bytes=100)
    assert (box / "out/a/b.txt").read_bytes() == b"beta"
    assert (box / "out/c").read_bytes() == b""


def symlink_member(name: str, link: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../x", b"evil")], "must be relative"),
        ([("a/../../x", b"evil")], "must be relative"),
        ([("/tmp/x", b"evil")], "must be relative"),
        ([(symlink_member("etc", "/etc"), b"/etc")], "is a symlink"),
    ],
)
def test_zip_refusals(
    box: Path, members: list[tuple[str | zipfile.ZipInfo, bytes]], message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        extract(zipped(*members), box / "out", kind="zip", max_bytes=1000)
    nothing_escaped(box)


def test_zip_bomb_stops_at_the_limit(box: Path) -> None:
    src = zipped(("zeros", bytes(1 << 20)))
    with pytest.raises(EngineError, match="larger than the limit"):
        extract(src, box / "out", kind="zip", max_bytes=4096)
    nothing_escaped(box)


def test_new_file_never_follows_a_symlink(box: Path) -> None:
    outside = box.parent / "outside"
    (box / "link").symlink_to(outside)
    with pytest.raises(EngineError, match="written twice"):
        NewFile(box / "link", Budget(10, "x"))
    assert not outside.exists()


def test_target_refuses_a_file_on_the_way(box: Path) -> None:
    (box / "f").write_bytes(b"")
    with pytest.raises(EngineError, match="not a folder"):
        target(box, "f/g")
    with pytest.raises(EngineError, match="empty"):
        target(box, "./")
