"""The Wasm engine with real wasmtime in its child process: Bacalhau's wasm scenarios
(reference §9.5), limits, sandboxing, cancellation; directly and through a node on the
session's nats-server. Modules are hand-written WAT (``wasm_fixtures``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
import tracemalloc
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from schemas.callbacks import CancelResult, ComputeError, PublishResult, RunResult
from schemas.compute import ExecutionState as S
from schemas.job import Job, StorageSpec
from tests.engines import wasm_fixtures as wat
from tests.helpers import assert_eventually, record_polls
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from worker.capacity.usage import ResourceUsage
from worker.engines import outputs
from worker.engines.noop import NoopEngine
from worker.engines.wasm import WasmEngine, memory_limit
from worker.errors import EngineError
from worker.node import Node
from worker.plugins import Plugins
from worker.protocols import PreparedInput, PreparedOutput, RunOutcome, RunRequest
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester
from worker.store.types import Execution
from worker.verifiers.noop import NoopVerifier

# Fixtures of tests/integration/conftest.py, shared with this folder by import.
_NODE_FIXTURES = (make_node, prefix, spans)

WAIT = 20.0
MiB = 1 << 20


class InlineStorage:
    """``StorageSource: Inline``: the spec's URL is an RFC 2397 data URL."""

    name = "Inline"

    def is_installed(self) -> bool:
        return True

    def is_local(self, spec: StorageSpec) -> bool:
        return True

    def known_size(self, spec: StorageSpec) -> int:
        return len(spec.URL)

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        header, sep, payload = spec.URL.partition(",")
        if not header.startswith("data:") or not sep:
            raise EngineError(f"not a data URL: {spec.URL[:40]!r}")
        raw = urllib.parse.unquote_to_bytes(payload)
        data = base64.b64decode(raw) if header.endswith(";base64") else raw
        path = dest / (spec.Name or "inline")
        path.write_bytes(data)
        return path


def inline(source: str | bytes, **fields: Any) -> dict[str, Any]:
    """A StorageSpec dict: a WAT module (str) or raw bytes."""
    if isinstance(source, str):
        return {"StorageSource": "Inline", "URL": wat.data_url(source), **fields}
    return {"StorageSource": "Inline", "URL": "data:," + urllib.parse.quote(source), **fields}


def wasm_job(module: str, *, imports: tuple[str, ...] = (), **spec: Any) -> Job:
    wasm = {"EntryModule": inline(module), "ImportModules": [inline(m) for m in imports]}
    wasm.update(spec.pop("Wasm", {}))
    body = {"Engine": "Wasm", "Verifier": "Noop", "Publisher": "Noop", "Wasm": wasm, **spec}
    return msgspec.convert({"Metadata": {"ID": f"job-{uuid.uuid4().hex[:8]}"}, "Spec": body}, Job)


def request_for(
    tmp_path: Path,
    job: Job,
    *,
    inputs: Sequence[tuple[Path, str]] = (),
    outputs_: Sequence[str] = (),
    timeout: float = 30.0,
    max_output_bytes: int = 1 << 30,
    reserved_memory: int = 0,
) -> RunRequest:
    now = datetime.now(UTC)
    execution = Execution(
        id=f"e-{uuid.uuid4()}",
        job=job,
        requester="r1",
        usage=ResourceUsage(Memory=reserved_memory),
        create_time=now,
        update_time=now,
    )
    results_dir, work_dir = tmp_path / "results", tmp_path / "work"
    results_dir.mkdir(parents=True)
    work_dir.mkdir(parents=True)
    counter = iter(range(1_000_000))

    async def fetch(spec: StorageSpec) -> Path:
        dest = work_dir / "fetched" / str(next(counter))
        dest.mkdir(parents=True)
        return await InlineStorage().prepare(spec, dest, requester="r1")

    prepared_outputs = []
    for name in outputs_:
        (results_dir / name).mkdir()
        spec = StorageSpec(Name=name)
        prepared_outputs.append(
            PreparedOutput(spec=spec, source=results_dir / name, target=f"/{name}")
        )
    return RunRequest(
        execution=execution,
        results_dir=results_dir,
        work_dir=work_dir,
        inputs=[PreparedInput(spec=StorageSpec(), source=s, target=t) for s, t in inputs],
        outputs=prepared_outputs,
        timeout=timeout,
        max_output_bytes=max_output_bytes,
        fetch=fetch,
    )


async def run(
    tmp_path: Path, module: str, *, engine: WasmEngine | None = None, **kwargs: Any
) -> tuple[RunOutcome, Path]:
    job_spec = {k: kwargs.pop(k) for k in ("Wasm", "Resources", "imports") if k in kwargs}
    request = request_for(tmp_path, wasm_job(module, **job_spec), **kwargs)
    outcome = await (engine or WasmEngine()).run(request)
    return outcome, request.results_dir


def runner_pids(marker: str) -> list[int]:
    """Live wasm runner processes whose command line mentions ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if b"worker.engines.wasm_runner" in cmdline and marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------
# Bacalhau's wasm scenarios, on the engine directly


async def test_hello_world(tmp_path: Path) -> None:
    outcome, results = await run(tmp_path, wat.HELLO)
    assert (results / "stdout").read_text() == "Hello, world!\n"
    assert (results / "stderr").read_bytes() == b""
    assert outcome.result.stdout == "Hello, world!\n"
    assert outcome.result.stdouttruncated is False
    # _start returned without proc_exit: Bacalhau's -1.
    assert outcome.result.exitCode == -1
    assert (results / "exitCode").read_text() == "-1"
    usage = outcome.usage
    assert usage.WallSeconds > 0 and usage.CPUSeconds > 0
    assert usage.PeakMemoryBytes > MiB


async def test_cat_file_input_to_stdout(tmp_path: Path) -> None:
    data = tmp_path / "file.txt"
    data.write_text("hello world")
    outcome, _ = await run(
        tmp_path,
        wat.CAT,
        Wasm={"Parameters": ["/data/file.txt"]},
        inputs=[(data, "/data/file.txt")],
    )
    assert (outcome.result.stdout, outcome.result.stderr) == ("hello world", "")
    assert outcome.result.exitCode == 0


async def test_exit_code_from_env_is_not_an_error(tmp_path: Path) -> None:
    outcome, results = await run(
        tmp_path, wat.EXIT_CODE, Wasm={"EnvironmentVariables": {"EXIT_CODE": "5"}}
    )
    assert (results / "exitCode").read_text() == "5"
    assert outcome.result.exitCode == 5


async def test_exit_codes_wasmtime_refuses_are_kept(tmp_path: Path) -> None:
    outcome, _ = await run(
        tmp_path, wat.EXIT_CODE, Wasm={"EnvironmentVariables": {"EXIT_CODE": "200"}}
    )
    assert outcome.result.exitCode == 200


async def test_env_vars_in_sorted_order(tmp_path: Path) -> None:
    env = {"TEST": "yes", "AWESOME": "definitely"}
    outcome, results = await run(tmp_path, wat.ENV, Wasm={"EnvironmentVariables": env})
    assert (results / "stdout").read_text() == "AWESOME=definitely\nTEST=yes\n"
    assert outcome.result.exitCode == 0


async def test_argv_is_module_name_then_parameters(tmp_path: Path) -> None:
    outcome, _ = await run(tmp_path, wat.ARGS, Wasm={"Parameters": ["a", "b c", ""]})
    assert outcome.result.stdout == "args\na\nb c\n\n"


async def test_csv_transform_into_output_folder(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "horses.csv").write_text("name,sire\nTugela,Makybe Diva\nFrankel,Galileo\n")
    params = ["/inputs/horses.csv", "/outputs/names.csv"]
    outcome, results = await run(
        tmp_path,
        wat.CSV_FIRST_COLUMN,
        Wasm={"Parameters": params},
        inputs=[(inputs, "/inputs")],
        outputs_=["outputs"],
    )
    assert outcome.result.exitCode == 0, outcome.result.stderr
    assert (results / "outputs" / "names.csv").read_text() == "name\nTugela\nFrankel\n"


async def test_inputs_are_read_only(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "horses.csv").write_text("a,b\n")
    params = ["/inputs/horses.csv", "/inputs/new.csv"]
    outcome, _ = await run(
        tmp_path, wat.CSV_FIRST_COLUMN, Wasm={"Parameters": params}, inputs=[(inputs, "/inputs")]
    )
    assert outcome.result.exitCode == 1
    assert outcome.result.stderr == "cannot open /inputs/new.csv\n"
    assert sorted(p.name for p in inputs.iterdir()) == ["horses.csv"]


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/data/../../../../etc/passwd", "/proc/self/environ"]
)
async def test_files_outside_the_preopens_cannot_be_opened(tmp_path: Path, path: str) -> None:
    data = tmp_path / "file.txt"
    data.write_text("hello world")
    outcome, _ = await run(
        tmp_path, wat.CAT, Wasm={"Parameters": [path]}, inputs=[(data, "/data/file.txt")]
    )
    assert outcome.result.exitCode == 1
    assert outcome.result.stdout == ""
    assert outcome.result.stderr == f"cannot open {path}\n"


async def test_import_modules_are_linked_by_name(tmp_path: Path) -> None:
    memory = {"Memory": "1Mi"}  # the limits leave room for one instance per module
    outcome, _ = await run(tmp_path, wat.EASTER, imports=(wat.MATHLIB,), Resources=memory)
    assert (outcome.result.stdout, outcome.result.exitCode) == ("17\n", 0)
    with pytest.raises(EngineError, match="two modules are named 'mathlib'"):
        await run(tmp_path / "b", wat.EASTER, imports=(wat.MATHLIB, wat.MATHLIB))


async def test_missing_import_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(
        EngineError, match=r"^no export found for 'env::missing' required by module$"
    ):
        await run(tmp_path, wat.MISSING_IMPORT)
    with pytest.raises(EngineError, match="no export found for 'mathlib::add'"):
        await run(tmp_path / "b", wat.EASTER)


async def test_missing_entry_point_is_an_engine_error(tmp_path: Path) -> None:
    message = "^function 'main' required but no WASM export with that name was found$"
    with pytest.raises(EngineError, match=message):
        await run(tmp_path, wat.HELLO, Wasm={"EntryPoint": "main"})


async def test_trap_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unreachable"):
        await run(tmp_path, wat.TRAP)
    assert (tmp_path / "results" / "stdout").read_text() == "about to trap\n"


async def test_invalid_module_is_an_engine_error(tmp_path: Path) -> None:
    request = request_for(tmp_path, wasm_job(wat.HELLO))
    bad = msgspec.convert(inline(b"\0asm nope"), StorageSpec)
    request.execution.job.Spec.Wasm.EntryModule = bad
    with pytest.raises(EngineError, match="failed to load entry module"):
        await WasmEngine().run(request)


# ---------------------------------------------------------------------------------------
# Limits


async def test_memory_limit_refuses_a_module_needing_more(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="200 pages exceeds memory limits"):
        await run(tmp_path, wat.BIG_MEMORY, Resources={"Memory": "1Mi"})
    outcome, _ = await run(tmp_path / "b", wat.BIG_MEMORY, Resources={"Memory": "13Mi"})
    assert outcome.result.exitCode == -1


async def test_memory_limit_makes_memory_grow_fail(tmp_path: Path) -> None:
    env = {"PAGES": "100"}  # 2 + 100 pages = 6.4 MiB
    outcome, _ = await run(
        tmp_path, wat.GROW, Wasm={"EnvironmentVariables": env}, Resources={"Memory": "1Mi"}
    )
    assert (outcome.result.exitCode, outcome.result.stderr) == (3, "grow failed\n")
    # Unset in the job: the memory the node reserved for the execution applies.
    outcome, _ = await run(
        tmp_path / "b", wat.GROW, Wasm={"EnvironmentVariables": env}, reserved_memory=MiB
    )
    assert outcome.result.exitCode == 3
    outcome, _ = await run(
        tmp_path / "c", wat.GROW, Wasm={"EnvironmentVariables": env}, Resources={"Memory": "8Mi"}
    )
    assert (outcome.result.exitCode, outcome.result.stdout) == (0, "grew\n")


@pytest.mark.parametrize(
    ("requested", "reserved", "expected"),
    [
        ("", 0, 0),
        ("", 100 * MiB, 100 * MiB),
        ("1", 0, 65536),
        ("100k", 5, 131072),
        ("4Gi", 0, 4 << 30),
        ("0", 7, 65536),
    ],
)
def test_memory_limit_values(requested: str, reserved: int, expected: int) -> None:
    assert memory_limit(requested, reserved) == expected


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ("lots", "invalid memory limit"),
        ("-1", "invalid memory limit"),
        ("5Gi", "exceeds the wasm limit"),
        ("9" * 30, "invalid memory limit"),
    ],
)
async def test_bad_memory_values_are_clear_errors(
    tmp_path: Path, requested: str, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        await run(tmp_path, wat.HELLO, Resources={"Memory": requested})


async def test_timeout_stops_an_infinite_loop(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(EngineError, match="timed out after 500ms"):
        await run(tmp_path, wat.LOOP, timeout=0.5)
    assert time.monotonic() - started < 5
    assert runner_pids(str(tmp_path)) == []


async def test_parent_kills_a_module_stuck_in_a_host_call(tmp_path: Path) -> None:
    # poll_oneoff sleeps in the host, where the epoch deadline cannot interrupt it.
    engine = WasmEngine(kill_grace=0.5)
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"timed out after 500ms \(killed\)"):
        await run(tmp_path, wat.SLEEP, timeout=0.5, engine=engine)
    assert time.monotonic() - started < 5
    assert runner_pids(str(tmp_path)) == []


async def test_cancel_kills_the_child_at_once(tmp_path: Path) -> None:
    request = request_for(tmp_path, wasm_job(wat.LOOP), timeout=600)
    task = asyncio.create_task(WasmEngine().run(request))
    pids = await assert_eventually(lambda: runner_pids(str(tmp_path)), timeout=WAIT)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 1.0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_output_flood_is_capped_in_bounded_memory(tmp_path: Path) -> None:
    env = {"CHUNKS": "512"}  # 32 MiB on stdout
    tracemalloc.start()
    try:
        outcome, results = await run(
            tmp_path, wat.FLOOD, Wasm={"EnvironmentVariables": env}, max_output_bytes=MiB
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (outcome.result.exitCode, outcome.result.stderr) == (0, "done\n")
    assert (results / "stdout").stat().st_size == MiB
    assert outcome.result.stdout == "x" * 2048
    assert outcome.result.stdouttruncated is True
    assert peak < 8 * MiB, f"the node held {peak} bytes"


# ---------------------------------------------------------------------------------------
# outputs.py with a plain child process


async def _python_child(code: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


async def test_capped_output_keeps_head_and_counts_everything(tmp_path: Path) -> None:
    proc = await _python_child(
        "import sys; sys.stdout.write('é' * 3000); sys.stderr.write('e'); sys.exit(7)"
    )
    out = outputs.CappedOutput(tmp_path / "stdout", 10)
    err = outputs.CappedOutput(tmp_path / "stderr", 10)
    assert await outputs.supervise(proc, out, err, timeout=WAIT) == 7
    assert (out.total, out.written, out.truncated) == (6000, 10, True)
    assert (tmp_path / "stdout").read_bytes() == "é".encode() * 5
    assert (err.truncated, (tmp_path / "stderr").read_text()) == (False, "e")
    result = outputs.command_result(out, err, 7)
    assert result.stdout == "é" * 1024 and result.stdouttruncated is True
    assert (result.stderr, result.stderrtruncated, result.exitCode) == ("e", False, 7)


async def test_supervise_kills_the_whole_group_on_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = await _python_child(code)
    out = outputs.CappedOutput(tmp_path / "stdout", MiB)
    err = outputs.CappedOutput(tmp_path / "stderr", MiB)
    task = asyncio.create_task(outputs.supervise(proc, out, err, timeout=600))
    grandchild = int(await assert_eventually(lambda: out.head.strip(), timeout=WAIT))
    polled = record_polls(monkeypatch)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proc.returncode == -9
    # A poll right after the group kill could reap the child before asyncio's watcher
    # does, and the watcher would report 255 (it did once, in CI).
    assert proc.pid not in polled

    def gone() -> bool:
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        return state == "Z"  # killed, waiting for init to reap it

    await assert_eventually(gone, timeout=WAIT)


# ---------------------------------------------------------------------------------------
# Through a node on the session's nats-server


def wasm_plugins() -> Plugins:
    return Plugins(
        engines={"Wasm": WasmEngine(), "Noop": NoopEngine()},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
        storage={"Inline": InlineStorage()},
    )


@pytest.fixture
async def r1(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    yield requester
    await requester.close()


async def start(make_node: NodeFactory, r1: Requester, job: Job) -> tuple[Node, str]:
    node = await make_node("n1", plugins=wasm_plugins())
    bid = await r1.ask("n1", job)
    assert bid.Accepted, bid
    await r1.accept("n1", bid.ExecutionID)
    return node, bid.ExecutionID


async def test_node_runs_hello_world_to_completion(make_node: NodeFactory, r1: Requester) -> None:
    node, eid = await start(make_node, r1, wasm_job(wat.HELLO))
    run_result = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(run_result, RunResult), run_result
    assert run_result.RunCommandResult is not None
    assert run_result.RunCommandResult.stdout == "Hello, world!\n"
    assert run_result.RunCommandResult.exitCode == -1
    assert run_result.Usage.WallSeconds > 0 and run_result.Usage.PeakMemoryBytes > 0
    await r1.accept_result("n1", eid)
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), PublishResult)
    assert (await r1.get_execution("n1", eid)).Execution.State == S.COMPLETED
    assert (node.datadir.results_dir(eid) / "stdout").read_text() == "Hello, world!\n"


async def test_node_exit_code_is_a_result_not_a_failure(
    make_node: NodeFactory, r1: Requester
) -> None:
    job = wasm_job(wat.EXIT_CODE, Wasm={"EnvironmentVariables": {"EXIT_CODE": "5"}})
    node, eid = await start(make_node, r1, job)
    run_result = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(run_result, RunResult), run_result
    assert run_result.RunCommandResult is not None and run_result.RunCommandResult.exitCode == 5
    assert (node.datadir.results_dir(eid) / "exitCode").read_text() == "5"


async def test_node_csv_transform_with_inline_input_and_output(
    make_node: NodeFactory, r1: Requester
) -> None:
    csv = inline(b"name,sire\nTugela,Makybe Diva\n", path="/inputs/horses.csv")
    job = wasm_job(
        wat.CSV_FIRST_COLUMN,
        Wasm={"Parameters": ["/inputs/horses.csv", "/outputs/names.csv"]},
        inputs=[csv],
        outputs=[{"Name": "outputs"}],  # no path: mounted at /outputs
    )
    node, eid = await start(make_node, r1, job)
    run_result = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(run_result, RunResult), run_result
    assert run_result.RunCommandResult is not None
    assert run_result.RunCommandResult.exitCode == 0, run_result.RunCommandResult.stderr
    output = node.datadir.results_dir(eid) / "outputs" / "names.csv"
    assert output.read_text() == "name\nTugela\n"


async def test_node_reports_a_missing_import(make_node: NodeFactory, r1: Requester) -> None:
    _, eid = await start(make_node, r1, wasm_job(wat.MISSING_IMPORT))
    error = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(error, ComputeError), error
    assert error.Err == "no export found for 'env::missing' required by module"
    assert error.Cause == "EngineError"


async def test_node_cancel_kills_the_runner(make_node: NodeFactory, r1: Requester) -> None:
    _, eid = await start(make_node, r1, wasm_job(wat.LOOP))
    await assert_eventually(lambda: runner_pids(eid), timeout=WAIT)
    started = time.monotonic()
    await r1.cancel("n1", eid, "stop")
    assert isinstance(await r1.wait_callback(eid, timeout=WAIT), CancelResult)
    await assert_eventually(lambda: runner_pids(eid) == [], timeout=WAIT)
    assert time.monotonic() - started < 2.0


async def test_node_times_out_an_infinite_loop(make_node: NodeFactory, r1: Requester) -> None:
    _, eid = await start(make_node, r1, wasm_job(wat.LOOP, Timeout=1))
    error = await r1.wait_callback(eid, timeout=WAIT)
    assert isinstance(error, ComputeError), error
    assert error.Cause == "RunTimeout", error
    assert runner_pids(eid) == []
