"""Job-selection probes: an external command or HTTP endpoint decides (Bacalhau
``ExternalCommandStrategy`` and ``ExternalHTTPStrategy``).

Both receive ``{"node_id", "job_id", "spec"}`` as JSON. Unlike Bacalhau, a probe is bounded
by ``timeout`` (a hung probe held the bid forever) and a failure to run it is a decline with
a reason, not an error that fails the AskForBid. The HTTP client is a small HTTP/1.1 client on
asyncio streams, so the timeout covers the whole exchange and cancelling it leaves no thread
behind; it also reads chunked bodies, which made Bacalhau's probe panic.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from typing import Any
from urllib.parse import urlsplit

import msgspec

from worker.bidding.types import BID, BidDecision, BidRequest, SemanticStrategy, decline
from worker.children import kill_group

PROBE_TIMEOUT = 2.0
ENV_NAME = "BACALHAU_JOB_SELECTION_PROBE_DATA"
MAX_BODY = 10 * 1024 * 1024
MAX_HEAD_LINE = 64 * 1024
MAX_HEADERS = 100
TIMED_OUT = "probe timed out"


def probe_payload(req: BidRequest) -> bytes:
    """``JobSelectionPolicyProbeData`` as JSON."""
    return msgspec.json.encode(
        {"node_id": req.node_id, "job_id": req.job.Metadata.ID, "spec": req.job.Spec}
    )


class ExecProbe:
    """``bash -c <command>`` with only ``PATH`` and the probe data in its environment and
    the same JSON on stdin; exit 0 → bid."""

    def __init__(self, *, command: str, timeout: float = PROBE_TIMEOUT) -> None:
        if not command:
            raise ValueError("an exec probe needs a command")
        if timeout <= 0:
            raise ValueError("the probe timeout must be positive")
        self.command = command
        self.timeout = timeout

    async def should_bid(self, req: BidRequest) -> BidDecision:
        data = probe_payload(req)
        env = {"PATH": os.environ.get("PATH", os.defpath), ENV_NAME: data.decode()}
        try:
            proc = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, so a timeout kills it all
            )
        except (OSError, ValueError) as exc:
            return decline(f"probe failed: command `{self.command}`: {exc}")
        try:
            async with asyncio.timeout(self.timeout):
                await proc.communicate(data)
        except TimeoutError:
            kill_group(proc)
            await proc.wait()
            return decline(TIMED_OUT)
        except BaseException:
            kill_group(proc)
            raise
        code = proc.returncode
        if code == 0:
            return BID
        code = -1 if code is None or code < 0 else code  # Go's ExitCode() for a signal
        return decline(f"command `{self.command}` returned non-zero exit code {code}")


class _Response(msgspec.Struct):
    status: int
    content_type: str
    body: bytes | None


class HttpProbe:
    """POST the probe data; status ≥ 400 → no; a JSON answer (Content-Type exactly
    ``application/json``) decides with its ``shouldBid``; any other answer → bid."""

    def __init__(self, *, url: str, timeout: float = PROBE_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the HTTP probe needs an http:// or https:// URL, not {url!r}")
        if timeout <= 0:
            raise ValueError("the probe timeout must be positive")
        self.url = url
        self.timeout = timeout
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = parts.port is None
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    async def should_bid(self, req: BidRequest) -> BidDecision:
        body = probe_payload(req)
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self._post(body)
        except TimeoutError:
            return decline(TIMED_OUT)
        except (OSError, ValueError, EOFError, asyncio.IncompleteReadError) as exc:
            return decline(f"probe failed: url `{self.url}`: {exc or type(exc).__name__}")
        if resp.status >= 400:
            return decline(f"url `{self.url}` returned {resp.status} status code")
        if resp.body is None:
            return BID
        try:
            should_bid, reason = _parse_answer(resp.body)
        except ValueError as exc:
            return decline(f"probe failed: url `{self.url}`: invalid answer: {exc}")
        if should_bid:
            return BID
        return decline(reason or f"url `{self.url}` returned shouldBid false")

    async def _post(self, body: bytes) -> _Response:
        ctx = ssl.create_default_context() if self._tls else None
        reader, writer = await asyncio.open_connection(
            self._host, self._port, ssl=ctx, limit=MAX_HEAD_LINE
        )
        try:
            head = (
                f"POST {self._target} HTTP/1.1\r\n"
                f"Host: {self._host_header}\r\n"
                "User-Agent: worker-probe\r\n"
                "Content-Type: application/json\r\n"
                "Accept: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            status, headers = await _read_head(reader)
            content_type = headers.get("content-type", "")
            if status >= 400 or content_type != "application/json":
                return _Response(status, content_type, None)
            return _Response(status, content_type, await _read_body(reader, headers))
        finally:
            writer.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    fields = line.decode("latin-1").split(None, 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise ValueError(f"malformed status line {line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n"):
            return int(fields[1]), headers
        if not raw:
            raise EOFError("connection closed in the response headers")
        name, sep, value = raw.decode("latin-1").partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())  # the first, as Go's Get
    raise ValueError(f"more than {MAX_HEADERS} response headers")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ValueError(f"bad Content-Length {length!r}")
        if int(length) > MAX_BODY:
            raise ValueError("response body over 10 MB")
        return await reader.readexactly(int(length))
    data = await reader.read(MAX_BODY + 1)
    chunks = [data]
    size = len(data)
    while data and size <= MAX_BODY:
        data = await reader.read(MAX_BODY + 1 - size)
        chunks.append(data)
        size += len(data)
    if size > MAX_BODY:
        raise ValueError("response body over 10 MB")
    return b"".join(chunks)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        line = (await reader.readline()).split(b";", 1)[0].strip()
        try:
            n = int(line, 16)
        except ValueError:
            raise ValueError(f"bad chunk size {line[:20]!r}") from None
        if n == 0:
            return b"".join(chunks)
        size += n
        if size > MAX_BODY:
            raise ValueError("response body over 10 MB")
        chunks.append(await reader.readexactly(n))
        await reader.readline()


def _field(obj: dict[str, Any], name: str) -> Any:
    """Go ``encoding/json`` key matching: exact, else ASCII case-insensitive."""
    if name in obj:
        return obj[name]
    value = None
    for key, item in obj.items():
        if key.lower() == name.lower():
            value = item
    return value


def _parse_answer(body: bytes) -> tuple[bool, str]:
    """``{"shouldBid": bool, "shouldWait": bool, "reason": str}`` → (shouldBid, reason).
    ``shouldWait`` has no meaning for a synchronous bid: a wait without a bid is a no."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    should_bid = _field(obj, "shouldBid")
    reason = _field(obj, "reason")
    if should_bid is not None and not isinstance(should_bid, bool):
        raise ValueError("shouldBid is not a boolean")
    if reason is not None and not isinstance(reason, str):
        raise ValueError("reason is not a string")
    return bool(should_bid), reason or ""


def make_probes(
    *, exec_command: str = "", http_url: str = "", timeout: float = PROBE_TIMEOUT
) -> list[SemanticStrategy]:
    """The configured probes, exec before HTTP as in Bacalhau's policy chain."""
    probes: list[SemanticStrategy] = []
    if exec_command:
        probes.append(ExecProbe(command=exec_command, timeout=timeout))
    if http_url:
        probes.append(HttpProbe(url=http_url, timeout=timeout))
    return probes
