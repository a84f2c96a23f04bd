"""Harness of the reliability suite (issue 4): real parts, faults injected from outside.

- ``broker``: a nats-server of the test's own (JetStream, file store) that tests may
  kill -9 and restart on the same port and store dir.
- ``NodeProc``: ``python -m worker serve`` as a separate OS process; stdout gives the
  ``NODE_ID=`` line, stderr goes to a file per start (``log()`` reads them all).
- A test hook (``sitecustomize`` on the node's PYTHONPATH, only in these tests) gives the
  Noop engine Bacalhau's ``JobHandler`` seam from outside: it appends the execution ID to
  a runs log (so "nothing ran twice" is witnessed outside the node) and sleeps when the
  job ID carries ``-d<ms>ms`` (so executions can be caught Running).
- ``Load``: a requester placing Noop jobs (ask → accept), accepting results, and at the
  end settling every execution to a terminal state.
- ``Snapshot``/``check_invariants``: the node's SQLite store opened read-only, the
  callback stream read back, and the §5/§6 invariants checked over both.

Every wait polls a condition with a deadline; the only sleeps are the nemesis' random
fault moments and the load generator's back-off. Random schedules print their seed;
``RELIABILITY_SEED=<n>`` replays one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError as JsNotFoundError

from schemas.codec import decode
from schemas.compute import ExecutionState
from schemas.job import Engine, Job, Metadata, ResourcesConfig, Spec
from tests.natsproc import NatsServer
from worker.requester import Requester, RequestFailed

REPO = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, "-m", "worker", "serve"]
TERMINAL = {"Completed", "Failed", "Cancelled"}
KIND_OF_STATE = {
    "Completed": "OnPublishComplete",
    "Failed": "OnComputeFailure",
    "Cancelled": "OnCancelComplete",
}
REQUEST_ERRORS = (NoRespondersError, NatsTimeoutError, TimeoutError, NatsError, RequestFailed)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long fault-injection runs (deselect: -m 'not soak')")


# --- waiting without sleeping blindly --------------------------------------------------------


async def wait_for(
    check: Callable[[], Awaitable[Any] | Any],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s") from last
        await asyncio.sleep(interval)


# --- the broker ------------------------------------------------------------------------------


class Broker(NatsServer):
    """tests.natsproc.NatsServer plus kill -9 and a restart on the same port and store."""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> str:
        """Start again on the same port with the same JetStream store dir."""
        assert self.proc is None, "stop or kill the broker first"
        deadline = time.monotonic() + 10
        while True:  # the port may linger for a moment after a kill
            try:
                return self.start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    server = Broker(tmp_path / "broker")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


async def connect(url: str) -> Client:
    return await nats.connect(
        url,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        connect_timeout=2,
        allow_reconnect=True,
    )


@pytest.fixture
async def client(broker: Broker) -> AsyncIterator[Client]:
    nc = await connect(broker.url)
    yield nc
    await nc.close()


# --- the node as a process -------------------------------------------------------------------

HOOK = r'''
"""Test-only hook of the reliability suite: Bacalhau's noop JobHandler, from outside."""
import os

if os.environ.get("RELIABILITY_HOOK") == "1":
    import asyncio
    import re

    from worker.engines import noop as _noop

    _RUNS = os.environ.get("RELIABILITY_RUNS_LOG", "")
    _DELAY = re.compile(r"-d(\d+)ms")
    _init = _noop.NoopEngine.__init__

    async def _handler(execution, results_dir):
        if _RUNS:
            fd = os.open(_RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (execution.id + "\n").encode())
            finally:
                os.close(fd)
        found = _DELAY.search(execution.job.Metadata.ID)
        if found:
            await asyncio.sleep(int(found.group(1)) / 1000)

    def _patched(self, *, handler=None):
        _init(self, handler=handler or _handler)

    _noop.NoopEngine.__init__ = _patched

    # RELIABILITY_READY_PAUSE_MS: the process sleeps right after writing its NODE_ID= line,
    # so a signal sent as soon as the line is read lands while the node is still there.
    _PAUSE = int(os.environ.get("RELIABILITY_READY_PAUSE_MS", "0")) / 1000
    if _PAUSE:
        import sys
        import time

        class _PausingStdout:
            def __init__(self, out):
                self._out = out

            def write(self, text):
                written = self._out.write(text)
                if text.startswith("NODE_ID="):
                    self._out.flush()
                    time.sleep(_PAUSE)
                return written

            def __getattr__(self, name):
                return getattr(self._out, name)

        sys.stdout = _PausingStdout(sys.stdout)

    # RELIABILITY_START_PAUSE_MS: Node.start touches RELIABILITY_START_MARK, then sleeps
    # before it starts, so a test can signal a node that is still coming up.
    _START_PAUSE = int(os.environ.get("RELIABILITY_START_PAUSE_MS", "0")) / 1000
    if _START_PAUSE:
        from worker import node as _node

        _start = _node.Node.start

        async def _paused_start(self, *args, **kwargs):
            with open(os.environ["RELIABILITY_START_MARK"], "w"):
                pass
            await asyncio.sleep(_START_PAUSE)
            return await _start(self, *args, **kwargs)

        _node.Node.start = _paused_start
'''


@dataclass
class NodeProc:
    """One node data dir, run as ``python -m worker serve`` (started again after a kill)."""

    workdir: Path
    data_dir: Path
    nats_url: str
    prefix: str
    requested_id: str = ""  # passed as --node-id; "" = let the node choose/persist one
    node_id: str = ""  # the ID the node printed last
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    returncodes: list[int] = field(default_factory=list)

    @property
    def runs_log(self) -> Path:
        return self.workdir / "runs.log"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "worker.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _log_path(self, n: int) -> Path:
        return self.workdir / f"node-{n}.stderr"

    def log(self) -> str:
        """Everything the node wrote to stderr, over all its starts."""
        parts = []
        for n in range(1, self.starts + 1):
            with contextlib.suppress(FileNotFoundError):
                parts.append(self._log_path(n).read_text(errors="replace"))
        return "".join(parts)

    def current_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self._log_path(self.starts).read_text(errors="replace")
        return ""

    async def spawn(self, *extra: str, nats_url: str | None = None) -> asyncio.subprocess.Process:
        """Start the process without waiting for it (see ``start``)."""
        assert not self.alive, "node already running"
        self.starts += 1
        hook_dir = self.workdir / "hook"
        hook_dir.mkdir(parents=True, exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        pythonpath = os.pathsep.join(
            p for p in (str(hook_dir), str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "RELIABILITY_HOOK": "1",
            "RELIABILITY_RUNS_LOG": str(self.runs_log),
            **self.env,
        }
        args = [
            "--data-dir",
            str(self.data_dir),
            "--nats-url",
            nats_url or self.nats_url,
            "--subject-prefix",
            self.prefix,
            "--limit-total-cpu",
            "2",
            "--limit-total-memory",
            "4Gi",
            "--limit-total-disk",
            "1Gi",
            *(["--node-id", self.requested_id] if self.requested_id else []),
            *self.args,
            *extra,
        ]
        with self._log_path(self.starts).open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *WORKER,
                *args,
                stdin=subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=self.workdir,
                env=env,
            )
        return self.proc

    async def start(self, *extra: str, timeout: float = 30, nats_url: str | None = None) -> str:
        """Start and wait for ``NODE_ID=``: the node has subscribed and published NodeInfo."""
        proc = await self.spawn(*extra, nats_url=nats_url)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"node not ready in {timeout}s:\n{self.current_log()}") from None
        text = line.decode().strip()
        if not text.startswith("NODE_ID="):
            code = await asyncio.wait_for(proc.wait(), 10)
            raise AssertionError(f"node did not start (exit {code}):\n{self.current_log()}")
        node_id = text.split("=", 1)[1]
        if self.requested_id:
            assert node_id == self.requested_id, (node_id, self.requested_id)
        self.node_id = node_id
        return node_id

    async def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.returncodes.append(await asyncio.wait_for(self.proc.wait(), 10))

    async def sigterm(self, timeout: float = 60) -> int:
        """SIGTERM (drain) and wait for the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        self.returncodes.append(code)
        return code

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        self.returncodes.append(code)
        return code

    def runs(self) -> list[str]:
        try:
            return self.runs_log.read_text().split()
        except FileNotFoundError:
            return []


NodeFactory = Callable[..., NodeProc]


@pytest.fixture
async def make_node(tmp_path: Path, broker: Broker, prefix: str) -> AsyncIterator[NodeFactory]:
    """Node processes of this test; any still running at the end is killed."""
    nodes: list[NodeProc] = []

    def factory(
        name: str = "n1",
        *,
        node_id: str | None = None,
        data_dir: Path | None = None,
        nats_url: str | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> NodeProc:
        workdir = tmp_path / f"proc-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        node = NodeProc(
            workdir=workdir,
            data_dir=data_dir or tmp_path / f"data-{name}",
            nats_url=nats_url or broker.url,
            prefix=prefix,
            requested_id=name if node_id is None else node_id,
            node_id=name if node_id is None else node_id,
            args=list(args or []),
            env=dict(env or {}),
        )
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        if node.alive:
            await node.kill9()


# --- the store, read from outside ------------------------------------------------------------


def open_ro(db_path: Path) -> sqlite3.Connection:
    """The node's store, read-only (never creates or changes anything)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    conn.execute("PRAGMA query_only = ON")
    return conn


def integrity(db_path: Path) -> str:
    with contextlib.closing(open_ro(db_path)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def count_executions(db_path: Path) -> int:
    with contextlib.closing(open_ro(db_path)) as conn:
        return int(conn.execute("SELECT count(*) FROM executions").fetchone()[0])


@dataclass
class OutboxRec:
    seq: int
    kind: str
    subject: str
    body: bytes
    headers: dict[str, str]
    delivered: bool
    parked: bool
    attempts: int


@dataclass
class HistRec:
    previous: str
    new: str
    cause: str
    comment: str
    time_us: int


@dataclass
class ExecRec:
    id: str
    job_id: str
    requester: str
    state: str
    last_cause: str
    deadline_us: int | None
    history: list[HistRec] = field(default_factory=list)
    outbox: list[OutboxRec] = field(default_factory=list)

    @property
    def reached_accept(self) -> bool:
        return any(h.new == "BidAccepted" for h in self.history)

    def causes(self) -> list[str]:
        return [h.cause for h in self.history]


Snapshot = dict[str, ExecRec]


def snapshot(db_path: Path) -> Snapshot:
    """Every execution with its history and outbox, read in one read transaction."""
    with contextlib.closing(open_ro(db_path)) as conn:
        conn.execute("BEGIN")
        execs: Snapshot = {}
        for row in conn.execute(
            "SELECT id, job_id, requester, state, last_cause, deadline_us FROM executions"
            " ORDER BY ord"
        ):
            execs[row[0]] = ExecRec(*row)
        for row in conn.execute(
            "SELECT e.id, h.previous_state, h.new_state, h.cause, h.comment, h.time_us"
            " FROM history AS h JOIN executions AS e ON e.ord = h.execution_ord"
            " ORDER BY h.execution_ord, h.new_version"
        ):
            if row[0] in execs:
                execs[row[0]].history.append(HistRec(*row[1:]))
        for row in conn.execute(
            "SELECT execution_id, seq, kind, subject, body, headers, delivered, parked, attempts"
            " FROM outbox ORDER BY execution_id, seq"
        ):
            if row[0] in execs:
                execs[row[0]].outbox.append(
                    OutboxRec(
                        seq=row[1],
                        kind=row[2],
                        subject=row[3],
                        body=bytes(row[4]),
                        headers=json.loads(row[5]),
                        delivered=bool(row[6]),
                        parked=bool(row[7]),
                        attempts=row[8],
                    )
                )
        conn.execute("COMMIT")
    return execs


# --- the callback stream, read back ----------------------------------------------------------


@dataclass
class StreamMsg:
    stream_seq: int
    subject: str
    headers: dict[str, str]
    data: bytes

    @property
    def msg_id(self) -> str:
        return self.headers.get("Nats-Msg-Id", "")

    @property
    def body(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value

    @property
    def kind(self) -> str:
        return self.subject.rsplit(".", 1)[-1].removesuffix("/v1")


def stream_name(prefix: str) -> str:
    return "CALLBACKS_" + prefix.replace(".", "_")


async def read_stream(nc: Client, prefix: str) -> list[StreamMsg]:
    """Every message the callback stream holds, in stream order."""
    js = nc.jetstream(timeout=5)
    try:
        info = await js.stream_info(stream_name(prefix))
    except JsNotFoundError:
        return []
    out: list[StreamMsg] = []
    if not info.state.messages:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await js.get_msg(stream_name(prefix), seq)
        except JsNotFoundError:
            continue
        out.append(StreamMsg(seq, raw.subject or "", dict(raw.headers or {}), raw.data or b""))
    return out


class Tap:
    """A core subscription on every callback subject: sees each publish, re-sends too."""

    def __init__(self) -> None:
        self.bodies: dict[str, set[bytes]] = defaultdict(set)
        self.count = 0
        self._sub: Any = None

    async def start(self, nc: Client, prefix: str) -> None:
        async def on(msg: Msg) -> None:
            self.count += 1
            self.bodies[(msg.headers or {}).get("Nats-Msg-Id", "")].add(msg.data)

        self._sub = await nc.subscribe(f"{prefix}.orchestrator.>", cb=on)
        await nc.flush()

    def conflicts(self) -> dict[str, set[bytes]]:
        return {k: v for k, v in self.bodies.items() if len(v) > 1}


# --- invariants ------------------------------------------------------------------------------


def check_invariants(
    snap: Snapshot,
    stream: list[StreamMsg],
    *,
    node_id: str,
    runs: list[str],
    tap: Tap | None = None,
    require_terminal: bool = True,
) -> None:
    """PROTOCOL.md §5 and §6 over the node's store and the callback stream.

    - every execution that reached BidAccepted ends with exactly one of PublishResult,
      ComputeError or CancelResult (unless ResultRejected ended it), a RunResult may
      precede it, nothing follows it; one that never reached BidAccepted has none;
    - the terminal callback matches the final state (and ComputeError's Cause the cause);
    - Seq runs 1..n per execution; the stream holds each exactly once, in Seq order,
      byte-identical to the outbox row, under ``Nats-Msg-Id = <id>:<seq>``;
    - no publish seen on the wire differs from another one with the same Nats-Msg-Id;
    - nothing ran twice (history and the runs log).
    """
    problems: list[str] = []
    by_exec: dict[str, list[StreamMsg]] = defaultdict(list)
    for msg in stream:
        eid = msg.msg_id.rsplit(":", 1)[0]
        by_exec[eid].append(msg)
        if eid not in snap:
            problems.append(f"stream holds a callback of unknown execution {msg.msg_id}")
    run_counts: dict[str, int] = defaultdict(int)
    for eid in runs:
        run_counts[eid] += 1
    for eid, n in run_counts.items():
        if n > 1:
            problems.append(f"{eid} ran {n} times")
    for eid, ex in snap.items():
        problems.extend(_check_execution(ex, by_exec.get(eid, []), node_id, require_terminal))
    if tap is not None:
        for msg_id, bodies in tap.conflicts().items():
            problems.append(f"{msg_id} published with {len(bodies)} different bodies")
    assert not problems, "invariant violations:\n  " + "\n  ".join(problems[:50])


def _check_execution(
    ex: ExecRec, msgs: list[StreamMsg], node_id: str, require_terminal: bool
) -> list[str]:
    p: list[str] = []
    eid = ex.id
    if require_terminal and ex.state not in TERMINAL:
        p.append(f"{eid} not terminal: {ex.state} ({ex.causes()})")
    if ex.causes().count("RunStarted") > 1:
        p.append(f"{eid} started twice: {ex.causes()}")
    seqs = [r.seq for r in ex.outbox]
    if seqs != list(range(1, len(seqs) + 1)):
        p.append(f"{eid} outbox Seq not 1..n: {seqs}")
    kinds = [r.kind for r in ex.outbox]
    if not ex.reached_accept:
        if kinds:
            p.append(f"{eid} never accepted but has callbacks {kinds}")
    elif ex.state in TERMINAL:
        p.extend(_check_ending(ex, kinds))
    p.extend(_check_stream(ex, msgs, node_id, require_terminal))
    return p


def _check_stream(
    ex: ExecRec, msgs: list[StreamMsg], node_id: str, require_terminal: bool
) -> list[str]:
    """The stream's copy of one execution's callbacks against its outbox."""
    p: list[str] = []
    eid = ex.id
    stream_seqs = [int(m.msg_id.rsplit(":", 1)[1]) for m in msgs]
    if stream_seqs != sorted(stream_seqs):
        p.append(f"{eid} callbacks out of order in the stream: {stream_seqs}")
    if len(set(stream_seqs)) != len(stream_seqs):
        p.append(f"{eid} callback stored twice in the stream: {stream_seqs}")
    rows = {r.seq: r for r in ex.outbox}
    for m in msgs:
        seq = int(m.msg_id.rsplit(":", 1)[1])
        row = rows.get(seq)
        if row is None:
            p.append(f"{eid} stream holds Seq {seq} the outbox does not")
            continue
        if m.data != row.body or m.subject != row.subject:
            p.append(f"{eid}:{seq} differs between the stream and the outbox")
        body = m.body
        if body.get("ExecutionID") != eid or body.get("Seq") != seq:
            p.append(f"{eid}:{seq} body names {body.get('ExecutionID')}:{body.get('Seq')}")
        if body.get("SourcePeerID") != node_id:
            p.append(f"{eid}:{seq} SourcePeerID {body.get('SourcePeerID')} != {node_id}")
    if require_terminal:
        missing = sorted(set(rows) - set(stream_seqs))
        if missing:
            p.append(f"{eid} callbacks {missing} never reached the stream")
        undelivered = [r.seq for r in ex.outbox if not r.delivered]
        if undelivered:
            p.append(f"{eid} outbox rows {undelivered} still undelivered")
    return p


def _check_ending(ex: ExecRec, kinds: list[str]) -> list[str]:
    p: list[str] = []
    eid = ex.id
    body_kinds = [k for k in kinds if k != "OnRunComplete"]
    if kinds.count("OnRunComplete") > 1:
        p.append(f"{eid} has {kinds.count('OnRunComplete')} RunResults")
    if kinds and kinds[0] != "OnRunComplete" and "OnRunComplete" in kinds:
        p.append(f"{eid} RunResult is not first: {kinds}")
    if ex.last_cause == "ResultRejected":
        if body_kinds:
            p.append(f"{eid} ended by ResultRejected but has {body_kinds}")
        return p
    if len(body_kinds) != 1:
        p.append(f"{eid} ({ex.state}, {ex.last_cause}) has terminal callbacks {kinds}")
        return p
    if kinds[-1] != body_kinds[0]:
        p.append(f"{eid} something follows the terminal callback: {kinds}")
    if KIND_OF_STATE[ex.state] != body_kinds[0]:
        p.append(f"{eid} ended {ex.state} but its terminal callback is {body_kinds[0]}")
    if body_kinds[0] == "OnComputeFailure":
        err = json.loads(ex.outbox[-1].body)
        if err.get("Cause") != ex.last_cause:
            p.append(f"{eid} ComputeError Cause {err.get('Cause')} != {ex.last_cause}")
    return p


async def check_requester_view(r: Requester, snap: Snapshot, timeout: float = 15) -> None:
    """What a JetStream-mode requester got (deduplicated by Nats-Msg-Id): per execution,
    every callback of the outbox, once, in Seq order, with the same content."""

    def problems() -> list[str]:
        found: list[str] = []
        for eid, ex in snap.items():
            if ex.requester != r.requester_id:
                continue
            got = r.callbacks(eid)
            seqs = [cb.Seq for cb in got]
            rows = {row.seq: row for row in ex.outbox}
            if seqs != sorted(rows):
                found.append(f"{eid}: requester got Seq {seqs}, the outbox has {sorted(rows)}")
                continue
            for cb in got:
                if decode(rows[cb.Seq].body, type(cb)) != cb:
                    found.append(f"{eid}:{cb.Seq} differs from the outbox row")
        return found

    started = time.monotonic()
    with contextlib.suppress(AssertionError):
        await wait_for(lambda: not problems(), timeout=timeout, what="requester caught up")
    print(f"requester view complete after {time.monotonic() - started:.2f}s")
    left = problems()
    assert not left, "requester view:\n  " + "\n  ".join(left[:30])


def leftover_processes(marker: str) -> list[str]:
    """Processes (other than this one) whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


async def final_checks(
    node: NodeProc,
    nc: Client,
    *,
    tap: Tap | None = None,
    require_terminal: bool = True,
) -> Snapshot:
    """Integrity, the invariants, no leftover job processes (node already stopped)."""
    assert not node.alive
    assert integrity(node.db_path) == "ok"
    snap = snapshot(node.db_path)
    stream = await read_stream(nc, node.prefix)
    check_invariants(
        snap,
        stream,
        node_id=node.node_id,
        runs=node.runs(),
        tap=tap,
        require_terminal=require_terminal,
    )
    assert leftover_processes(str(node.data_dir)) == []
    return snap


# --- load ------------------------------------------------------------------------------------


def make_job(tag: str = "j", *, delay_ms: int = 0, cpu: str = "100m", timeout: float = 0) -> Job:
    job_id = f"{tag}-{uuid.uuid4().hex[:12]}" + (f"-d{delay_ms}ms" if delay_ms else "")
    return Job(
        Metadata=Metadata(ID=job_id),
        Spec=Spec(Engine=Engine.NOOP, Resources=ResourcesConfig(CPU=cpu), Timeout=timeout),
    )


@dataclass
class LoadStats:
    asks: int = 0
    bids: int = 0
    declines: int = 0
    accepts: int = 0
    errors: int = 0
    results_accepted: int = 0
    decline_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Load:
    """A requester placing Noop jobs on one node (ask → accept) and accepting results.

    Tolerates the node being away (kill, drain, partition): a failed request is counted
    and retried with the next job. ``max_jobs`` and the caller's stop event bound it.
    """

    def __init__(
        self,
        requester: Requester,
        node_id: str,
        *,
        concurrency: int = 3,
        max_jobs: int = 2000,
        slow_every: int = 0,
        slow_ms: int = 0,
        timeout: float = 1.0,
        reject_every: int = 0,
    ) -> None:
        self.r = requester
        self.node_id = node_id
        self.concurrency = concurrency
        self.max_jobs = max_jobs
        self.slow_every = slow_every
        self.slow_ms = slow_ms
        self.timeout = timeout
        self.reject_every = reject_every  # ResultRejected for about 1 in N results
        self.stats = LoadStats()
        self.executions: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._n = 0

    def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._place()) for _ in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._accept_results()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _place(self) -> None:
        while not self._stop.is_set() and self._n < self.max_jobs:
            self._n += 1
            slow = self.slow_every and self._n % self.slow_every == 0
            job = make_job("load", delay_ms=self.slow_ms if slow else 0)
            self.stats.asks += 1
            try:
                bid = await self.r.ask(self.node_id, job, timeout=self.timeout)
            except REQUEST_ERRORS:
                self.stats.errors += 1
                await self._pause(0.05)  # the node is away: do not spin
                continue
            if not bid.Accepted:
                self.stats.declines += 1
                self.stats.decline_reasons[bid.Reason] += 1
                await self._pause(0.02)
                continue
            self.stats.bids += 1
            self.executions.add(bid.ExecutionID)
            try:
                await self.r.accept(self.node_id, bid.ExecutionID)
                self.stats.accepts += 1
            except REQUEST_ERRORS:
                self.stats.errors += 1  # settled later: cancel or accept, as its state says

    async def _accept_results(self) -> None:
        while not self._stop.is_set():
            await self.accept_waiting()
            await self._pause(0.2)

    async def states(self) -> dict[str, ExecutionState]:
        return await self.r.reconcile(self.node_id)

    async def accept_waiting(self) -> None:
        try:
            waiting = [
                e.ExecutionID
                async for e in self.r.list_executions(
                    self.node_id, states=[ExecutionState.WAITING_VERIFICATION]
                )
            ]
        except REQUEST_ERRORS:
            return
        for eid in waiting:
            with contextlib.suppress(*REQUEST_ERRORS):
                if self.reject_every and int(eid[-4:], 16) % self.reject_every == 0:
                    await self.r.reject_result(self.node_id, eid, "load rejects some")
                else:
                    await self.r.accept_result(self.node_id, eid)
                self.stats.results_accepted += 1

    async def settle(self, timeout: float = 60) -> dict[str, ExecutionState]:
        """Drive every execution of this requester to a terminal state (stopped load)."""

        async def done() -> dict[str, ExecutionState] | None:
            try:
                states = await self.states()
            except REQUEST_ERRORS:
                return None
            for eid, state in states.items():
                with contextlib.suppress(*REQUEST_ERRORS):
                    if state is ExecutionState.CREATED:
                        await self.r.reject(self.node_id, eid, "settling")
                    elif state is ExecutionState.WAITING_VERIFICATION:
                        await self.r.accept_result(self.node_id, eid)
            if all(s.value in TERMINAL for s in states.values()):
                return states
            return None

        result: dict[str, ExecutionState] = await wait_for(
            done, timeout=timeout, interval=0.2, what="every execution terminal"
        )
        return result


@pytest.fixture
async def requester(client: Client, prefix: str) -> AsyncIterator[Requester]:
    r = Requester(nc=client, requester_id="load", prefix=prefix, timeout=5.0)
    yield r
    await r.close()


async def node_answers(nc: Client, prefix: str, node_id: str, timeout: float = 0.5) -> bool:
    """True when the node answers a NodeInfo request (any reply counts, §6)."""
    try:
        await nc.request(f"{prefix}.compute.{node_id}.probe.NodeInfo/v1", b"", timeout=timeout)
    except (NoRespondersError, NatsTimeoutError, TimeoutError, NatsError):
        return False
    return True


def rng(seed: int | None = None) -> random.Random:
    """A seeded RNG; the seed is printed so a failing random schedule can be replayed."""
    if seed is None:
        seed = int(os.environ.get("RELIABILITY_SEED", "0")) or random.SystemRandom().randrange(
            1 << 30
        )
    print(f"reliability seed: {seed}")
    return random.Random(seed)


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (needs root), unmounted and removed afterwards."""
    mount_point = Path(tempfile.mkdtemp(prefix="rel-tmpfs-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
        shutil.rmtree(mount_point, ignore_errors=True)


def fill_disk(directory: Path, name: str = "filler") -> Path:
    """Write zeros into ``directory/name`` until the filesystem is full."""
    path = directory / name
    with path.open("ab", buffering=0) as f:
        # Small writes can still fit in the last partial block: take those too.
        for size in (64 * 1024, 4096, 512, 1):
            while True:
                try:
                    f.write(b"\0" * size)
                except OSError:
                    break
    return path
