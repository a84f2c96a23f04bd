"""The process sandbox and the uid allocator, with real processes as real uids."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import assert_eventually
from worker.engines import sandbox, uids
from worker.errors import EngineError

PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "/usr/bin/python3"


def own_uid(offset: int = 0) -> int:
    """A uid of this test process's own (pytest-xdist workers get disjoint ones)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    return 450_000 + index * 10_000 + offset


UID = own_uid()


class Collect:
    """A sink keeping the stream in memory, readable while the job runs."""

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def text(self) -> str:
        return self.data.decode()

    async def pump(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.data += chunk


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def run_python(
    tmp_path: Path,
    code: str,
    *,
    uid: int = UID,
    timeout: float | None = 30,
    out: Collect | None = None,
    **fields: Any,
) -> tuple[sandbox.Exit, str, str]:
    cwd = tmp_path / f"cwd-{uid}"
    cwd.mkdir(mode=0o700, exist_ok=True)
    os.chown(cwd, uid, uid)
    out = out or Collect()
    err = Collect()
    spec = sandbox.Spec(argv=[PYTHON, "-I", "-S", "-c", code], cwd=cwd, uid=uid, gid=uid, **fields)
    ended = await sandbox.run(
        spec, out, err, config_path=tmp_path / "sandbox.json", timeout=timeout
    )
    return ended, out.text, err.text


# ---------------------------------------------------------------------------------------
# identity, environment, descriptors, limits


async def test_job_runs_as_its_uid_with_only_its_environment(tmp_path: Path) -> None:
    secret = tmp_path / "node-secret"
    secret.write_text("node credentials")
    leaked = os.open(secret, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # even an inheritable descriptor of the node
    try:
        code = """
import json, os
fds = {}
for fd in os.listdir("/proc/self/fd"):
    try:
        fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass  # the listdir's own descriptor, closed by now
status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines())
print(json.dumps({"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
    "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds, "umask": os.umask(0),
    "nnp": status["NoNewPrivs"], "pgid": os.getpgid(0) == os.getpid(),
    "session": os.getsid(0) != os.getpid()}))
"""
        ended, out, err = await run_python(tmp_path, code, env={"LANG": "C.UTF-8"})
    finally:
        os.close(leaked)
    assert (ended.exit_code, ended.signal, err) == (0, None, "")
    seen = json.loads(out)
    assert seen["ids"] == [UID, UID, UID, []]
    assert seen["cwd"] == str(tmp_path / f"cwd-{UID}")
    assert seen["env"] == {"LANG": "C.UTF-8"}
    assert not any("node-secret" in target for target in seen["fds"].values())
    assert set(seen["fds"]) <= {"0", "1", "2", "3"}  # 3: the listdir itself
    assert seen["umask"] == 0o077 and seen["nnp"] == "1"
    assert seen["pgid"] and seen["session"]  # own group, inside the supervisor's session
    assert ended.cpu_seconds > 0 and ended.max_rss_bytes > 1 << 20 and ended.wall_seconds > 0


async def test_rlimits_are_those_asked_for(tmp_path: Path) -> None:
    limits = sandbox.Limits(
        address_space=300 << 20, cpu_seconds=7, file_size=12345, open_files=77, processes=33
    )
    code = """
import json, resource as r
names = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE"]
print(json.dumps({n: r.getrlimit(getattr(r, n)) for n in names}))
"""
    _, out, _ = await run_python(tmp_path, code, limits=limits)
    assert json.loads(out) == {
        "RLIMIT_AS": [300 << 20, 300 << 20],
        "RLIMIT_CPU": [7, 8],
        "RLIMIT_FSIZE": [12345, 12345],
        "RLIMIT_NOFILE": [77, 77],
        "RLIMIT_NPROC": [33, 33],
        "RLIMIT_CORE": [0, 0],
    }
    unlimited = dict((r[0], r[1:]) for r in sandbox.Limits().rlimits())
    assert unlimited[resource.RLIMIT_AS] == (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


async def test_file_size_limit_refuses_a_bigger_file(tmp_path: Path) -> None:
    code = "with open('big', 'wb') as f: f.write(b'x' * 5000)"
    ended, _, err = await run_python(tmp_path, code, limits=sandbox.Limits(file_size=4096))
    assert ended.exit_code == 1 and "File too large" in err


async def test_stdin_is_the_given_file_or_nothing(tmp_path: Path) -> None:
    given = tmp_path / "stdin"
    given.write_text("from the node")
    _, out, _ = await run_python(tmp_path, "import sys; print(sys.stdin.read())", stdin=given)
    assert out == "from the node\n"
    _, out, _ = await run_python(tmp_path, "import sys; print(repr(sys.stdin.read()))")
    assert out == "''\n"


async def test_exit_status_and_signal(tmp_path: Path) -> None:
    ended, _, _ = await run_python(tmp_path, "raise SystemExit(7)")
    assert (ended.exit_code, ended.signal) == (7, None)
    ended, _, _ = await run_python(tmp_path, "import os, signal; os.kill(os.getpid(), 9)")
    assert (ended.exit_code, ended.signal) == (128 + 9, signal.SIGKILL)


async def test_a_program_that_cannot_start_is_an_engine_error(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    spec = sandbox.Spec(argv=["/nonexistent/python"], cwd=cwd, uid=UID, gid=UID)
    sink = Collect()
    with pytest.raises(EngineError, match="could not start the job: /nonexistent/python"):
        await sandbox.run(spec, sink, sink, config_path=tmp_path / "c.json")


# ---------------------------------------------------------------------------------------
# everything of the job dies, and is reaped


GRANDCHILD = """
import os, signal
if os.fork() == 0:
    os.setsid()  # leaves the job's process group and session
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(os.getpid(), flush=True)
        signal.pause()
    os._exit(0)
"""


async def test_a_setsid_grandchild_dies_and_is_reaped_when_the_job_ends(tmp_path: Path) -> None:
    code = GRANDCHILD + "\nos.wait()\nimport time\ntime.sleep(0.2)\n"
    ended, out, _ = await run_python(tmp_path, code)
    assert ended.exit_code == 0
    pid = int(out.split()[0])
    # Gone entirely, not even a zombie: the supervisor (a subreaper) reaped it.
    assert not Path(f"/proc/{pid}").exists()
    assert uids.live_processes(UID) == []


async def test_cancel_kills_every_process_promptly(tmp_path: Path) -> None:
    code = (
        GRANDCHILD
        + """
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    print(os.getpid(), flush=True)
    while True: pass
print(os.getpid(), flush=True)
while True: pass
"""
    )
    out = Collect()
    task = asyncio.ensure_future(run_python(tmp_path, code, timeout=None, out=out))
    await assert_eventually(lambda: len(out.text.split()) == 3, timeout=10)
    pids = [int(p) for p in out.text.split()]
    assert all(alive(pid) for pid in pids)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert uids.live_processes(UID) == []


async def test_timeout_raises_and_kills(tmp_path: Path) -> None:
    started = time.monotonic()
    out = Collect()
    with pytest.raises(TimeoutError):
        code = "print('before', flush=True)\nwhile True: pass"
        await run_python(tmp_path, code, timeout=1, out=out)
    assert 1 <= time.monotonic() - started < 8
    assert out.text == "before\n"  # what came before the kill is kept
    assert uids.live_processes(UID) == []


async def test_nproc_stops_forks_of_the_uid(tmp_path: Path) -> None:
    code = """
import os, signal
n = 0
try:
    while True:
        if os.fork() == 0:
            signal.pause()
        n += 1
except OSError as exc:
    print(n, exc.errno)
"""
    ended, out, _ = await run_python(tmp_path, code, limits=sandbox.Limits(processes=20))
    forked, errno_ = map(int, out.split())
    assert ended.exit_code == 0 and forked < 20 and errno_ == 11  # EAGAIN
    assert uids.live_processes(UID) == []


# ---------------------------------------------------------------------------------------
# network


@pytest.mark.parametrize("isolate", [True, False])
async def test_network_namespace(tmp_path: Path, isolate: bool) -> None:
    connected: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.append(1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    code = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
    print("connected")
except OSError as exc:
    print(exc)
"""
    async with server:
        _, out, _ = await run_python(tmp_path, code, isolate_network=isolate)
        if not isolate:
            await assert_eventually(lambda: connected)
    if isolate:
        assert out == "[Errno 101] Network is unreachable\n" and connected == []
    else:
        assert out == "connected\n"


# ---------------------------------------------------------------------------------------
# kill_uid, and the uid allocator


def sleeper(uid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-I", "-S", "-c", "import signal; signal.pause()"],
        user=uid,
        group=uid,
        extra_groups=[],
        start_new_session=True,
        cwd="/",
    )


async def test_kill_uid_kills_every_process_of_the_uid_only(tmp_path: Path) -> None:
    theirs, other = sleeper(UID + 1), sleeper(UID + 2)
    try:
        await assert_eventually(lambda: uids.live_processes(UID + 1) == [theirs.pid])
        sandbox.kill_uid(UID + 1)
        assert theirs.wait(10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(10)


async def test_clear_kills_leftovers_and_removes_their_temp_files() -> None:
    proc = sleeper(UID + 3)
    leftover = Path("/tmp") / f"leftover-{UID + 3}-{os.getpid()}"
    leftover.mkdir()
    (leftover / "data").write_text("of an earlier job")
    os.chown(leftover, UID + 3, UID + 3)
    mine = Path("/tmp") / f"not-the-job-{os.getpid()}"
    mine.write_text("root's")
    try:
        assert await asyncio.to_thread(uids.clear, UID + 3)
        assert proc.wait(10) == -signal.SIGKILL
        assert not leftover.exists() and mine.exists()
    finally:
        mine.unlink()
        shutil.rmtree(leftover, ignore_errors=True)


def test_remove_files_of_only_touches_the_uid_and_follows_no_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "theirs").write_text("x")
    os.chown(folder / "theirs", UID, UID)
    os.symlink(victim, folder / "link")
    os.lchown(folder / "link", UID, UID)
    (folder / "root").write_text("x")
    removed = uids.remove_files_of(UID, [folder, tmp_path / "missing"])
    assert sorted(p.name for p in removed) == ["link", "theirs"]
    assert sorted(os.listdir(folder)) == ["root"] and (victim / "keep").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("200000-265535", (200000, 265535)), (" 5000-5000 ", (5000, 5000))],
)
def test_uid_range_parse(text: str, expected: tuple[int, int]) -> None:
    parsed = uids.UidRange.parse(text)
    assert (parsed.first, parsed.last) == expected
    assert len(parsed) == expected[1] - expected[0] + 1 and str(parsed) == text.strip()


@pytest.mark.parametrize("text", ["", "5000", "a-b", "6000-5000", "0-100", "999-2000", "1-2-3"])
def test_uid_range_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid uid range"):
        uids.UidRange.parse(text)


def test_allocator_never_hands_out_a_uid_twice() -> None:
    first = own_uid(100)
    one = uids.UidAllocator(uids.UidRange(first, first + 3))
    other = uids.UidAllocator(uids.UidRange(first, first + 3))  # another node, same range
    got = [one.acquire(), other.acquire(), one.acquire(), other.acquire()]
    assert sorted(got) == list(range(first, first + 4))
    with pytest.raises(EngineError, match=f"no free job uid in range {first}-{first + 3}"):
        one.acquire()
    other.release(got[0])  # not its own: ignored
    with pytest.raises(EngineError):
        other.acquire()
    one.release(got[0])
    assert other.acquire() == got[0]
    for uid in got:
        one.release(uid)
        other.release(uid)
    assert one.leased == other.leased == frozenset()
    with one.lease() as uid:
        assert one.leased == {uid}
    assert one.leased == frozenset()


def test_allocator_goes_round_and_skips_host_accounts() -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    allocator = uids.UidAllocator(uids.UidRange(nobody - 1, nobody + 1))
    a = allocator.acquire()
    b = allocator.acquire()
    assert (a, b) == (nobody - 1, nobody + 1)
    allocator.release(a)
    allocator.release(b)
    assert allocator.acquire() == nobody - 1  # round again, least recently used first
    allocator.release(nobody - 1)
