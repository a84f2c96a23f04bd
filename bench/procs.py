"""The processes of a benchmark run: nats-server, echo responders, ``worker serve`` nodes.

Everything is a child of the bench process, on loopback, in a temp dir the run owns.
Each process is stopped by its own handle (never by name). CPU time and resident
memory are read from ``/proc/<pid>`` so a scenario can say which process spent the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import natsproc
from worker import children

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Written next to the bench's temp dirs when one is deleted. On an ext4 without a journal
# new inodes are slow for up to SETTLE_S after many were deleted (bench/README.md): the
# kernel's allocator skips inodes deleted in the last 60 s, 360 s while their inode table
# block is dirty. A run's e2e waits that long after the last mark (``bench.run``).
CLEANUP_MARK = "worker-bench-cleanup"
SETTLE_S = 360


def remove_tree(root: Path) -> None:
    """Delete a bench temp dir (a run's, a profile's, a walmap's) and leave the clean-up
    mark beside it, so that the next run's e2e does not measure these deletions."""
    shutil.rmtree(root, ignore_errors=True)
    with contextlib.suppress(OSError):
        (root.parent / CLEANUP_MARK).write_text(f"{time.time():.0f}\n")


def node_env(pythonpath: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _stat_times(stat: str) -> tuple[float, float]:
    """(user, system) CPU seconds from a ``/proc`` stat file; zeros once it is gone."""
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process (all its threads); zeros once it is gone."""
    return _stat_times(f"/proc/{pid}/stat")


def main_thread_seconds(pid: int) -> float:
    """utime + stime of a process's main thread (a node's event loop), in seconds."""
    return sum(_stat_times(f"/proc/{pid}/task/{pid}/stat"))


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def system_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(p) for p in parts]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLK_TCK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class CpuMeter:
    """CPU seconds spent by named processes and by everything else on the machine
    ("foreign": other engineers' tests) over one measured interval."""

    pids: dict[str, int]
    start: dict[str, float] = field(default_factory=dict)
    sys0: dict[str, float] = field(default_factory=dict)
    main0: dict[str, float] = field(default_factory=dict)
    busy0: float = 0.0
    t0: float = 0.0
    closed: bool = False

    def __enter__(self) -> CpuMeter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.close()

    def open(self) -> None:
        """Start (or start again) the interval: a load calls it after its warm-up."""
        self.closed = False
        times = self._times()
        self.start = {n: user + system for n, (user, system, _) in times.items()}
        self.sys0 = {n: system for n, (_, system, _) in times.items()}
        self.main0 = {n: main for n, (_, _, main) in times.items()}
        self.busy0 = system_busy_seconds()
        self.t0 = time.perf_counter()

    def close(self) -> None:
        """End the interval: a load calls it when its measured window ends."""
        self.closed = True
        self.wall = time.perf_counter() - self.t0
        times = self._times()
        self.used = {n: u + s - self.start[n] for n, (u, s, _) in times.items()}
        self.system = {n: s - self.sys0[n] for n, (_, s, _) in times.items()}
        self.main = {n: m - self.main0[n] for n, (_, _, m) in times.items()}
        busy = system_busy_seconds() - self.busy0
        self.foreign = max(0.0, busy - sum(self.used.values()))

    def _times(self) -> dict[str, tuple[float, float, float]]:
        """(user, system, main thread) CPU seconds of each process: one read of each."""
        return {n: (*cpu_times(pid), main_thread_seconds(pid)) for n, pid in self.pids.items()}

    def summary(self, ops: int) -> dict[str, object]:
        """CPU per process in µs per operation (all threads, and the main thread alone:
        a node's event loop), and the foreign load in cores."""
        per_op = {n: round(1e6 * s / ops, 1) for n, s in self.used.items()} if ops else {}
        main = {n: round(1e6 * s / ops, 1) for n, s in self.main.items()} if ops else {}
        return {
            "wall_s": round(self.wall, 3),
            "cores": os.cpu_count() or 1,
            "cpu_s": {n: round(s, 3) for n, s in self.used.items()},
            "cpu_us_per_op": per_op,
            "main_thread_us_per_op": main,
            "system_share": {
                n: round(self.system[n] / s, 2) for n, s in self.used.items() if s > 0
            },
            "foreign_cores": round(self.foreign / self.wall, 2) if self.wall else 0.0,
        }


class NatsServer(natsproc.NatsServer):
    """The tests' nats-server (tests/natsproc.py), with room for a full run's streams."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, file_store="4GB")


async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> int:
    if proc.returncode is None:
        children.send(proc, signal.SIGTERM)  # not send_signal: see worker/children.py
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            children.send(proc, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


class Echo:
    """The baseline responder (``python -m bench.echo``) in its own process."""

    def __init__(self, *, url: str, subject: str, queue: str = "") -> None:
        self.url = url
        self.subject = subject
        self.queue = queue
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        args = [sys.executable, "-m", "bench.echo", self.url, self.subject]
        if self.queue:
            args.append(self.queue)
        self.proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        if line.strip() != b"READY":
            raise RuntimeError(f"echo responder did not start: {line!r}")

    async def stop(self) -> None:
        if self.proc is not None:
            await _terminate(self.proc, 5)
            self.proc = None


@dataclass
class NodeProc:
    """One ``worker serve`` process on an external broker."""

    url: str
    data_dir: Path
    node_id: str
    prefix: str
    sync: str = "normal"
    extra: list[str] = field(default_factory=list)
    pythonpath: str = ""  # another source tree of the node (before/after comparisons)
    python_code: str = ""  # run the command by ``python -c`` this instead of ``-m worker``
    proc: asyncio.subprocess.Process | None = None
    startup_s: float = 0.0  # exec → NODE_ID line
    stderr_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def args(self) -> list[str]:
        return [
            sys.executable,
            *(("-c", self.python_code) if self.python_code else ("-m", "worker")),
            "serve",
            "--nats-url",
            self.url,
            "--data-dir",
            str(self.data_dir),
            "--node-id",
            self.node_id,
            "--subject-prefix",
            self.prefix,
            "--limit-total-cpu",
            "10000",
            "--limit-total-memory",
            "10Ti",
            "--create-callback-stream",
            "--sync",
            self.sync,
            *self.extra,
        ]

    async def start(self, timeout: float = 60) -> float:
        """Start and wait for ``NODE_ID=``; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}.stderr.log"
        err = self.stderr_path.open("ab")
        t0 = time.perf_counter()
        try:
            # cwd outside the repo: the node is imported from PYTHONPATH or the install.
            self.proc = await asyncio.create_subprocess_exec(
                *self.args(),
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=self.data_dir.parent,
                env=node_env(self.pythonpath),
            )
        finally:
            err.close()
        assert self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            except TimeoutError:
                await self.stop()
                raise RuntimeError(f"node {self.node_id} did not start within {timeout}s") from None
            if not line:
                code = await self.proc.wait()
                raise RuntimeError(
                    f"node {self.node_id} exited {code} at start: {self.stderr_tail()}"
                )
            if line.startswith(b"NODE_ID="):
                self.startup_s = time.perf_counter() - t0
                return self.startup_s

    def stderr_tail(self, n: int = 2000) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(errors="replace")[-n:]

    async def stop(self, grace: float = 30) -> int:
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        return await _terminate(proc, grace)
