"""The process sandbox: one program run as an unprivileged uid, contained and cleaned up.

```
node (asyncio)                      supervisor (root)                 job (uid U)
 run() ── posix_spawn, new session ─► prctl PDEATHSIG, SUBREAPER
   │  fd 0 stdin file / /dev/null      unshare(CLONE_NEWNET)?
   │  fd 1,2 pipes ──► CappedOutput    fork ─────────────────────────► setpgid, chdir(cwd), rlimits,
   │  fd 3 status pipe (JSON lines) ◄─ {"exit": …} {"usage": …}        umask 077, setgroups([]),
   │                                   waitpid(-1) until none left      setresgid/uid(U), PDEATHSIG,
   │  SIGTERM (cancel, timeout) ─────► kill job group + every U process NO_NEW_PRIVS, execve(argv)
   └─ pidfd ◄── exits when everything is reaped
```

The supervisor (the node's interpreter, ``-I -S``, stdlib only) stays root, so the job
can neither signal nor trace it, and is a child subreaper: whatever the job forks, even a
grandchild that calls ``setsid``, is re-parented to it, not to init, so it is reaped (no
zombies pile up where init does not reap, as in a container) and its CPU time counted.
When the job's main process exits, or on the node's SIGTERM, it SIGKILLs the job's group
and then every process of uid U: a helper drops to U and calls ``kill(-1, SIGKILL)``,
which the kernel applies to all of U's processes at once (a fork bomb cannot outrun it).
The uid belongs to this execution alone, so "every process of U" is "the whole job". If
the node dies, PDEATHSIG takes the supervisor and the job's main process; whatever else
survives is killed before the uid is used again (``uids.clear``).

Limits: RLIMIT_AS, CPU, FSIZE, NOFILE, NPROC (per uid: one uid per execution), CORE 0.
Network: a new, empty network namespace unless the caller allows the host's. No
descriptor beyond 0-3 is inherited; the environment is exactly ``Spec.env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from worker.errors import EngineError

STATUS_FD = 3
STOP_GRACE = 5.0  # seconds the supervisor gets to clean up after SIGTERM
PUMP_GRACE = 5.0  # seconds the output pipes may stay open after the supervisor exits
_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = (
    f"import sys; sys.path.insert(0, {_ROOT!r}); "
    "from worker.engines.supervisor import main; sys.exit(main(sys.argv[1:]))"
)


class Sink(Protocol):
    """Where a stream goes (``worker.engines.outputs.CappedOutput``)."""

    async def pump(self, reader: asyncio.StreamReader) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Resource limits of the job (None: no limit); every process of it inherits them."""

    address_space: int | None = None  # bytes of virtual memory
    cpu_seconds: int | None = None  # SIGXCPU at this, SIGKILL a second later
    file_size: int | None = None  # bytes per file the job writes
    open_files: int = 1024
    processes: int = 128  # tasks (processes and threads) of the uid

    def rlimits(self) -> list[tuple[int, int, int]]:
        inf = resource.RLIM_INFINITY
        memory, cpu, size = (
            v or inf for v in (self.address_space, self.cpu_seconds, self.file_size)
        )
        return [
            (resource.RLIMIT_AS, memory, memory),
            (resource.RLIMIT_CPU, cpu, cpu + 1 if self.cpu_seconds else inf),
            (resource.RLIMIT_FSIZE, size, size),
            (resource.RLIMIT_NOFILE, self.open_files, self.open_files),
            (resource.RLIMIT_NPROC, self.processes, self.processes),
            (resource.RLIMIT_CORE, 0, 0),
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """One program to run: ``argv[0]`` is the executable's absolute path."""

    argv: list[str]
    cwd: Path  # entered as root before the uid changes: its parents need not be reachable
    uid: int
    gid: int
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    isolate_network: bool = True
    stdin: Path | None = None  # opened by the node; None: /dev/null
    umask: int = 0o077


@dataclass(frozen=True, slots=True)
class Exit:
    """How the job's main process ended, and what the whole job used."""

    status: int  # wait status
    cpu_seconds: float
    max_rss_bytes: int
    wall_seconds: float

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def exit_code(self) -> int:
        """The exit status, or 128 + the signal that killed it (as a shell reports it)."""
        sig = self.signal
        return 128 + sig if sig is not None else os.WEXITSTATUS(self.status)


async def run(
    spec: Spec, stdout: Sink, stderr: Sink, *, config_path: Path, timeout: float | None = None
) -> Exit:
    """Run ``spec`` to the end; stdout/stderr go to the sinks. On cancellation or after
    ``timeout`` seconds (TimeoutError) every process of the job is killed before this
    returns. EngineError when the sandbox could not start the program."""
    started = time.monotonic()
    config = {**asdict(spec), "parent": os.getpid(), "rlimits": spec.limits.rlimits()}
    config_path.write_text(json.dumps(config, default=str))  # Path → str
    config_path.chmod(0o600)
    proc = _Supervisor(spec, config_path)
    pumps: list[asyncio.Future[None]] = []
    try:
        for fd, sink in ((1, stdout), (2, stderr)):
            pumps.append(asyncio.ensure_future(sink.pump(await proc.reader(fd))))
        try:
            async with asyncio.timeout(timeout):
                await proc.exited
        except BaseException:
            await proc.stop()
            with contextlib.suppress(asyncio.CancelledError):  # we are raising anyway
                await _drain(pumps)  # keep what the job wrote before it was killed
            raise
        proc.reap()
        await _drain(pumps)
        return proc.outcome(time.monotonic() - started)
    finally:
        proc.close()
        for pump in pumps:
            pump.cancel()


async def _drain(pumps: list[asyncio.Future[None]]) -> None:
    """Let the pumps reach EOF (the pipes close with the supervisor), PUMP_GRACE at most."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(PUMP_GRACE):
            await asyncio.gather(*pumps)


def kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (blocking, a few tens of ms)."""
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", _BOOT, "kill", str(uid)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={},
        timeout=30,
        check=False,
    )


def _high(fd: int) -> int:
    """``fd`` moved to 10 or above (close-on-exec), so dup2 onto 0-3 never meets it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class _Supervisor:
    """The node's handle on one supervisor process."""

    def __init__(self, spec: Spec, config_path: Path) -> None:
        self.uid = spec.uid
        self.loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self.loop.create_future()
        self.reaped = False
        self.wait_status = 0
        self._rusage: resource.struct_rusage | None = None
        self._transports: list[asyncio.BaseTransport] = []
        out_r, out_w = map(_high, os.pipe())
        err_r, err_w = map(_high, os.pipe())
        self.status_r, status_w = map(_high, os.pipe())
        self.fds = {1: out_r, 2: err_r}
        try:
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", "-c", _BOOT, str(config_path)],
                {},
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, str(spec.stdin or os.devnull), os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                    (os.POSIX_SPAWN_DUP2, status_w, STATUS_FD),
                ],
                setsid=True,
            )
        except OSError as exc:
            for fd in (out_r, err_r, self.status_r):
                os.close(fd)
            raise EngineError(f"cannot start the sandbox: {exc}") from None
        finally:
            for fd in (out_w, err_w, status_w):
                os.close(fd)
        self.pidfd = os.pidfd_open(self.pid)
        self.loop.add_reader(self.pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    async def reader(self, fd: int) -> asyncio.StreamReader:
        reader = asyncio.StreamReader()
        pipe = os.fdopen(self.fds.pop(fd), "rb", buffering=0)
        transport, _ = await self.loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        self._transports.append(transport)
        return reader

    def reap(self) -> None:
        if not self.reaped:
            _, self.wait_status, self._rusage = os.wait4(self.pid, 0)
            self.reaped = True

    async def stop(self) -> None:
        """SIGTERM: the supervisor kills the job and exits; SIGKILL it if it does not."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.shield(self.exited)
        if not self.exited.done():
            self._kill_now()

    def _kill_now(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # PDEATHSIG takes the job's main process
        kill_uid(self.uid)  # and this everything it left

    def close(self) -> None:
        """Whatever happened: nothing left running, nothing left open."""
        if not self.reaped:
            if not self.exited.done():
                self._kill_now()
            self.reap()
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        for transport in self._transports:
            transport.close()
        for fd in (*self.fds.values(), self.status_r):
            os.close(fd)
        self.fds.clear()
        self.status_r = -1

    def outcome(self, wall: float) -> Exit:
        """Read the supervisor's report (its writers are gone once it has exited)."""
        os.set_blocking(self.status_r, False)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.status_r, 65536):
                data += chunk
        report: dict[str, Any] = {}
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                report.update(json.loads(line))
        if "error" in report:
            raise EngineError(f"could not start the job: {report['error']}")
        if "exit" not in report:
            code = os.waitstatus_to_exitcode(self.wait_status)
            raise EngineError(f"the sandbox supervisor ended ({code}) without the job's status")
        ru = self._rusage
        fallback = [ru.ru_utime, ru.ru_stime, ru.ru_maxrss] if ru is not None else [0, 0, 0]
        utime, stime, maxrss = report.get("usage") or fallback
        return Exit(report["exit"], utime + stime, int(maxrss) * 1024, wall)
