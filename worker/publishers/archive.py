"""Deterministic ``.tar.gz`` archives of a results folder (PROTOCOL.md §7).

The same folder content always gives the same bytes, whatever the files' times, owners or
the order the file system lists them in, so a re-publish after a restart uploads exactly
what the first attempt did:

- entries are named relative to the folder (``stdout``, ``outputs/a.txt``; no ``./`` and
  no top folder), sorted by their UTF-8 (file system) bytes, folders included so empty
  output folders survive, each folder before its content;
- PAX format (long and non-ASCII names), mtime 0, uid/gid 0, no user or group names;
- modes are fixed: 0755 for folders and for files with an owner execute bit, else 0644;
- a symlink to a file inside the folder is stored as that file's content (as the Go
  publishers, which ``os.Open`` every walked path, do); a symlink leaving the folder or to
  a folder, FIFOs, sockets and devices are refused with ``PublishError``;
- gzip level 6, header mtime 0, no file name.

:func:`write_archive` writes in a thread and reports the archive's size and SHA-256. It
stops between reads when cancelled and then leaves nothing behind; the target appears
only complete (temporary file, fsync, rename).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import stat
import tarfile
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from worker.errors import PublishError
from worker.storage.paths import inside

GZIP_LEVEL = 6


@dataclass(frozen=True, slots=True)
class ArchiveInfo:
    size: int
    sha256: str  # hex


@dataclass(frozen=True, slots=True)
class Entry:
    name: str  # relative, "/"-separated
    path: Path
    is_dir: bool
    executable: bool
    size: int


class Stopped(Exception):
    """The archive was cancelled while it was being written."""


def entries(root: Path) -> list[Entry]:
    """Every folder and file under ``root`` in archive order (checked as described above)."""
    found: list[Entry] = []
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        folder, rel = pending.pop()
        with os.scandir(folder) as listing:
            for item in listing:
                name = f"{rel}/{item.name}" if rel else item.name
                path = Path(item.path)
                if item.is_dir(follow_symlinks=False):
                    found.append(Entry(name, path, True, True, 0))
                    pending.append((path, name))
                    continue
                st = _file_stat(root, path, name)
                found.append(Entry(name, path, False, bool(st.st_mode & stat.S_IXUSR), st.st_size))
    found.sort(key=lambda e: os.fsencode(e.name))
    return found


def _file_stat(root: Path, path: Path, name: str) -> os.stat_result:
    if "\n" in name or "\x00" in name:
        raise PublishError(f"cannot archive {name!r}: newline in the name")
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if not inside(root, path):
            raise PublishError(f"cannot archive {name!r}: symlink leaves the results folder")
        try:
            st = os.stat(path)
        except OSError as exc:
            raise PublishError(f"cannot archive {name!r}: dangling symlink ({exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink to a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise PublishError(f"cannot archive {name!r}: {kind}")
    return st


class _Checked:
    """A reader that stops the archive as soon as ``stop`` is set."""

    def __init__(self, f: IO[bytes], stop: threading.Event) -> None:
        self.f = f
        self.stop = stop

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise Stopped
        return self.f.read(size)


class _Counting:
    """A writer that hashes and counts what goes through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o755 if entry.executable else 0o644
        info.size = entry.size
    return info


def build(root: Path, out: IO[bytes], stop: threading.Event | None = None) -> ArchiveInfo:
    """Write the archive of ``root`` to ``out`` (blocking)."""
    stop = stop or threading.Event()
    counting = _Counting(out)
    with (
        gzip.GzipFile(
            filename="",
            mode="wb",
            fileobj=counting,
            compresslevel=GZIP_LEVEL,
            mtime=0,
        ) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in entries(root):
            if stop.is_set():
                raise Stopped
            info = _tarinfo(entry)
            if entry.is_dir:
                tar.addfile(info)
                continue
            with entry.path.open("rb") as f:
                tar.addfile(info, _Checked(f, stop))
    return ArchiveInfo(size=counting.size, sha256=counting.digest.hexdigest())


def build_file(root: Path, target: Path, stop: threading.Event | None = None) -> ArchiveInfo:
    """Write the archive to ``target`` atomically (blocking); nothing is left on failure."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as f:
            try:
                info = build(root, f, stop)
            except OSError as exc:
                raise PublishError(f"cannot archive {root}: {exc}") from exc
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return info


async def write_archive(root: Path, target: Path) -> ArchiveInfo:
    """:func:`build_file` in a thread; cancelling stops the thread and removes the file."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(build_file, root, target, stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Stopped, Exception):
            await work
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        raise


async def run_to_end(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` (a clean-up) to its end even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()


def scratch(parent: Path | None, prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A private temporary folder under ``parent`` (created if missing; None: the system's)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return tempfile.TemporaryDirectory(dir=parent, prefix=prefix)
