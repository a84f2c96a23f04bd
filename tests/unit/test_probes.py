"""Job-selection probes: exec (bash) and HTTP against a real local ``http.server``."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest

from schemas.job import Engine, Job, Metadata, Spec
from tests.helpers import LoopbackHTTPServer, assert_eventually
from worker.bidding import BidDecision, BidRequest, ExecProbe, HttpProbe, make_probes
from worker.bidding.probes import ENV_NAME, probe_payload


def make_req() -> BidRequest:
    job = Job(Metadata=Metadata(ID="job-id"), Spec=Spec(Engine=Engine.NOOP))
    return BidRequest(node_id="node-id", execution_id="e-1", requester="r", job=job)


def test_payload_shape() -> None:
    data = json.loads(probe_payload(make_req()))
    assert set(data) == {"node_id", "job_id", "spec"}
    assert data["node_id"] == "node-id"
    assert data["job_id"] == "job-id"
    assert data["spec"]["Engine"] == "Noop"


# -- exec ----------------------------------------------------------------------------------


async def test_exec_exit_0_bids() -> None:
    assert await ExecProbe(command="exit 0").should_bid(make_req()) == BidDecision(True)


async def test_exec_exit_1_declines() -> None:
    decision = await ExecProbe(command="exit 1").should_bid(make_req())
    assert decision == BidDecision(False, "command `exit 1` returned non-zero exit code 1")


async def test_exec_killed_by_signal_reports_minus_one() -> None:
    decision = await ExecProbe(command="kill -9 $$").should_bid(make_req())
    assert decision.reason == "command `kill -9 $$` returned non-zero exit code -1"


async def test_exec_environment_and_stdin() -> None:
    # Only PATH and the probe data (bash itself adds PWD, SHLVL and _).
    command = (
        "extra=$(env | cut -d= -f1 | grep -v -x -E "
        f"'PATH|{ENV_NAME}|PWD|SHLVL|_' | wc -l); "
        '[ "$extra" = 0 ] || exit 3; '
        'data=$(cat); [ "$data" = "$' + ENV_NAME + '" ] || exit 4; '
        '[[ "$data" == *\'"job_id":"job-id"\'* ]] || exit 5'
    )
    decision = await ExecProbe(command=command).should_bid(make_req())
    assert decision == BidDecision(True), decision.reason


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_exec_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    command = f"sleep 60 & echo $! > {pid_file}; wait"
    decision = await ExecProbe(command=command, timeout=0.3).should_bid(make_req())
    assert decision == BidDecision(False, "probe timed out")
    pid = int(await assert_eventually(lambda: pid_file.exists() and pid_file.read_text().strip()))
    await assert_eventually(lambda: not _alive(pid), timeout=5)


def test_exec_validation() -> None:
    with pytest.raises(ValueError):
        ExecProbe(command="")
    with pytest.raises(ValueError):
        ExecProbe(command="true", timeout=0)


# -- http ----------------------------------------------------------------------------------


class ProbeServer(LoopbackHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.release = threading.Event()
        self.requests: list[dict[str, Any]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: ProbeServer
    routes: ClassVar[dict[str, tuple[int, str, bytes]]] = {
        "/500-text": (500, "text/plain", b"boom"),
        "/200-text": (200, "text/plain", b"whatever"),
        "/json-true": (
            200,
            "application/json",
            b'{"shouldBid": true, "shouldWait": false, "reason": "fine"}',
        ),
        "/json-false": (
            200,
            "application/json",
            b'{"shouldBid": false, "shouldWait": false, "reason": "too busy"}',
        ),
        "/json-false-no-reason": (200, "application/json", b'{"shouldBid": false}'),
        "/json-case": (200, "application/json", b'{"ShouldBid": false, "Reason": "caps"}'),
        "/202-wait": (202, "application/json", b'{"shouldBid": false, "shouldWait": true}'),
        "/json-charset": (200, "application/json; charset=utf-8", b'{"shouldBid": false}'),
        "/bad-json": (200, "application/json", b"{not json"),
        "/wrong-type": (200, "application/json", b'{"shouldBid": "yes"}'),
        "/404": (404, "application/json", b'{"shouldBid": true}'),
    }

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.requests.append(
            {
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "body": json.loads(body),
            }
        )
        if self.path == "/slow":
            self.server.release.wait(30)
            self._send(200, "text/plain", b"late")
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"shouldBid": fal', b'se, "reason": "chunked no"}'):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(11 * 1024 * 1024))
            self.end_headers()
        else:
            self._send(*self.routes[self.path])

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[ProbeServer]:
    srv = ProbeServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(10)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/500-text", BidDecision(False, "url `{url}` returned 500 status code")),
        ("/200-text", BidDecision(True)),
        ("/json-true", BidDecision(True)),
        ("/json-false", BidDecision(False, "too busy")),
        ("/json-false-no-reason", BidDecision(False, "url `{url}` returned shouldBid false")),
        ("/json-case", BidDecision(False, "caps")),
        ("/202-wait", BidDecision(False, "url `{url}` returned shouldBid false")),
        ("/json-charset", BidDecision(True)),  # not exactly application/json: Bacalhau bids
        ("/404", BidDecision(False, "url `{url}` returned 404 status code")),
        ("/chunked", BidDecision(False, "chunked no")),
    ],
)
async def test_http_probe(server: ProbeServer, path: str, expected: BidDecision) -> None:
    url = server.base + path
    decision = await HttpProbe(url=url).should_bid(make_req())
    assert decision == BidDecision(expected.bid, expected.reason.format(url=url))
    (request,) = server.requests
    assert request["content_type"] == "application/json"
    assert request["body"]["job_id"] == "job-id"
    assert request["body"]["node_id"] == "node-id"


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/bad-json", "invalid answer: not JSON"),
        ("/wrong-type", "invalid answer: shouldBid is not a boolean"),
        ("/huge", "response body over 10 MB"),
    ],
)
async def test_http_probe_bad_answers(server: ProbeServer, path: str, detail: str) -> None:
    url = server.base + path
    decision = await HttpProbe(url=url).should_bid(make_req())
    assert not decision.bid
    assert decision.reason.startswith(f"probe failed: url `{url}`: {detail}")


async def test_http_probe_timeout(server: ProbeServer) -> None:
    decision = await HttpProbe(url=server.base + "/slow", timeout=0.3).should_bid(make_req())
    assert decision == BidDecision(False, "probe timed out")


async def test_http_probe_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    decision = await HttpProbe(url=url).should_bid(make_req())
    assert not decision.bid
    assert decision.reason.startswith(f"probe failed: url `{url}`: ")


def test_http_validation() -> None:
    for bad in ("", "ftp://x/", "http://", "localhost:80"):
        with pytest.raises(ValueError):
            HttpProbe(url=bad)
    with pytest.raises(ValueError):
        HttpProbe(url="http://x/", timeout=-1)


def test_make_probes() -> None:
    assert make_probes() == []
    probes = make_probes(exec_command="true", http_url="http://127.0.0.1:1/p", timeout=5)
    exec_probe, http_probe = probes
    assert isinstance(exec_probe, ExecProbe) and isinstance(http_probe, HttpProbe)
    assert exec_probe.timeout == http_probe.timeout == 5


async def test_probe_env_has_path_only_from_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "x")
    decision = await ExecProbe(command='[ -z "$SECRET_TOKEN" ]').should_bid(make_req())
    assert decision.bid
    assert os.environ["SECRET_TOKEN"] == "x"
