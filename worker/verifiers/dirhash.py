"""Go's ``golang.org/x/mod/sumdb/dirhash`` ``HashDir(dir, prefix, Hash1)``, byte for byte.

Bacalhau's Deterministic verifier proposes ``HashDir(resultsFolder, "results", Hash1)``
(reference §3.5), so requesters compare the proposals of nodes written in either language.

``Hash1``: list every non-directory entry of the tree (``filepath.Walk``, which does not
follow symlinks) as ``<prefix>/<relative path>`` with ``/`` separators; sort the names as
byte strings (Go's ``sort.Strings``); hash a summary with one line per file,
``"<sha256 hex of the content>  <name>\\n"``; the result is ``"h1:"`` followed by the
standard base64 of the summary's SHA-256. Empty folders do not count; an empty tree hashes
the empty summary (``h1:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=``).

Where Go would misbehave we refuse with ``EngineError`` instead: a name holding a newline
(Go errors too), a symlink that dangles, points at a folder (Go fails reading it) or leaves
the tree (PROTOCOL.md §7), and FIFOs, sockets and devices (Go would block or read a device).
A symlink to a file inside the tree is hashed with its target's content, as Go's
``os.Open`` does. ``tests/verifiers/dirhash_fixture.json`` holds hashes computed by Go.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from worker.errors import EngineError
from worker.storage.paths import inside

CHUNK = 1 << 20


def dir_files(root: Path, prefix: str) -> list[tuple[bytes, Path]]:
    """Go's ``DirFiles``: ``(name, path on disk)`` for every file under ``root``, unsorted.

    Names are raw bytes (``os.fsencode``) so undecodable file names hash as Go sees them."""
    head = os.fsencode(prefix.rstrip("/"))
    found: list[tuple[bytes, Path]] = []
    pending: list[tuple[Path, bytes]] = [(root, b"")]
    while pending:
        folder, rel = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                raw = os.fsencode(entry.name)
                name = rel + b"/" + raw if rel else raw
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), name))
                    continue
                path = Path(entry.path)
                _check_file(root, path, name)
                found.append((head + b"/" + name if head else name, path))
    return found


def _check_file(root: Path, path: Path, name: bytes) -> None:
    shown = os.fsdecode(name)
    if b"\n" in name:
        raise EngineError(f"dirhash: filenames with newlines are not supported: {shown!r}")
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        if not inside(root, path):
            raise EngineError(f"dirhash: symlink {shown!r} leaves the results folder")
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise EngineError(f"dirhash: symlink {shown!r} is dangling: {exc}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise EngineError(f"dirhash: {shown!r} is {kind}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash1(files: list[tuple[bytes, Path]]) -> str:
    """Go's ``Hash1`` over ``(name, path)`` pairs."""
    summary = hashlib.sha256()
    for name, path in sorted(files, key=lambda item: item[0]):
        summary.update(file_sha256(path).encode() + b"  " + name + b"\n")
    return "h1:" + base64.b64encode(summary.digest()).decode()


def hash_dir(root: Path, prefix: str = "results") -> str:
    """Go's ``HashDir(root, prefix, Hash1)``; blocking (run it in a thread)."""
    try:
        return hash1(dir_files(root, prefix))
    except OSError as exc:
        raise EngineError(f"dirhash of {root}: {exc}") from exc
