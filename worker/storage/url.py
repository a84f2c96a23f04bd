"""URLDownload inputs: an HTTP(S) GET, streamed to disk, bounded in size and time.

A job chooses the URL, so the node must not become a way into its own network (SSRF):
every address the host name resolves to is checked, and loopback, link-local, private,
multicast, unspecified and reserved addresses are refused (IPv4 and IPv6, with the IPv4
address inside IPv4-mapped, 6to4 and NAT64 forms checked too) unless they fall inside one
of ``url_input_allow_cidr``. The check lives in the connector's resolver, so the address
connected to is the address checked (no DNS rebinding between check and connect); IP
literals, which aiohttp never resolves, are checked before each request. Redirects are
followed by hand, each hop checked the same way, at most ``max_redirects`` of them.
Environment proxies are ignored (``trust_env=False``): a proxy would connect on our behalf
to an address we never saw.

The file is written to ``dest/<name>``, where ``name`` is the spec's ``Name`` or else the
last segment of the URL path (``download`` when there is none); the returned path is that
file. Nothing is fetched at bid time: the size is unknown (0) and the input is never local.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from schemas.job import StorageSpec
from worker.errors import EngineError
from worker.storage.archive import CHUNK, Budget, NewFile
from worker.storage.paths import check_name

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# inet_aton's legacy forms (2130706433, 0x7f.1, 127.1): never treated as a host name.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.I)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _category(addr: IPAddress) -> str | None:
    """Why ``addr`` is not a public unicast address, or None when it is one."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            inner = _category(embedded)
            if inner is not None:
                return inner
    checks = (
        ("unspecified", addr.is_unspecified),
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("private", addr.is_private),
        ("reserved", addr.is_reserved),
        ("not public", not addr.is_global),
    )
    return next((name for name, hit in checks if hit), None)


class AddressPolicy:
    """Which addresses a job may make the node connect to."""

    def __init__(self, allow_cidr: Sequence[str] = ()) -> None:
        self.allowed: list[IPNetwork] = [ipaddress.ip_network(c, strict=False) for c in allow_cidr]

    def _allowed(self, addr: IPAddress) -> bool:
        forms: list[IPAddress] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            forms.append(addr.ipv4_mapped)
        return any(
            form.version == net.version and form in net for form in forms for net in self.allowed
        )

    def refusal(self, host: str) -> str | None:
        """Why connecting to the IP address ``host`` is refused, or None when allowed."""
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return f"{host} is not an IP address"
        if self._allowed(addr):
            return None
        category = _category(addr)
        if category is None:
            return None
        return f"address {addr} is {category} (allow it with url_input_allow_cidr)"


class RefusedAddress(OSError):
    """Every address of a host is refused (an OSError, so aiohttp reports it as a DNS
    failure carrying this as its cause)."""

    def __init__(self, host: str, reasons: Sequence[str]) -> None:
        super().__init__(f"{host}: {'; '.join(reasons) or 'no address'}")


def refused_in(exc: BaseException) -> RefusedAddress | None:
    """The ``RefusedAddress`` behind ``exc``, if any (aiohttp and botocore wrap it)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, RefusedAddress):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class GuardedResolver(AbstractResolver):
    """Resolves with ``ThreadedResolver`` (getaddrinfo) and keeps only allowed addresses;
    aiohttp connects to exactly what this returns."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self.inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        verdicts = [(res, self.policy.refusal(res["host"])) for res in results]
        kept = [res for res, refusal in verdicts if refusal is None]
        if not kept:
            raise RefusedAddress(host, list(dict.fromkeys(r for _, r in verdicts if r)))
        return kept

    async def close(self) -> None:
        await self.inner.close()


def check_host(host: str | None, policy: AddressPolicy, what: str) -> None:
    """Refuse an empty host, a legacy numeric form, or a refused IP literal; host names
    are left to ``GuardedResolver``."""
    if not host:
        raise EngineError(f"{what}: no host")
    bare = host.strip("[]").split("%", 1)[0]
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if _NUMERIC_HOST.fullmatch(bare):
            raise EngineError(f"{what}: {host} is not a canonical IP address") from None
        return
    reason = policy.refusal(bare)
    if reason is not None:
        raise EngineError(f"{what}: refused: {reason}")


def shown(url: URL) -> str:
    """The URL without credentials, for messages."""
    return str(url.with_user(None)) if url.user or url.password else str(url)


class URLDownload:
    """``StorageSource: URLDownload``: ``URL`` fetched with GET."""

    name = "URLDownload"

    def __init__(
        self,
        *,
        allow_cidr: Sequence[str] = (),
        max_bytes: int = 1 << 30,
        connect_timeout: float = 30.0,
        read_timeout: float = 60.0,
        max_redirects: int = 10,
    ) -> None:
        self.policy = AddressPolicy(allow_cidr)
        self.max_bytes = max_bytes
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_redirects = max_redirects

    def is_installed(self) -> bool:
        return True

    def is_local(self, spec: StorageSpec) -> bool:
        return False

    def known_size(self, spec: StorageSpec) -> int:
        return 0  # no network I/O at bid time

    def _check(self, url: URL) -> URL:
        if url.scheme not in ("http", "https"):
            raise EngineError(f"URL input {shown(url)}: only http and https URLs are allowed")
        check_host(url.raw_host, self.policy, f"URL input {shown(url)}")
        return url

    @staticmethod
    def _file_name(spec: StorageSpec, url: URL) -> str:
        if spec.Name:
            return check_name(spec.Name, "URL input file name")
        return check_name(url.name or "download", "URL input file name")

    async def prepare(self, spec: StorageSpec, dest: Path, *, requester: str) -> Path:
        try:
            url = URL(spec.URL)
        except ValueError as exc:
            raise EngineError(f"URL input {spec.URL!r} is not a valid URL: {exc}") from None
        self._check(url)
        path = dest / self._file_name(spec, url)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout
        )
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), use_dns_cache=False)
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=timeout, trust_env=False
            ) as session:
                await self._download(session, url, path)
        except EngineError:
            raise
        except TimeoutError as exc:
            raise EngineError(f"URL input {shown(url)}: timed out") from exc
        except aiohttp.ClientError as exc:
            refused = refused_in(exc)
            if refused is not None:
                raise EngineError(f"URL input {shown(url)}: refused: {refused}") from exc
            raise EngineError(f"URL input {shown(url)}: download failed: {exc}") from exc
        return path

    async def _download(self, session: aiohttp.ClientSession, url: URL, path: Path) -> None:
        current = url
        for _ in range(self.max_redirects + 1):
            async with session.get(current, allow_redirects=False) as resp:
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise EngineError(
                            f"URL input {shown(current)}: redirect without a Location"
                        )
                    try:
                        following = current.join(URL(location))
                    except ValueError:
                        raise EngineError(
                            f"URL input {shown(current)}: invalid redirect {location!r}"
                        ) from None
                    current = self._check(following)
                    continue
                if not 200 <= resp.status < 300:
                    raise EngineError(
                        f"URL input {shown(current)}: server returned HTTP {resp.status}"
                    )
                budget = Budget(self.max_bytes, f"URL input {shown(url)}")
                if resp.content_length is not None:
                    budget.check(resp.content_length)
                with NewFile(path, budget) as out:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        out.write(chunk)
                return
        raise EngineError(f"URL input {shown(url)}: more than {self.max_redirects} redirects")
