"""One unprivileged uid per execution, from a configured range ``"FIRST-LAST"``.

A job runs as its own uid (gid = uid, no supplementary groups), so that the kernel keeps
jobs apart without a container: ``RLIMIT_NPROC`` counts the tasks of one uid, "every
process of the job" is "every process of the uid" (which even a ``setsid`` grandchild
cannot leave), and files a job leaves behind are private to it (umask 077).

The allocator hands each uid to at most one live execution of this process (allocators
share one registry, so two nodes in one process may share a range; nodes in different
processes need disjoint ranges). It goes round the range
(least recently used first), so a uid is reused as late as possible, and it skips ids that
name a real user or group on this host (a misconfigured range must never run a job as
``www-data``). Before a uid is reused, :func:`live_processes` and :func:`remove_files_of`
let :func:`clear` make sure nothing of an earlier holder (a node that crashed mid-run) is
left: no process, and no file in the shared temporary folders. :func:`adopt` hands what a
job wrote over to root.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.engines.sandbox import kill_uid
from worker.errors import EngineError
from worker.storage.paths import inside

log = logging.getLogger(__name__)

MIN_UID = 1000
"""Below this are system accounts; a range reaching down there is refused."""
MAX_UID = 2**32 - 2
"""``(uid_t)-1`` means "unchanged" to the set*id calls."""

_LEASED: set[int] = set()
"""Every uid leased in this process, whichever allocator leased it."""

SHARED_TMP = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
"""World-writable folders a job can leave files in, outside its working dir."""


@dataclass(frozen=True, slots=True)
class UidRange:
    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> UidRange:
        """``"200000-265535"`` → UidRange(200000, 265535); ValueError with the text."""
        first_text, sep, last_text = text.strip().partition("-")
        try:
            if not sep:
                raise ValueError
            first, last = int(first_text), int(last_text)
        except ValueError:
            raise ValueError(f"invalid uid range {text!r}: expected FIRST-LAST") from None
        if not MIN_UID <= first <= last <= MAX_UID:
            raise ValueError(
                f"invalid uid range {text!r}: need {MIN_UID} <= FIRST <= LAST <= {MAX_UID}"
            )
        return cls(first, last)

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def _is_host_account(uid: int) -> bool:
    """Whether ``uid`` names a user, or ``uid`` as a gid names a group, on this host."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
        except KeyError:
            continue
        return True
    return False


class UidAllocator:
    """Leases uids of ``uid_range``; never the same one to two holders at once."""

    def __init__(self, uid_range: UidRange) -> None:
        self.range = uid_range
        self._next = uid_range.first
        self._leased: set[int] = set()

    @property
    def leased(self) -> frozenset[int]:
        """The uids this allocator has handed out and not taken back."""
        return frozenset(self._leased)

    def acquire(self) -> int:
        """The next free uid after the one handed out last; EngineError when none is."""
        size = len(self.range)
        for _ in range(size):  # every id once at most
            uid = self._next
            self._next = uid + 1 if uid < self.range.last else self.range.first
            if uid in _LEASED or _is_host_account(uid):
                continue
            _LEASED.add(uid)
            self._leased.add(uid)
            return uid
        raise EngineError(
            f"no free job uid in range {self.range} ({len(self._leased)} in use here): "
            "widen language-uid-range"
        )

    def release(self, uid: int) -> None:
        """Give ``uid`` back (idempotent; only a uid this allocator leased)."""
        if uid in self._leased:
            self._leased.discard(uid)
            _LEASED.discard(uid)

    @contextlib.contextmanager
    def lease(self) -> Iterator[int]:
        uid = self.acquire()
        try:
            yield uid
        finally:
            self.release(uid)


def _status_fields(status: str) -> tuple[str, int]:
    state, real_uid = "", -1
    for line in status.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("Uid:"):
            real_uid = int(line.split()[1])
    return state, real_uid


def live_processes(uid: int, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the processes whose real uid is ``uid``, zombies left out (they are dead;
    only their parent, or init, can reap them)."""
    pids = []
    with contextlib.suppress(FileNotFoundError):
        entries: Iterable[str] = os.listdir(proc)
        for name in entries:
            if not name.isdigit():
                continue
            try:
                status = (proc / name / "status").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue  # exited while we looked
            state, real_uid = _status_fields(status)
            if real_uid == uid and state not in ("Z", "X"):
                pids.append(int(name))
    return pids


def remove_files_of(uid: int, folders: Iterable[Path] = SHARED_TMP) -> list[Path]:
    """Delete what ``uid`` owns directly inside the shared temporary ``folders`` (not
    following symlinks); returns what was removed. Call only once no process of the uid
    is left, so nothing can be recreated meanwhile."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def clear(uid: int, *, deadline: float = 5.0) -> bool:
    """Kill every process of ``uid``, then delete its files in the shared temporary
    folders; False if processes remain after ``deadline`` seconds. Blocking: run it in a
    thread."""
    end = time.monotonic() + deadline
    while live_processes(uid):
        if time.monotonic() > end:
            return False
        kill_uid(uid)
        time.sleep(0.01)  # SIGKILL is delivered asynchronously: look again
    remove_files_of(uid)
    return True


def adopt(folder: Path, uid: int) -> None:
    """Hand ``folder`` (what a job of ``uid`` wrote) over to root: what the uid owns becomes
    root's (set-id bits dropped, hard links broken); what it does not own, special files
    and symlinks leaving the folder are deleted."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            mode = st.st_mode
            unwanted = st.st_uid != uid or not (
                stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)
            )
            if unwanted or (stat.S_ISLNK(mode) and not inside(folder, Path(path))):
                log.info("output %s: dropped %s (not the job's own file)", folder.name, path)
                if name in dirnames:
                    dirnames.remove(name)
                if stat.S_ISDIR(mode):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                continue
            if stat.S_ISREG(mode) and st.st_nlink > 1:  # break the link: a copy of our own
                fd, copy = tempfile.mkstemp(dir=dirpath, prefix=".adopt-")
                os.close(fd)
                shutil.copy2(path, copy)
                os.replace(copy, path)
            os.lchown(path, 0, 0)
            if not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode) & 0o777 | 0o600)
    os.chown(folder, 0, 0)
    folder.chmod(0o700)
