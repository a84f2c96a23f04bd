"""The node's data dir: its lock, its persisted node ID and the paths inside it.

```
<data-dir>/            mode 0700
  LOCK                 flock'ed by the running node; holds its pid (for the error message)
  node_id              the node's ID, written once, atomically
  worker.db            the execution store (SQLite)
  results/<ExecutionID>/
  broker/              the embedded nats-server: config, port, JetStream store, log
```

PROTOCOL.md §1 fixes the start-up checks and their order: lock (exit 3), then node ID
mismatch (exit 4), then node ID in use on the broker (exit 5, checked by the node).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from typing import Final

from worker.config import ID_RE

DIR_MODE: Final = 0o700


class DataDirError(Exception):
    """A data dir the node cannot start with; ``exit_code`` is the process exit code."""

    exit_code = 1


class DataDirLocked(DataDirError):
    """Another process holds the data dir's lock."""

    exit_code = 3


class NodeIDMismatch(DataDirError):
    """``--node-id`` differs from the persisted ID while executions exist."""

    exit_code = 4

    def __init__(self, persisted: str, requested: str) -> None:
        super().__init__(
            f"--node-id {requested} differs from the node ID {persisted} persisted in the data "
            f"dir, which still holds executions: start with --node-id {persisted}, or use "
            "another data dir"
        )
        self.persisted = persisted
        self.requested = requested


def write_atomic(path: Path, text: str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text`` so a crash leaves the old or the new file, never half.

    Writes a temporary file next to it, fsyncs it, renames it over ``path`` and fsyncs the
    directory so the rename itself is durable."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DataDir:
    """A node's data dir. The constructor only stores the path; ``lock()`` creates the tree."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self._lock_fd: int | None = None

    # Paths -----------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path / "LOCK"

    @property
    def node_id_path(self) -> Path:
        return self.path / "node_id"

    def db_path(self) -> Path:
        """The SQLite execution store."""
        return self.path / "worker.db"

    def results_dir(self, execution_id: str | None = None) -> Path:
        """``results/``, or ``results/<execution_id>/`` (PROTOCOL.md §7)."""
        base = self.path / "results"
        return base if execution_id is None else base / execution_id

    def broker_dir(self) -> Path:
        """Where the embedded nats-server keeps its config, port, store and log."""
        return self.path / "broker"

    # Lifecycle -------------------------------------------------------------------------

    def create(self) -> None:
        """Create the data dir and its subdirectories (mode 0700 for new ones)."""
        for directory in (self.path, self.results_dir(), self.broker_dir()):
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def lock(self) -> None:
        """Create the tree and take an exclusive, non-blocking ``flock`` on ``LOCK``.

        Held until :meth:`unlock` or the process exits (the kernel drops it then, so a
        crashed node never leaves a stale lock). The descriptor is not inherited by
        children, so an engine or the embedded broker cannot keep the lock alive.
        Raises DataDirLocked when another process (or another DataDir) holds it."""
        if self._lock_fd is not None:
            return
        self.create()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise DataDirLocked(
                f"data dir {self.path} is locked by another process{holder}: "
                "is another node running with it?"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    @staticmethod
    def _read_holder(fd: int) -> str:
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(fd, 32, 0).decode().strip())
            return f" (pid {pid})"
        return ""

    def unlock(self) -> None:
        """Release the lock (idempotent)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> DataDir:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # Node ID ---------------------------------------------------------------------------

    def persisted_node_id(self) -> str | None:
        """The ID in ``node_id``, or None if the node never started here."""
        try:
            text = self.node_id_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        node_id = text.removesuffix("\n")
        if ID_RE.fullmatch(node_id) is None:
            raise DataDirError(
                f"{self.node_id_path} holds an invalid node ID {node_id!r}: fix or delete it"
            )
        return node_id

    def resolve_node_id(self, requested: str | None, has_executions: bool) -> str:
        """The node's ID, persisted: the stored one, else ``requested``, else ``n-<uuid4>``.

        A ``requested`` ID that differs from the stored one replaces it only while the
        data dir holds no executions (their callbacks name the old ID); otherwise
        NodeIDMismatch. Call with the lock held."""
        if self._lock_fd is None:
            raise RuntimeError("resolve_node_id() needs the data dir lock: call lock() first")
        if requested and ID_RE.fullmatch(requested) is None:
            raise ValueError(f"invalid node ID {requested!r}")
        persisted = self.persisted_node_id()
        if persisted is not None and (not requested or requested == persisted):
            return persisted
        if persisted is not None and has_executions:
            raise NodeIDMismatch(persisted, requested or "")
        node_id = requested or f"n-{uuid.uuid4()}"
        write_atomic(self.node_id_path, node_id + "\n")
        return node_id
