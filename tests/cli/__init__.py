"""Helpers of the CLI tests: the ``worker`` command driven as a user would, through typer's
runner (in a thread, so that the test's event loop keeps serving its in-process nodes)
and as real subprocesses, against the session's nats-server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import wasmtime
import yaml
from typer.testing import CliRunner, Result

from worker import cli

WORKER = [sys.executable, "-m", "worker"]
REQUESTER = "r-cli"

# Print "tick\n" every 50 ms, forever (only a cancel or the timeout ends it).
TICKER_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "tick\\n")
  (func (export "_start")
    (loop $forever
      (i32.store (i32.const 0) (i32.const 16))
      (i32.store (i32.const 4) (i32.const 5))
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      ;; one relative clock subscription at 512 (monotonic, 50 ms), its event at 576
      (i32.store8 (i32.const 520) (i32.const 0))
      (i32.store (i32.const 528) (i32.const 1))
      (i64.store (i32.const 536) (i64.const 50000000))
      (drop (call $poll_oneoff (i32.const 512) (i32.const 576) (i32.const 1) (i32.const 640)))
      (br $forever))))
"""

# Trap at once: the engine reports an error, the execution fails.
TRAP_WAT = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'


def wasm_spec(wat: str, **spec: Any) -> dict[str, Any]:
    url = "data:application/wasm;base64," + base64.b64encode(wasmtime.wat2wasm(wat)).decode()
    body = {
        "Engine": "Wasm",
        "Verifier": "Noop",
        "Publisher": "Noop",
        "Wasm": {"EntryModule": {"StorageSource": "Inline", "URL": url}, "EntryPoint": "_start"},
        **spec,
    }
    return {"APIVersion": "v1beta1", "Spec": body}


def write_spec(path: Path, doc: dict[str, Any]) -> Path:
    """``doc`` as YAML, or JSON when ``path`` ends in .json."""
    path.write_text(json.dumps(doc) if path.suffix == ".json" else yaml.safe_dump(doc))
    return path


def client_args(nats_url: str, prefix: str, requester: str = REQUESTER) -> list[str]:
    return [
        "--nats-url",
        nats_url,
        "--subject-prefix",
        prefix,
        "--requester-id",
        requester,
        "--discover-timeout",
        "2s",
    ]


def clean_env() -> dict[str, str | None]:
    """Unset every WORKER_* variable of the test process for an invocation."""
    return {k: None for k in os.environ if k.startswith("WORKER_")}


async def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """``worker <args>`` through typer's runner, in a thread."""
    runner = CliRunner()
    full_env: dict[str, str | None] = {**clean_env(), **(env or {})}
    return await asyncio.to_thread(runner.invoke, cli.app, list(args), env=full_env)


def json_lines(text: str) -> list[Any]:
    """Every line of ``text`` parsed as JSON (each must parse)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def spawn(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    return await asyncio.create_subprocess_exec(
        *WORKER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "COLUMNS": "200", **(env or {})},
    )


async def read_line(stream: asyncio.StreamReader | None, timeout: float = 30.0) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), timeout)
    return line.decode()


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60.0) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
