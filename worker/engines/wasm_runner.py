"""The child process of the Wasm engine: runs ONE WASI preview 1 module, then exits.

``python -m worker.engines.wasm_runner SPEC.json``. The parent (``worker.engines.wasm``)
writes the spec, reads the module's stdout/stderr from this process's fd 1 and 2 (the
module inherits them; nothing else of this process writes there) and reads the outcome
from ``spec["result"]``. Running wasmtime in a process of its own isolates its panics and
aborts from the node, and makes a kill of the process group an instant, complete stop.

Spec: ``{module, fallback_name, entry_point, args[], env[[k, v]], imports[{path,
fallback_name}], preopens[{host, guest, writable}], memory_bytes, timeout, result, log}``.
Outcome: ``{status: exit|returned|timeout|error, exit_code, message, cpu_seconds,
max_rss_bytes}`` — ``returned`` when the entry point returned without ``proc_exit``
(Bacalhau reports exit code -1 then), ``error`` when the module could not be loaded,
linked or validated, or trapped.

Limits: linear memory and tables through ``Store.set_limits`` (each module at most one
memory); time through epoch interruption (a timer thread bumps the epoch once
``timeout`` has passed, and the module traps at its next loop back-edge or call);
RLIMIT_CPU as a backstop for CPU spent outside wasm code (a host call stuck in a sleep is
the parent's to kill). The module sees only the preopened folders
and the given argv and environment; WASI preview 1 has no sockets.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import wasmtime

WASI = "wasi_snapshot_preview1"
CPU_GRACE = 5  # seconds of CPU past the timeout before the kernel's SIGXCPU


class ProcExit(Exception):
    """Raised by the ``proc_exit`` host function: any u32 status, as wazero allows
    (wasmtime's own refuses 126 and above)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class JobError(Exception):
    """The module cannot run; the message goes to the requester."""


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated LEB128")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def module_name(binary: bytes) -> str:
    """The module name of the ``name`` custom section (``(module $name …)``), or ""."""
    try:
        if binary[:4] != b"\0asm":
            return ""
        pos = 8
        while pos < len(binary):
            section = binary[pos]
            size, pos = _leb128(binary, pos + 1)
            end = pos + size
            if section == 0:
                length, at = _leb128(binary, pos)
                if binary[at : at + length] == b"name":
                    at += length
                    while at < end:
                        sub = binary[at]
                        sub_size, at = _leb128(binary, at + 1)
                        if sub == 0:
                            length, at = _leb128(binary, at)
                            return binary[at : at + length].decode("utf-8", "replace")
                        at += sub_size
            pos = end
    except (ValueError, IndexError):
        return ""
    return ""


def one_line(message: str) -> str:
    """wasmtime's multi-line error text as one line, without the wasm backtrace."""
    lines = []
    for raw in message.splitlines():
        line = raw.strip()
        if not line or line == "Caused by:" or line.startswith("error while executing at"):
            continue
        if line[0].isdigit() and ":" in line and " - " in line:  # a backtrace frame
            continue
        lines.append(line)
    return ": ".join(lines) or message.strip()


def _load(engine: wasmtime.Engine, path: str, what: str) -> tuple[wasmtime.Module, bytes]:
    binary = Path(path).read_bytes()
    try:
        return wasmtime.Module(engine, binary), binary
    except wasmtime.WasmtimeError as exc:
        raise JobError(f"failed to load {what}: {one_line(str(exc))}") from None


def _check_imports(module: wasmtime.Module, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
    """Every import must be provided (Bacalhau's ``ValidateModuleImports`` message)."""
    for imp in module.imports:
        name = imp.name or ""
        try:
            linker.get(store, imp.module, name)
        except wasmtime.WasmtimeError:
            raise JobError(
                f"no export found for '{imp.module}::{name}' required by module"
            ) from None


def _check_entry(module: wasmtime.Module, name: str) -> None:
    """Bacalhau's ``ValidateModuleAsEntryPoint``: an exported function, no params, no
    results."""
    for export in module.exports:
        if export.name != name:
            continue
        ftype = export.type
        if not isinstance(ftype, wasmtime.FuncType):
            break
        if ftype.params:
            raise JobError(f"function '{name}' should take 0 parameters")
        if ftype.results:
            raise JobError(f"function '{name}' should return 0 results")
        return
    raise JobError(f"function '{name}' required but no WASM export with that name was found")


def _proc_exit(code: int) -> NoReturn:
    raise ProcExit(code & 0xFFFFFFFF)


def _wasi(spec: dict[str, Any]) -> wasmtime.WasiConfig:
    wasi = wasmtime.WasiConfig()
    wasi.argv = [spec["argv0"], *spec["args"]]
    wasi.env = [(k, v) for k, v in spec["env"]]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    for mount in spec["preopens"]:
        try:
            wasi.preopen_dir(mount["host"], mount["guest"], fs_mutable=bool(mount["writable"]))
        except wasmtime.WasmtimeError as exc:
            raise JobError(f"cannot mount {mount['guest']}: {one_line(str(exc))}") from None
    return wasi


def _instantiate(spec: dict[str, Any], engine: wasmtime.Engine) -> tuple[wasmtime.Store, Any]:
    """Load, validate and link everything; return the store and the entry function."""
    entry, binary = _load(engine, spec["module"], "entry module")
    spec["argv0"] = module_name(binary) or spec["fallback_name"]
    _check_entry(entry, spec["entry_point"])
    store = wasmtime.Store(engine)
    modules = 1 + len(spec["imports"])
    limit = int(spec["memory_bytes"])
    if limit > 0:  # tables cost 8 bytes an element: they get the same budget
        store.set_limits(
            memory_size=limit, table_elements=limit // 8, memories=modules, instances=modules
        )
    store.set_epoch_deadline(1)
    store.set_wasi(_wasi(spec))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True
    exit_type = wasmtime.FuncType([wasmtime.ValType.i32()], [])
    linker.define_func(WASI, "proc_exit", exit_type, _proc_exit)
    linker.allow_shadowing = False
    names = {WASI}
    for item in spec["imports"]:
        module, lib = _load(engine, item["path"], "import module")
        name = module_name(lib) or item["fallback_name"]
        if name in names:
            raise JobError(f"two modules are named {name!r}: cannot link import modules")
        names.add(name)
        _check_imports(module, linker, store)
        linker.define_instance(store, name, _link(linker, store, module, "import module"))
    _check_imports(entry, linker, store)
    instance = _link(linker, store, entry, "entry module")
    return store, instance.exports(store)[spec["entry_point"]]


def _link(
    linker: wasmtime.Linker, store: wasmtime.Store, module: wasmtime.Module, what: str
) -> wasmtime.Instance:
    try:
        return linker.instantiate(store, module)
    except wasmtime.Trap as exc:
        if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
            raise
        raise JobError(f"failed to instantiate {what}: {one_line(exc.message)}") from None
    except wasmtime.WasmtimeError as exc:
        raise JobError(f"failed to instantiate {what}: {one_line(str(exc))}") from None


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the module; the outcome without the usage figures."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    config.wasm_multi_memory = False
    engine = wasmtime.Engine(config)
    timeout = float(spec["timeout"])
    timer = None
    if timeout > 0:  # else no deadline: the epoch never moves
        timer = threading.Timer(min(timeout, threading.TIMEOUT_MAX), engine.increment_epoch)
        timer.daemon = True
        timer.start()
    try:
        store, entry = _instantiate(spec, engine)
        entry(store)
    except ProcExit as exc:
        return {"status": "exit", "exit_code": exc.code}
    except wasmtime.ExitTrap as exc:
        return {"status": "exit", "exit_code": exc.code}
    except JobError as exc:
        return {"status": "error", "message": str(exc)}
    except wasmtime.Trap as exc:
        if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
            return {"status": "timeout", "message": "wasm execution interrupted"}
        return {"status": "error", "message": one_line(exc.message)}
    except wasmtime.WasmtimeError as exc:
        return {"status": "error", "message": one_line(str(exc))}
    finally:
        if timer is not None:
            timer.cancel()
    return {"status": "returned", "exit_code": -1}


def _limit_cpu(timeout: float) -> None:
    if timeout <= 0 or not math.isfinite(timeout):
        return
    seconds = min(math.ceil(timeout) + CPU_GRACE, 1 << 40)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        seconds = min(seconds, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, hard))


def main(argv: list[str]) -> NoReturn:
    spec = json.loads(Path(argv[1]).read_text())
    # Anything Python itself prints goes to the log, never into the job's stdout/stderr.
    log = open(spec["log"], "a", buffering=1)  # noqa: SIM115 - lives until os._exit
    sys.stdout = sys.stderr = log
    _limit_cpu(float(spec["timeout"]))
    try:
        outcome = execute(spec)
    except Exception as exc:  # a bug of the runner, not of the job
        outcome = {"status": "error", "message": f"wasm runner failed: {exc!r}"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    outcome["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    outcome["max_rss_bytes"] = usage.ru_maxrss * 1024
    result = Path(spec["result"])
    partial = result.with_suffix(".tmp")
    partial.write_text(json.dumps(outcome))
    partial.rename(result)
    log.flush()
    # Skip interpreter finalisation: wasmtime's runtime threads can panic while Python
    # tears down (ecosystem notes §8.1), and there is nothing left to clean up.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
