"""A nats-server process on 127.0.0.1 with JetStream, for the tests and the benchmarks
(``bench/``): a random port the server picks itself, its store in its own directory."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from worker.embedded import find_nats_server

NATS_CONF = """
listen: "127.0.0.1:-1"
max_payload: 8MB
jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: {file_store} }}
"""


def nats_server_bin() -> str:
    """The binary the node's embedded broker runs (a RuntimeError when there is none)."""
    return find_nats_server()


class NatsServer:
    """A nats-server process, started and stopped by its owner (``port`` -1: the server
    picks one; a restart can ask for the same one again)."""

    def __init__(self, workdir: Path, port: int = -1, file_store: str = "2GB") -> None:
        self.workdir = workdir
        self.port = port
        self.file_store = file_store
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nats.conf"
        conf.write_text(NATS_CONF.format(store=self.workdir / "js", file_store=self.file_store))
        args = [nats_server_bin(), "-c", str(conf), "--ports_file_dir", str(self.workdir)]
        if self.port != -1:
            args += ["-p", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ports = self.workdir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + 10
        while True:
            try:
                self.url = json.loads(ports.read_text())["nats"][0]
                break
            except (FileNotFoundError, json.JSONDecodeError, KeyError, IndexError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.01)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a server still running and wait for it; SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
