"""Writing fetched inputs safely, and extracting tar and zip archives safely.

Everything an input source writes goes through :func:`target` and :class:`NewFile`: the
relative name is checked (no absolute path, no ``..``), no folder on the way may be a
symlink (so nothing is ever written through one), the file must not exist yet
(``O_EXCL | O_NOFOLLOW``), and every byte is counted against a :class:`Budget`.

Archives are extracted member by member with the same rules (never with
``TarFile.extractall``): regular files and folders are written; a symlink must be relative
and stay inside the folder, both as written and once every link is in place (a chain such
as ``b -> a/..`` then ``a -> .`` is caught by the final pass); a hard link must name a
regular file extracted before it, reached without a symlink; devices, FIFOs and other
types are refused. The byte budget counts the bytes really written, not the sizes headers
claim, so a decompression bomb stops at the limit. Permission bits are not copied: files
are 0644 (0755 when the member is executable) and folders 0755. On any refusal the
partly extracted folder is removed.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from worker.errors import EngineError
from worker.storage.paths import check_relative, inside

CHUNK = 1 << 16
MAX_MEMBERS = 100_000
ArchiveKind = Literal["tar", "zip"]


class Budget:
    """Bytes still allowed for one input (shared by every file the input writes)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.used = 0
        self.what = what

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise EngineError(f"{self.what} is larger than the limit of {self.limit} bytes")

    def check(self, size: int) -> None:
        """Refuse early when a size announced up front would not fit."""
        if self.used + size > self.limit:
            raise EngineError(
                f"{self.what} is larger than the limit of {self.limit} bytes ({size} bytes)"
            )


def _parts(name: str, what: str) -> list[str]:
    rel = check_relative(name, what)
    return [part for part in rel.parts if part not in ("", ".")]


def target(root: Path, name: str, what: str = "input path") -> Path:
    """``root/name`` for a new file or folder: ``name`` checked, missing parent folders
    created, and no existing component a symlink or a file."""
    parts = _parts(name, what)
    if not parts:
        raise EngineError(f"invalid {what} {name!r}: empty")
    current = root
    for part in parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise EngineError(f"invalid {what} {name!r}: {part!r} is not a folder")
    return current / parts[-1]


def existing_file(root: Path, name: str, what: str) -> Path:
    """``root/name`` when it is a regular file reached without following any symlink."""
    parts = _parts(name, what)
    current = root
    for i, part in enumerate(parts):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise EngineError(f"invalid {what} {name!r}: no such file") from None
        wanted = stat.S_ISREG if i == len(parts) - 1 else stat.S_ISDIR
        if not wanted(st.st_mode):
            raise EngineError(f"invalid {what} {name!r}: not a regular file inside")
    if not parts:
        raise EngineError(f"invalid {what} {name!r}: empty")
    return current


class NewFile:
    """A file created exclusively (never through a symlink), counted and hashed as written;
    removed again when the ``with`` block fails."""

    def __init__(self, path: Path, budget: Budget, *, executable: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o755 if executable else 0o644)
        except FileExistsError:
            raise EngineError(f"{path.name!r} is written twice") from None
        self.path = path
        self.file = os.fdopen(fd, "wb")
        self.budget = budget
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.budget.take(len(chunk))
        self.file.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)

    def __enter__(self) -> NewFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.file.close()
        if exc is not None:
            self.path.unlink(missing_ok=True)


def _copy(src: IO[bytes], out: NewFile) -> None:
    while chunk := src.read(CHUNK):
        out.write(chunk)


def _folder(root: Path, name: str) -> None:
    if not _parts(name, "archive member"):
        return  # "./"
    path = target(root, name, "archive member")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        raise EngineError(f"archive member {name!r} is not a folder")


def _symlink(root: Path, name: str, link: str, links: list[Path]) -> None:
    if not link or link.startswith("/") or "\x00" in link:
        raise EngineError(f"archive member {name!r}: symlink to {link!r} leaves the folder")
    rel = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
    if rel == ".." or rel.startswith("../") or rel.startswith("/"):
        raise EngineError(f"archive member {name!r}: symlink to {link!r} leaves the folder")
    path = target(root, name, "archive member")
    try:
        os.symlink(link, path)
    except FileExistsError:
        raise EngineError(f"archive member {name!r} is written twice") from None
    links.append(path)
    if not inside(root, path):
        raise EngineError(f"archive member {name!r}: symlink to {link!r} leaves the folder")


def _hardlink(root: Path, name: str, link: str) -> None:
    source = existing_file(root, link, f"hard link target of {name!r}")
    path = target(root, name, "archive member")
    try:
        os.link(source, path, follow_symlinks=False)
    except FileExistsError:
        raise EngineError(f"archive member {name!r} is written twice") from None


def _extract_tar(src: Path | IO[bytes], root: Path, budget: Budget, max_members: int) -> None:
    links: list[Path] = []
    name, fileobj = (src, None) if isinstance(src, Path) else (None, src)
    with tarfile.open(name=name, mode="r:*", fileobj=fileobj) as tar:
        for count, member in enumerate(tar, start=1):
            if count > max_members:
                raise EngineError(f"archive has more than {max_members} members")
            if member.isdir():
                _folder(root, member.name)
            elif member.isreg():
                budget.check(member.size)
                path = target(root, member.name, "archive member")
                data = tar.extractfile(member)
                if data is None:  # pragma: no cover - isreg() members always have data
                    raise EngineError(f"archive member {member.name!r} has no data")
                with data, NewFile(path, budget, executable=bool(member.mode & 0o111)) as out:
                    _copy(data, out)
            elif member.issym():
                _symlink(root, member.name, member.linkname, links)
            elif member.islnk():
                _hardlink(root, member.name, member.linkname)
            else:
                raise EngineError(
                    f"archive member {member.name!r} is not a file, folder or link: refused"
                )
    for link in links:  # a later link can redirect an earlier one
        if not inside(root, link):
            raise EngineError(f"archive member {link.name!r}: symlink leaves the folder")


def _extract_zip(src: Path | IO[bytes], root: Path, budget: Budget, max_members: int) -> None:
    with zipfile.ZipFile(src) as archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise EngineError(f"archive has more than {max_members} members")
        for info in members:
            mode = info.external_attr >> 16
            if info.is_dir():
                _folder(root, info.filename)
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: made without a type
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a file or folder"
                raise EngineError(f"archive member {info.filename!r} is {kind}: refused")
            else:
                budget.check(info.file_size)
                path = target(root, info.filename, "archive member")
                with (
                    archive.open(info) as data,
                    NewFile(path, budget, executable=bool(mode & 0o111)) as out,
                ):
                    _copy(data, out)


def extract(
    src: Path | IO[bytes],
    root: Path,
    *,
    kind: ArchiveKind,
    max_bytes: int,
    max_members: int = MAX_MEMBERS,
    what: str = "archive",
) -> None:
    """Extract a tar (any compression) or zip archive into the folder ``root`` (created;
    it must not exist). Blocking: call it in a thread. Raises ``EngineError``."""
    os.mkdir(root, 0o755)
    budget = Budget(max_bytes, f"{what} (extracted)")
    try:
        if kind == "tar":
            _extract_tar(src, root, budget, max_members)
        else:
            _extract_zip(src, root, budget, max_members)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise EngineError(f"{what} is not a valid {kind} archive: {exc}") from exc
    except (EngineError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(exc, EngineError):
            raise
        raise EngineError(f"{what}: extraction failed: {exc}") from exc
