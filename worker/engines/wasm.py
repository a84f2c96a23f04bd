"""The Wasm engine: a WASI preview 1 module per execution, in a child process
(Bacalhau ``executor/wasm``, reference §3.4; wasmtime instead of wazero).

The parent fetches the entry and import modules, plans the mounts, writes a spec into
the execution's ``work_dir`` and starts ``python -m worker.engines.wasm_runner`` in a
session of its own; the module's stdout/stderr are the child's pipes, pumped into the
results files with the ``max_output_bytes`` cap (``outputs.py``). A cancel or a timeout
kills the whole process group at once.

What the module sees (PROTOCOL.md §4): argv = [module name] + ``Wasm.Parameters``; the
environment = ``Wasm.EnvironmentVariables`` in sorted key order; each input read-only at
its ``path`` (a file input appears under its parent folder, alone with the other file
inputs of that folder); each output folder read-write at its ``path`` (``/<Name>`` when
empty: Bacalhau mounted it at the Name). Nothing else: no network, no other files.

Outcomes: ``proc_exit(n)`` → exit code n (any u32, as wazero); returning from the entry
point → -1 (Bacalhau); a trap, a missing import or entry point, a memory refusal →
EngineError. Memory: ``Resources.Memory`` rounded up to 64 KiB pages (more than 4 GiB is
refused, as Bacalhau does); unset, the memory the node reserved for the execution.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import math
import os
import posixpath
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from schemas.callbacks import Usage
from schemas.job import StorageSpec
from worker import durations
from worker.capacity.parse import ResourceParseError, parse_bytes
from worker.engines import outputs
from worker.errors import EngineError
from worker.protocols import RunOutcome, RunRequest

WASM_PAGE = 64 * 1024
WASM_MAX_MEMORY = 4 << 30  # wasm32: 65536 pages
DEFAULT_ENTRY_POINT = "_start"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def memory_limit(requested: str, reserved: int) -> int:
    """Bytes of linear memory a module may use (whole pages); 0 means no limit."""
    try:
        wanted = parse_bytes(requested, field="Memory")
    except ResourceParseError as exc:
        raise EngineError(f"invalid memory limit: {exc}") from None
    if wanted > WASM_MAX_MEMORY:
        raise EngineError(f"requested memory exceeds the wasm limit - {wanted} > 4GB")
    if wanted <= 0:
        wanted = min(max(reserved, 0), WASM_MAX_MEMORY)
    return math.ceil(wanted / WASM_PAGE) * WASM_PAGE


class WasmEngine:
    """Runs ``Engine: Wasm`` jobs; the constructor only stores settings."""

    name = "Wasm"
    scratch = True

    def __init__(self, *, python: str | None = None, kill_grace: float = 2.0) -> None:
        # The interpreter of the child (it must be able to import wasmtime and worker).
        self.python = python or sys.executable
        # How long past the job timeout the child may take to stop itself before the
        # parent kills it (it normally stops at its own epoch deadline).
        self.kill_grace = kill_grace

    def is_installed(self) -> bool:
        return importlib.util.find_spec("wasmtime") is not None

    async def run(self, request: RunRequest) -> RunOutcome:
        started = time.monotonic()
        spec = request.execution.job.Spec
        wasm = spec.Wasm
        memory = memory_limit(spec.Resources.Memory, request.execution.usage.Memory)
        scratch = request.work_dir / "wasm"
        scratch.mkdir(parents=True, exist_ok=True)
        entry = await _fetch_module(request, wasm.EntryModule, "entry module")
        imports = [await _fetch_module(request, s, "import module") for s in wasm.ImportModules]
        runner_spec: dict[str, Any] = {
            "module": str(entry),
            "fallback_name": wasm.EntryModule.Name or entry.name,
            "entry_point": wasm.EntryPoint or DEFAULT_ENTRY_POINT,
            "args": list(wasm.Parameters),
            "env": sorted(wasm.EnvironmentVariables.items()),
            "imports": [
                {"path": str(path), "fallback_name": s.Name or path.stem}
                for s, path in zip(wasm.ImportModules, imports, strict=True)
            ],
            "preopens": plan_mounts(request, scratch / "mounts"),
            "memory_bytes": memory,
            "timeout": request.timeout,
            "result": str(scratch / "result.json"),
            "log": str(scratch / "runner.log"),
        }
        spec_path = scratch / "spec.json"
        spec_path.write_text(json.dumps(runner_spec))
        stdout = outputs.CappedOutput(request.results_dir / "stdout", request.max_output_bytes)
        stderr = outputs.CappedOutput(request.results_dir / "stderr", request.max_output_bytes)
        outcome = await self._run_child(spec_path, runner_spec, request.timeout, stdout, stderr)
        status = outcome.get("status")
        if status == "timeout":
            raise EngineError(f"wasm module timed out after {durations.format(request.timeout)}")
        if status == "error":
            raise EngineError(str(outcome.get("message") or "wasm module failed"))
        exit_code = int(outcome.get("exit_code", -1))
        (request.results_dir / "exitCode").write_text(str(exit_code))
        return RunOutcome(
            result=outputs.command_result(stdout, stderr, exit_code),
            usage=Usage(
                WallSeconds=time.monotonic() - started,
                CPUSeconds=float(outcome.get("cpu_seconds", 0.0)),
                PeakMemoryBytes=int(outcome.get("max_rss_bytes", 0)),
            ),
        )

    async def _run_child(
        self,
        spec_path: Path,
        runner_spec: dict[str, Any],
        timeout: float,
        stdout: outputs.CappedOutput,
        stderr: outputs.CappedOutput,
    ) -> dict[str, Any]:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                "worker.engines.wasm_runner",
                str(spec_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                cwd=spec_path.parent,
                env=_child_env(),
            )
        except OSError as exc:
            raise EngineError(f"cannot start the wasm runner {self.python}: {exc}") from None
        guard = timeout + self.kill_grace if timeout > 0 else None
        try:
            code = await outputs.supervise(proc, stdout, stderr, timeout=guard)
        except TimeoutError:
            raise EngineError(
                f"wasm module timed out after {durations.format(timeout)} (killed)"
            ) from None
        result = Path(runner_spec["result"])
        if code != 0 or not result.exists():
            raise EngineError(f"wasm runner {_describe(code)}{_log_tail(runner_spec['log'])}")
        try:
            outcome = json.loads(result.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"wasm runner left an unreadable result: {exc}") from None
        if not isinstance(outcome, dict):
            raise EngineError("wasm runner left an unreadable result")
        return outcome


async def _fetch_module(request: RunRequest, spec: StorageSpec, what: str) -> Path:
    """The local path of a module: a file, or a folder holding exactly one file."""
    if spec.StorageSource is None:
        raise EngineError(f"the Wasm job has no {what} (StorageSource is empty)")
    if request.fetch is None:
        raise EngineError(f"cannot fetch the {what}: no storage on this node")
    path = await request.fetch(spec)
    if path.is_dir():
        files = sorted(path.iterdir())
        if len(files) != 1:
            raise EngineError(f"should be 1 file in {path.name} but there are {len(files)}")
        path = files[0]
    if not path.is_file():
        raise EngineError(f"the {what} is not a file")
    return path


def plan_mounts(request: RunRequest, staging: Path) -> list[dict[str, Any]]:
    """The preopens: ``{host, guest, writable}`` for each input and output folder.

    WASI preopens folders only: the file inputs of one parent folder are linked (or
    copied, across file systems) into a staging folder of their own, preopened there.
    """
    mounts: dict[str, dict[str, Any]] = {}

    def add(guest: str, host: Path, writable: bool) -> None:
        if guest in mounts:
            raise EngineError(f"two mounts at {guest}: cannot give the module both")
        mounts[guest] = {"host": str(host), "guest": guest, "writable": writable}

    file_folders: dict[str, Path] = {}
    for item in request.inputs:
        if item.source.is_dir():
            add(item.target, item.source, False)
        elif item.source.is_file():
            parent, base = posixpath.split(item.target)
            if not base:
                raise EngineError(f"input path {item.target!r} names no file")
            folder = file_folders.get(parent)
            if folder is None:
                folder = staging / str(len(file_folders))
                folder.mkdir(parents=True)
                file_folders[parent] = folder
                add(parent, folder, False)
            _link_or_copy(item.source, folder / base)
        else:
            raise EngineError(f"input {item.target}: nothing was fetched")
    for output in request.outputs:
        add(output.target, output.source, True)
    return list(mounts.values())


def _link_or_copy(source: Path, dest: Path) -> None:
    if dest.exists():
        raise EngineError(f"two inputs at {dest.name}")
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
            raise EngineError(f"cannot mount input {dest.name}: {exc.strerror}") from None
        shutil.copyfile(source, dest)


def _child_env() -> dict[str, str]:
    """A bare environment: the node's own variables (credentials…) stay out."""
    env = {"PYTHONPATH": _PACKAGE_ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    if "PATH" in os.environ:
        env["PATH"] = os.environ["PATH"]
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code} without a result"


def _log_tail(path: str, limit: int = 500) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""
    return f": {text[-limit:]}" if text else ""
