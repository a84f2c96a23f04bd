"""URLDownload against a real HTTP server on 127.0.0.1: downloads, and every refusal."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from schemas.job import StorageSource, StorageSpec
from tests.helpers import LoopbackHTTPServer
from worker.errors import EngineError
from worker.storage.url import AddressPolicy, GuardedResolver, RefusedAddress, URLDownload

LOOPBACK = ["127.0.0.1/32"]


class Server(LoopbackHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.paths: list[str] = []
        self.release = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        if "Content_Length" not in headers and body is not None:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/":
            self._send(200, b"index")
        elif url.path == "/data/file.txt":
            self._send(200, b"hello url")
        elif url.path == "/redirect":
            self._send(302, Location=query["to"][0])
        elif url.path == "/loop":
            self._send(302, Location="/loop")
        elif url.path == "/big":
            self._send(200, bytes(100_000))
        elif url.path == "/big-unknown-length":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes
            for _ in range(100):
                self.wfile.write(bytes(1000))
        elif url.path == "/hang":
            self.server.release.wait(10)
        else:
            self._send(404, b"missing")


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def spec(url: str, name: str = "") -> StorageSpec:
    return StorageSpec(StorageSource=StorageSource.URL_DOWNLOAD, URL=url, Name=name)


async def test_download_from_an_allowed_address(server: Server, tmp_path: Path) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK)
    path = await provider.prepare(spec(f"{server.base}/data/file.txt"), tmp_path, requester="r")
    assert path == tmp_path / "file.txt"
    assert path.read_bytes() == b"hello url"
    assert server.paths == ["/data/file.txt"]


async def test_download_by_host_name_and_spec_name(server: Server, tmp_path: Path) -> None:
    """``localhost`` goes through the guarded resolver; the spec's Name wins."""
    url = f"http://localhost:{server.server_address[1]}/data/file.txt"
    path = await URLDownload(allow_cidr=LOOPBACK).prepare(
        spec(url, "in.txt"), tmp_path, requester="r"
    )
    assert path == tmp_path / "in.txt"
    assert path.read_bytes() == b"hello url"


async def test_loopback_refused_without_allow(server: Server, tmp_path: Path) -> None:
    provider = URLDownload()
    with pytest.raises(EngineError, match=r"refused: address 127\.0\.0\.1 is loopback"):
        await provider.prepare(spec(f"{server.base}/data/file.txt"), tmp_path, requester="r")
    localhost = f"http://localhost:{server.server_address[1]}/data/file.txt"
    with pytest.raises(EngineError, match=r"refused: localhost: address .* is loopback"):
        await provider.prepare(spec(localhost), tmp_path, requester="r")
    assert server.paths == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("host", "category"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "not public"),
        ("240.0.0.1", "private"),
        ("[::1]", "loopback"),
        ("[::]", "unspecified"),
        ("[fe80::1]", "link-local"),
        ("[fd00::1]", "private"),
        ("[ff02::1]", "multicast"),
        ("[::ffff:127.0.0.2]", "loopback"),  # 127.0.0.1/32 does not cover it
        ("[::ffff:10.0.0.1]", "private"),
        ("[::ffff:169.254.169.254]", "link-local"),
        ("[2002:7f00:1::]", "loopback"),  # 6to4 around 127.0.0.1
        ("[64:ff9b::a9fe:a9fe]", "link-local"),  # NAT64 around 169.254.169.254
    ],
)
async def test_refused_literals(tmp_path: Path, host: str, category: str) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK, connect_timeout=1)
    with pytest.raises(EngineError, match=f"refused: address .* is {category}"):
        await provider.prepare(spec(f"http://{host}:9/x"), tmp_path, requester="r")


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.0.0.1", "017700000001"])
async def test_numeric_host_forms_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(EngineError, match="not a canonical IP address"):
        await URLDownload().prepare(spec(f"http://{host}/x"), tmp_path, requester="r")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://x/"])
async def test_only_http(tmp_path: Path, url: str) -> None:
    with pytest.raises(EngineError, match="only http and https"):
        await URLDownload().prepare(spec(url), tmp_path, requester="r")


async def test_redirect_followed_with_checks(server: Server, tmp_path: Path) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK)
    url = f"{server.base}/redirect?to=/data/file.txt"
    path = await provider.prepare(spec(url, "f"), tmp_path, requester="r")
    assert path.read_bytes() == b"hello url"
    assert server.paths == ["/redirect?to=/data/file.txt", "/data/file.txt"]


@pytest.mark.parametrize(
    "to",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/data/file.txt",  # loopback, but only 127.0.0.1/32 is allowed
        "http://[::ffff:10.0.0.1]/",
        "file:///etc/passwd",
    ],
)
async def test_redirect_to_a_refused_address(server: Server, tmp_path: Path, to: str) -> None:
    target = to.format(port=server.server_address[1])
    with pytest.raises(EngineError, match=r"refused|only http"):
        await URLDownload(allow_cidr=LOOPBACK).prepare(
            spec(f"{server.base}/redirect?to={target}"), tmp_path, requester="r"
        )
    assert len(server.paths) == 1
    assert list(tmp_path.iterdir()) == []


async def test_redirect_loop_is_bounded(server: Server, tmp_path: Path) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK, max_redirects=3)
    with pytest.raises(EngineError, match="more than 3 redirects"):
        await provider.prepare(spec(f"{server.base}/loop"), tmp_path, requester="r")
    assert server.paths == ["/loop"] * 4


async def test_size_limit_from_content_length(server: Server, tmp_path: Path) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK, max_bytes=50_000)
    with pytest.raises(EngineError, match="larger than the limit of 50000 bytes"):
        await provider.prepare(spec(f"{server.base}/big"), tmp_path, requester="r")
    assert list(tmp_path.iterdir()) == []


async def test_size_limit_while_streaming(server: Server, tmp_path: Path) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK, max_bytes=50_000)
    with pytest.raises(EngineError, match="larger than the limit of 50000 bytes"):
        await provider.prepare(spec(f"{server.base}/big-unknown-length"), tmp_path, requester="r")
    assert list(tmp_path.iterdir()) == []
    ok = URLDownload(allow_cidr=LOOPBACK, max_bytes=100_000)
    path = await ok.prepare(spec(f"{server.base}/big-unknown-length"), tmp_path, requester="r")
    assert path.stat().st_size == 100_000


async def test_timeout(server: Server, tmp_path: Path) -> None:
    provider = URLDownload(allow_cidr=LOOPBACK, read_timeout=0.2)
    with pytest.raises(EngineError, match="timed out"):
        await provider.prepare(spec(f"{server.base}/hang"), tmp_path, requester="r")
    assert list(tmp_path.iterdir()) == []


async def test_http_error(server: Server, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="HTTP 404"):
        await URLDownload(allow_cidr=LOOPBACK).prepare(
            spec(f"{server.base}/nope"), tmp_path, requester="r"
        )


async def test_connection_refused_is_an_engine_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EngineError, match="download failed"):
        await URLDownload(allow_cidr=LOOPBACK).prepare(
            spec(f"http://127.0.0.1:{port}/x"), tmp_path, requester="r"
        )


async def test_file_name_checked(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="invalid URL input file name"):
        await URLDownload().prepare(spec("http://x/a", "a/b"), tmp_path, requester="r")


async def test_file_name_without_a_path(server: Server, tmp_path: Path) -> None:
    url = f"{server.base}/redirect?to=/data/file.txt"
    bare = await URLDownload(allow_cidr=LOOPBACK).prepare(spec(url), tmp_path, requester="r")
    assert bare == tmp_path / "redirect"  # the last segment of the URL asked for
    root = await URLDownload(allow_cidr=LOOPBACK).prepare(
        spec(f"{server.base}/"), tmp_path, requester="r"
    )
    assert root == tmp_path / "download"
    assert root.read_bytes() == b"index"


async def test_credentials_are_not_shown(tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        await URLDownload().prepare(spec("http://user:s3cret@10.0.0.1/x"), tmp_path, requester="r")
    assert "s3cret" not in str(info.value)


async def test_guarded_resolver_keeps_only_allowed_addresses() -> None:
    resolver = GuardedResolver(AddressPolicy(LOOPBACK))
    results = await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert results and {r["host"] for r in results} == {"127.0.0.1"}
    with pytest.raises(RefusedAddress, match="loopback"):
        await GuardedResolver(AddressPolicy()).resolve("localhost", 80, socket.AF_UNSPEC)
    await resolver.close()


def test_policy() -> None:
    policy = AddressPolicy(["10.1.0.0/16", "::1/128"])
    assert policy.refusal("8.8.8.8") is None
    assert policy.refusal("2606:4700::1111") is None
    assert policy.refusal("10.1.2.3") is None
    assert policy.refusal("::1") is None
    assert policy.refusal("::ffff:10.1.2.3") is None  # the mapped form of an allowed address
    assert policy.refusal("10.2.0.1") is not None
    assert policy.refusal("127.0.0.1") is not None
    provider = URLDownload()
    assert provider.name == "URLDownload" and provider.is_installed()
    assert not provider.is_local(spec("http://x/y"))
    assert provider.known_size(spec("http://x/y")) == 0
