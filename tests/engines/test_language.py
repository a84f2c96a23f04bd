"""The Language engine: python jobs as their own uid, on the engine directly (the request
built as the executor builds it) and through a node on the session's nats-server."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import stat
import sys
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from schemas.callbacks import RunResult
from schemas.job import Job, StorageSpec
from tests.engines.test_sandbox import alive
from tests.helpers import assert_eventually
from tests.integration.conftest import NodeFactory, make_node, prefix, spans
from tests.unit.test_bidding import make_bidder, make_req
from worker import results
from worker.bidding.types import BidRequest
from worker.capacity.usage import ResourceUsage
from worker.engines import uids
from worker.engines.language import LanguageEngine
from worker.errors import EngineError
from worker.plugins import Plugins
from worker.protocols import PreparedInput, PreparedOutput, RunOutcome, RunRequest
from worker.publishers.noop import NoopPublisher
from worker.requester import Requester
from worker.storage.inline import Inline
from worker.store.types import Execution
from worker.verifiers.noop import NoopVerifier

_NODE_FIXTURES = (make_node, prefix, spans)  # fixtures of tests/integration, by import

WAIT = 20.0
VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"  # the system python's, here too


def uid_range(offset: int = 0) -> str:
    """Uids of this test process's own (pytest-xdist workers get disjoint ranges)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    first = 460_000 + index * 10_000 + offset
    return f"{first}-{first + 999}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A node's data dir: 0700, with a store file that would be readable if reachable."""
    folder = tmp_path / "data"
    folder.mkdir(mode=0o700)
    (folder / "worker.db").write_text("SQLite format 3 - the node's store")
    (folder / "worker.db").chmod(0o644)
    return folder


@pytest.fixture
def engine(data_dir: Path) -> LanguageEngine:
    return LanguageEngine(uid_range=uid_range(), data_dir=data_dir)


def language_job(command: str = "", **spec: Any) -> Job:
    language = {"Language": "python", "Command": command, **spec.pop("Language", {})}
    body = {"Engine": "Language", "Verifier": "Noop", "Publisher": "Noop", **spec}
    body["Language"] = language
    return msgspec.convert({"Metadata": {"ID": f"job-{uuid.uuid4().hex[:8]}"}, "Spec": body}, Job)


def request_for(
    data_dir: Path,
    job: Job,
    *,
    inputs: Sequence[tuple[Path, str]] = (),
    outputs: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
    max_output_bytes: int = 1 << 20,
) -> RunRequest:
    """What BaseExecutor builds: results/<id> and work/<id> (0700), fetch into work."""
    now = datetime.now(UTC)
    execution = Execution(
        id=f"e-{uuid.uuid4()}",
        job=job,
        requester="r1",
        usage=ResourceUsage(CPU=0.1, Memory=100 << 20),
        create_time=now,
        update_time=now,
    )
    results_dir = results.prepare(data_dir / "results", execution.id)
    work_dir = results.prepare(data_dir / "work", execution.id)
    counter = iter(range(1, 1_000_000))

    async def fetch(spec: StorageSpec) -> Path:
        dest = work_dir / "inputs" / str(next(counter))
        dest.mkdir(parents=True, mode=0o700)
        return await Inline().prepare(spec, dest, requester="r1")

    prepared = []
    for name, target in outputs:
        (results_dir / name).mkdir(mode=0o700)
        spec = StorageSpec(Name=name, path=target)
        prepared.append(PreparedOutput(spec=spec, source=results_dir / name, target=target))
    return RunRequest(
        execution=execution,
        results_dir=results_dir,
        work_dir=work_dir,
        inputs=[PreparedInput(spec=StorageSpec(), source=s, target=t) for s, t in inputs],
        outputs=prepared,
        timeout=timeout,
        max_output_bytes=max_output_bytes,
        fetch=fetch,
    )


async def run(
    engine: LanguageEngine, data_dir: Path, command: str = "", **kwargs: Any
) -> tuple[RunOutcome, RunRequest]:
    spec = {k: kwargs.pop(k) for k in ("Language", "Resources", "Network") if k in kwargs}
    request = request_for(data_dir, language_job(command, **spec), **kwargs)
    return await engine.run(request), request


def inline_tar(name: str, files: dict[str, str]) -> dict[str, Any]:
    """A gzipped tar in an Inline data URL: a folder, as Bacalhau's CLI sends one."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    url = "data:application/gzip;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"StorageSource": "Inline", "Name": name, "URL": url}


# ---------------------------------------------------------------------------------------
# running programs


async def test_command_prints_to_stdout(engine: LanguageEngine, data_dir: Path) -> None:
    outcome, request = await run(engine, data_dir, "import os\nprint('hello', os.getuid())")
    out = (request.results_dir / "stdout").read_text()
    word, uid = out.split()
    assert word == "hello" and int(uid) in uids.UidRange.parse(uid_range())
    assert outcome.result.stdout == out and not outcome.result.stdouttruncated
    assert (outcome.result.exitCode, outcome.result.runnerError) == (0, "")
    assert (request.results_dir / "exitCode").read_text() == "0"
    assert (request.results_dir / "stderr").read_bytes() == b""
    assert outcome.usage.CPUSeconds > 0 and outcome.usage.PeakMemoryBytes > 1 << 20
    assert outcome.usage.WallSeconds > 0
    assert engine.uids.leased == frozenset() and uids.live_processes(int(uid)) == []


async def test_outputs_are_mapped_under_the_working_dir(
    engine: LanguageEngine, data_dir: Path
) -> None:
    code = """
import os
assert not os.path.exists("/outputs")  # no mount namespace: /outputs is ./outputs
open("outputs/result.txt", "w").write("42")
os.makedirs("outputs/deep/er")
open("outputs/deep/er/file", "w").write("nested")
open("data/extra/more.txt", "w").write("extra")
print(sorted(os.listdir(".")), os.environ["HOME"], os.environ["TMPDIR"])
import tempfile
with tempfile.NamedTemporaryFile(dir=None) as t:
    print(os.path.realpath(t.name).startswith(os.getcwd() + "/.tmp/"))
"""
    outcome, request = await run(
        engine, data_dir, code, outputs=[("outputs", "/outputs"), ("extra", "/data/extra")]
    )
    assert outcome.result.exitCode == 0, outcome.result.stderr
    lines = outcome.result.stdout.splitlines()
    assert lines == [
        "['.home', '.tmp', 'data', 'outputs'] /proc/self/cwd/.home /proc/self/cwd/.tmp",
        "True",
    ]
    folder = request.results_dir / "outputs"
    assert (folder / "result.txt").read_text() == "42"
    assert (folder / "deep" / "er" / "file").read_text() == "nested"
    assert (request.results_dir / "extra" / "more.txt").read_text() == "extra"
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), path  # the node's now
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


async def test_non_zero_exit_is_a_result_not_a_failure(
    engine: LanguageEngine, data_dir: Path
) -> None:
    outcome, request = await run(engine, data_dir, "import sys\nprint('bye')\nsys.exit(3)")
    assert (outcome.result.exitCode, outcome.result.stdout) == (3, "bye\n")
    assert (request.results_dir / "exitCode").read_text() == "3"
    outcome, _ = await run(engine, data_dir, "raise ValueError('boom')")
    assert outcome.result.exitCode == 1
    assert 'File "<stdin>", line 1' in outcome.result.stderr
    assert "ValueError: boom" in outcome.result.stderr


async def test_a_signal_is_the_exit_code_and_the_runner_error(
    engine: LanguageEngine, data_dir: Path
) -> None:
    outcome, _ = await run(engine, data_dir, "import os, signal\nos.kill(os.getpid(), 24)")
    assert outcome.result.exitCode == 128 + signal.SIGXCPU
    assert outcome.result.runnerError == "killed by SIGXCPU: CPU time limit exceeded"


async def test_program_path_runs_from_the_job_context(
    engine: LanguageEngine, data_dir: Path
) -> None:
    context = inline_tar(
        "project",
        {
            "main.py": (
                "import sys\nprint(open('data/words.txt').read().upper(), sys.argv)\n"
                "try:\n    open('data/words.txt', 'a')\nexcept OSError as exc:\n    print(exc)\n"
            ),
            "data/words.txt": "hello context",
        },
    )
    outcome, _ = await run(
        engine, data_dir, Language={"ProgramPath": "main.py", "JobContext": context}
    )
    assert outcome.result.exitCode == 0, outcome.result.stderr
    assert outcome.result.stdout.splitlines() == [
        "HELLO CONTEXT ['/proc/self/cwd/main.py']",
        "[Errno 13] Permission denied: 'data/words.txt'",
    ]
    with pytest.raises(EngineError, match=r"ProgramPath other\.py not found in the context"):
        await run(engine, data_dir, Language={"ProgramPath": "other.py", "JobContext": context})


async def test_inputs_are_readable_and_read_only(
    engine: LanguageEngine, data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("input data")
    code = """
import os
print(open("inputs/sub/a.txt").read())
for attempt in (lambda: open("inputs/sub/a.txt", "w"), lambda: open("inputs/new", "w"),
                lambda: os.rename("inputs", "moved"), lambda: os.chmod("inputs/sub/a.txt", 0o777)):
    try:
        attempt()
        print("WRITABLE")
    except OSError as exc:
        print(type(exc).__name__)
"""
    outcome, _ = await run(engine, data_dir, code, inputs=[(folder, "/inputs")])
    assert outcome.result.stdout.splitlines() == ["input data", *(["PermissionError"] * 4)]
    assert (folder / "sub" / "a.txt").read_text() == "input data"  # a copy was given


async def test_stdout_is_capped(engine: LanguageEngine, data_dir: Path) -> None:
    outcome, request = await run(engine, data_dir, "print('x' * 100_000)", max_output_bytes=1000)
    assert (request.results_dir / "stdout").read_bytes() == b"x" * 1000
    assert outcome.result.stdouttruncated and outcome.result.exitCode == 0


async def test_memory_hog_is_stopped_by_the_address_space_limit(
    engine: LanguageEngine, data_dir: Path
) -> None:
    code = "hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))"
    outcome, _ = await run(engine, data_dir, code, Resources={"Memory": "64Mb"})
    assert outcome.result.exitCode == 1
    assert outcome.result.stderr.rstrip().endswith("MemoryError")
    assert outcome.usage.PeakMemoryBytes < 200 << 20


# ---------------------------------------------------------------------------------------
# timeout, cancel, fork bomb: nothing of the uid survives

RUNAWAY = """
import os, signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("uid", os.getuid(), flush=True)
if os.fork() == 0:
    print("pid", os.getpid(), flush=True)
    while True: pass          # a child that ignores SIGTERM
if os.fork() == 0:
    os.setsid()               # a double-forked grandchild in a session of its own
    if os.fork() == 0:
        print("pid", os.getpid(), flush=True)
        signal.pause()
    os._exit(0)
print("pid", os.getpid(), flush=True)
while True: pass
"""


def printed(request: RunRequest, what: str) -> list[int]:
    """The numbers the job printed after ``what`` (stdout is kept when it is killed)."""
    lines = (request.results_dir / "stdout").read_text().splitlines()
    return [int(line.split()[1]) for line in lines if line.startswith(what + " ")]


async def wait_for_processes(engine: LanguageEngine, count: int) -> tuple[int, list[int]]:
    """The job's uid and pids, once it runs ``count`` processes."""

    def check() -> tuple[int, list[int]]:
        for uid in engine.uids.leased:
            pids = uids.live_processes(uid)
            if len(pids) >= count:
                return uid, pids
        raise AssertionError(f"no job with {count} processes yet")

    return await assert_eventually(check, timeout=WAIT)


async def test_timeout_kills_the_whole_job(engine: LanguageEngine, data_dir: Path) -> None:
    request = request_for(data_dir, language_job(RUNAWAY), timeout=4)
    with pytest.raises(TimeoutError):
        await engine.run(request)
    [uid], pids = printed(request, "uid"), printed(request, "pid")
    assert len(pids) == 3  # main, the SIGTERM-ignoring child, the setsid grandchild
    assert uids.live_processes(uid) == [] and not any(alive(pid) for pid in pids)
    assert engine.uids.leased == frozenset()


async def test_cancel_kills_promptly(engine: LanguageEngine, data_dir: Path) -> None:
    task = asyncio.ensure_future(run(engine, data_dir, RUNAWAY, timeout=600))
    uid, pids = await wait_for_processes(engine, 3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    assert uids.live_processes(uid) == [] and not any(alive(pid) for pid in pids)
    assert engine.uids.leased == frozenset()


async def test_fork_bomb_is_contained_and_cleaned_up(data_dir: Path) -> None:
    engine = LanguageEngine(uid_range=uid_range(), data_dir=data_dir, max_processes=24)
    bomb = """
import os
print("uid", os.getuid(), flush=True)
refused = False
while True:
    try:
        os.fork()
    except BlockingIOError:   # EAGAIN: RLIMIT_NPROC of the uid
        if not refused:
            refused = True
            print("refused", os.getpid(), flush=True)
"""
    request = request_for(data_dir, language_job(bomb), timeout=4)
    with pytest.raises(TimeoutError):
        await engine.run(request)
    [uid] = printed(request, "uid")
    assert printed(request, "refused")  # the limit said no, the host was never at risk
    assert uids.live_processes(uid) == []


async def test_concurrent_executions_have_distinct_uids(
    engine: LanguageEngine, data_dir: Path
) -> None:
    assert engine.version == VERSION  # the probe's uid is back before the jobs start
    tasks = [asyncio.ensure_future(run(engine, data_dir, "while True: pass")) for _ in range(3)]

    def three_running() -> bool:
        leased = engine.uids.leased
        return len(leased) == 3 and all(uids.live_processes(uid) for uid in leased)

    await assert_eventually(three_running, timeout=WAIT)
    for uid in engine.uids.leased:
        assert len(uids.live_processes(uid)) == 1  # one job per uid
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert engine.uids.leased == frozenset()


# ---------------------------------------------------------------------------------------
# escape attempts: each fails, with the kernel's clear error


def attempt(code: str) -> str:
    indented = "\n".join("    " + line for line in code.splitlines())
    return (
        f"try:\n{indented}\n    print('ESCAPED')\n"
        "except Exception as exc:\n    print(f'{type(exc).__name__}: {exc}')"
    )


ESCAPES = {
    "read /etc/shadow": ("open('/etc/shadow').read()", "PermissionError"),
    "read the node's store": ("open('{data}/worker.db').read()", "PermissionError"),
    "list the data dir": ("import os\nos.listdir('{data}')", "PermissionError"),
    "read another execution's results": ("open('{other}').read()", "PermissionError"),
    "reach them relatively": ("open('../../../results/e-other/stdout')", "PermissionError"),
    "write into the data dir": ("open('{data}/escape', 'w')", "PermissionError"),
    "write next to the working dir": ("open('../escape', 'w')", "PermissionError"),
    "write into /etc": ("open('/etc/escape', 'w')", "PermissionError"),
    "signal the node": ("import os\nos.kill({node}, 0)", "PermissionError"),
    "become root": ("import os\nos.setuid(0)", "PermissionError"),
    "connect to a local listener": (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)",
        "OSError: [Errno 101] Network is unreachable",
    ),
}


@pytest.mark.parametrize("name", list(ESCAPES))
async def test_escape_attempt_fails(engine: LanguageEngine, data_dir: Path, name: str) -> None:
    other = results.prepare(data_dir / "results", "e-other") / "stdout"
    other.write_text("another execution's output")
    other.chmod(0o644)
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code, expected = ESCAPES[name]
    code = code.format(data=data_dir, other=other, node=os.getpid(), port=port)
    try:
        async with server:
            outcome, _ = await run(engine, data_dir, attempt(code))
    finally:
        for stray in (Path("/etc/escape"), data_dir / "escape"):
            stray.unlink(missing_ok=True)
    assert outcome.result.stdout.startswith(expected), outcome.result.stdout
    assert "ESCAPED" not in outcome.result.stdout and connections == []


async def test_the_host_network_only_when_full_and_accepted(data_dir: Path) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = attempt(f"import socket\nsocket.create_connection(('127.0.0.1', {port})).close()")
    full = {"Type": "Full"}
    async with server:
        networked = LanguageEngine(uid_range=uid_range(), data_dir=data_dir, accept_networked=True)
        outcome, _ = await run(networked, data_dir, code, Network=full)
        assert outcome.result.stdout == "ESCAPED\n"
        outcome, _ = await run(networked, data_dir, code)  # Network None: isolated
        assert "Network is unreachable" in outcome.result.stdout
        closed = LanguageEngine(uid_range=uid_range(), data_dir=data_dir)
        outcome, _ = await run(closed, data_dir, code, Network=full)
        assert "Network is unreachable" in outcome.result.stdout


async def test_outputs_keep_only_the_jobs_own_files(engine: LanguageEngine, data_dir: Path) -> None:
    code = """
import os
os.chdir("outputs")
open("plain", "w").write("mine")
os.chmod("plain", 0o4755)
os.symlink("/etc/shadow", "leak")
os.symlink("plain", "alias")
os.mkfifo("pipe")
os.link("plain", "twin")
open("/tmp/scratch-%d" % os.getuid(), "w").write("temp")
print(os.getuid())
"""
    outcome, request = await run(engine, data_dir, code, outputs=[("outputs", "/outputs")])
    assert outcome.result.exitCode == 0, outcome.result.stderr
    folder = request.results_dir / "outputs"
    assert sorted(os.listdir(folder)) == ["alias", "plain", "twin"]
    assert (folder / "alias").read_text() == (folder / "twin").read_text() == "mine"
    st = (folder / "plain").stat()
    assert st.st_uid == 0 and not st.st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert st.st_nlink == 1  # the hard link is broken: two files of the node's
    uid = int(outcome.result.stdout)
    assert not Path(f"/tmp/scratch-{uid}").exists()  # the job's temp files are gone too


async def test_data_dir_left_open_is_closed_before_a_job(
    engine: LanguageEngine, data_dir: Path
) -> None:
    data_dir.chmod(0o755)
    outcome, _ = await run(engine, data_dir, attempt(f"open('{data_dir}/worker.db')"))
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert outcome.result.stdout.startswith("PermissionError")


# ---------------------------------------------------------------------------------------
# bid strategy


def bid_req(**language: Any) -> BidRequest:
    network = language.pop("Network", None)
    extra = {"Network": network} if network else {}
    return make_req(language_job(Language=language, **extra))


@pytest.mark.parametrize(
    ("language", "reason"),
    [
        ({"Command": "pass"}, ""),
        ({"Command": "pass", "LanguageVersion": VERSION}, ""),
        ({"Command": "pass", "Language": "Python"}, ""),
        (
            {"Command": "pass", "LanguageVersion": "2.7"},
            f"language version 2.7 not supported: this node runs python {VERSION}",
        ),
        ({"Command": "pass", "RequirementsPath": "req.txt"}, "requirements not supported"),
        (
            {"Command": "pass", "Language": "wasm"},
            f"language wasm not supported: this node runs python {VERSION}",
        ),
        ({"Command": "pass", "Network": {"Type": "HTTP"}}, "networking type HTTP not supported"),
        ({}, "no program: Language.Command and Language.ProgramPath are empty"),
        ({"ProgramPath": "main.py"}, "Language.ProgramPath needs a Language.JobContext"),
    ],
)
async def test_bid_strategy(engine: LanguageEngine, language: dict[str, Any], reason: str) -> None:
    decision = await engine.bid_strategy.should_bid(bid_req(**language))
    assert (decision.bid, decision.reason, decision.retryable) == (not reason, reason, False)


async def test_bidder_asks_the_engine_strategy(engine: LanguageEngine) -> None:
    bidder = make_bidder(executor_strategies={"Language": engine.bid_strategy})
    decision, usage = await bidder.decide(bid_req(Command="pass", LanguageVersion="3.0"))
    assert (decision.bid, usage) == (False, None)
    assert decision.reason == f"language version 3.0 not supported: this node runs python {VERSION}"
    decision, usage = await bidder.decide(bid_req(Command="pass"))
    assert decision.bid and usage is not None


async def test_run_refuses_what_the_strategy_declines(
    engine: LanguageEngine, data_dir: Path
) -> None:
    with pytest.raises(EngineError, match=r"language version 2\.7 not supported"):
        await run(engine, data_dir, "pass", Language={"LanguageVersion": "2.7"})


def test_engine_is_installed_with_the_system_python(engine: LanguageEngine) -> None:
    assert engine.is_installed()
    assert engine.version == VERSION
    assert engine.interpreter().startswith(("/usr/bin/", "/usr/local/bin/", "/bin/"))
    broken = LanguageEngine(uid_range=uid_range(), data_dir=Path("/"), python="no-such-python")
    assert not broken.is_installed()
    decision = broken.bid_strategy.check(bid_req(Command="pass"))
    assert decision.reason.startswith("python not usable: no-such-python not found")


# ---------------------------------------------------------------------------------------
# through a node


@pytest.fixture
async def r1(nc: Client, prefix: str) -> AsyncIterator[Requester]:
    requester = Requester(nc=nc, requester_id="r1", prefix=prefix)
    await requester.start()
    yield requester
    await requester.close()


async def test_node_runs_a_python_job_end_to_end(
    make_node: NodeFactory, r1: Requester, tmp_path: Path
) -> None:
    engine = LanguageEngine(uid_range=uid_range(), data_dir=tmp_path / "n1")
    plugins = Plugins(
        engines={"Language": engine},
        verifiers={"Noop": NoopVerifier()},
        publishers={"Noop": NoopPublisher()},
    )
    await make_node("n1", plugins=plugins)
    code = "import os\nopen('/outputs/answer.txt'[1:], 'w').write('42')\nprint('hello', 6 * 7)"
    job = language_job(code, outputs=[{"Name": "outputs", "path": "/outputs"}])
    bid = await r1.ask("n1", job)
    assert bid.Accepted, bid
    await r1.accept("n1", bid.ExecutionID)
    callbacks = await r1.run_to_completion("n1", bid.ExecutionID, timeout=WAIT)
    run_result = next(c for c in callbacks if isinstance(c, RunResult))
    assert run_result.RunCommandResult is not None
    assert run_result.RunCommandResult.stdout == "hello 42\n"
    assert run_result.RunCommandResult.exitCode == 0
    assert run_result.Usage.CPUSeconds > 0
    answer = tmp_path / "n1" / "results" / bid.ExecutionID / "outputs" / "answer.txt"
    assert answer.read_text() == "42" and answer.stat().st_uid == 0
    view = await r1.get_execution("n1", bid.ExecutionID)
    assert view.Execution.State.value == "Completed"
