"""LocalDirectory inputs: a file or folder already on the node, named by ``SourcePath``.

A job names the path, so this source is opt-in per node (Bacalhau #1785: a local-folder
input "opens a hole" otherwise): ``SourcePath`` must be absolute, without ``..``, and,
once every symlink is resolved, inside one of ``local_input_roots``. With no roots
configured the source is not installed and every path is refused.

``prepare`` returns the resolved path itself, not a copy: a copy would defeat the point of
data that is already local (it may be large), and engines expose inputs read-only (a
read-only bind mount; an engine without mounts must not hand out a writable path). The
resolved path, not the one the job gave, is returned, so a symlink swapped in later
under a root cannot redirect the mount. At bid time the size comes from a walk bounded in
entries and time (a lower bound when the walk is cut short); symlinks are not followed.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from schemas.job import StorageSpec
from worker.errors import EngineError


def bounded_size(path: str, *, max_entries: int, max_seconds: float) -> int:
    """Bytes of the regular files under ``path`` (or of ``path``), without following
    symlinks, stopping after ``max_entries`` entries or ``max_seconds``."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    deadline = time.monotonic() + max_seconds
    total, seen, stack = 0, 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries or time.monotonic() > deadline:
                        return total
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue  # unreadable folder: counts as empty
    return total


class LocalDirectory:
    """``StorageSource: LocalDirectory``."""

    name = "LocalDirectory"

    def __init__(
        self,
        *,
        roots: Sequence[str] = (),
        walk_max_entries: int = 10_000,
        walk_max_seconds: float = 0.05,
    ) -> None:
        self.roots = [r for r in roots if r]
        self.walk_max_entries = walk_max_entries
        self.walk_max_seconds = walk_max_seconds

    def is_installed(self) -> bool:
        return bool(self.roots)

    def resolve(self, spec: StorageSpec) -> Path:
        """The real path of ``SourcePath`` when it is inside an allowed root."""
        source = spec.SourcePath
        if not self.roots:
            raise EngineError(
                "LocalDirectory inputs are disabled on this node (no local input roots configured)"
            )
        if not source.startswith("/") or "\x00" in source:
            raise EngineError(f"local input {source!r}: SourcePath must be an absolute path")
        if ".." in PurePosixPath(source).parts:
            raise EngineError(f"local input {source!r}: SourcePath must not contain ..")
        real = os.path.realpath(source)
        for root in self.roots:
            real_root = os.path.realpath(root)
            if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
                return Path(real)
        raise EngineError(
            f"local input {source!r} is outside the allowed local input roots"
            + (f" (resolves to {real})" if real != source else "")
        )

    def is_local(self, spec: StorageSpec) -> bool:
        try:
            return self.resolve(spec).exists()
        except EngineError:
            return False

    def known_size(self, spec: StorageSpec) -> int:
        try:
            real = self.resolve(spec)
        except EngineError:
            return 0
        return bounded_size(
            str(real), max_entries=self.walk_max_entries, max_seconds=self.walk_max_seconds
        )

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        real = self.resolve(spec)
        if not real.exists():
            raise EngineError(f"local input {spec.SourcePath!r} does not exist")
        return real
