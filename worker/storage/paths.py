"""Name and path checks shared by inputs, outputs and archives: no traversal, no absolute
paths, no symlinks leaving their folder (PROTOCOL.md §7)."""

from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath

from worker.errors import EngineError


def check_name(name: str, what: str = "output") -> str:
    """A single folder name: not empty, no ``/``, not ``.``/``..``, no NUL."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise EngineError(f"invalid {what} name {name!r}: must be a single folder name")
    return name


def check_relative(path: str, what: str = "path") -> PurePosixPath:
    """A relative path that stays inside its folder (no absolute path, no ``..``)."""
    p = PurePosixPath(path)
    if p.is_absolute() or any(part == ".." for part in p.parts) or "\x00" in path:
        raise EngineError(f"invalid {what} {path!r}: must be relative and stay inside")
    return p


@functools.lru_cache(maxsize=1024)  # jobs name the same few paths (``/outputs``) again
def mount_target(path: str, what: str = "path") -> str:
    """A job-side mount point: absolute, normalised, no ``..``."""
    if not path.startswith("/") or "\x00" in path:
        raise EngineError(f"invalid {what} {path!r}: must be an absolute path")
    parts = PurePosixPath(path).parts
    if any(part == ".." for part in parts):
        raise EngineError(f"invalid {what} {path!r}: must not contain ..")
    return str(PurePosixPath(*parts))


def inside(root: Path, candidate: Path) -> bool:
    """Whether ``candidate`` (symlinks resolved) stays under ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(candidate)
    return real == real_root or real.startswith(real_root + os.sep)
