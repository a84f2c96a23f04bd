"""The Local publisher: results as ``<data-dir>/published/<ExecutionID>.tar.gz``, served
over HTTP by the node itself (Bacalhau v1.3's ``publisher/local``; PROTOCOL.md §7).

``publish`` writes the deterministic archive (:mod:`worker.publishers.archive`) atomically
and returns ``{StorageSource: URLDownload, URL: <base URL>/<ExecutionID>.tar.gz}``. A
re-publish rewrites the same bytes under the same name, so it returns the same spec.

The HTTP server (``start``/``stop``) listens on ``publisher_local_listen`` and answers
``GET``/``HEAD /<ExecutionID>.tar.gz`` with ``application/gzip`` (Range and conditional
requests work); any other path, a name that is not an execution ID followed by ``.tar.gz``
(so no traversal, no temporary files), or anything but a regular file gives 404. The
unguessable execution ID (``e-<uuid4>``) is the only access control: put the server behind
your own proxy if that is not enough. The advertised base is ``publisher_local_base_url``,
else ``http://<listen host>:<bound port>`` (the host name when listening on a wildcard
address). Archives are removed by :meth:`LocalPublisher.remove` (retention) or when a
cancelled publish stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
import stat
from pathlib import Path
from typing import Final

from aiohttp import web

from schemas.job import Publisher as PublisherName
from schemas.job import StorageSource, StorageSpec
from worker.errors import PublishError
from worker.publishers.archive import write_archive
from worker.store.types import Execution

log = logging.getLogger(__name__)

SUFFIX: Final = ".tar.gz"
# An execution ID (worker.config.ID_RE) followed by the suffix; nothing else is served.
SERVED_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\.tar\.gz")


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``, ``:port`` = every interface) → ``(host, port)``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {listen!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: the host name for wildcard addresses, v6 in brackets."""
    try:
        address = ipaddress.ip_address(host) if host else None
    except ValueError:
        return host
    if address is None or address.is_unspecified:
        return socket.gethostname()
    return f"[{host}]" if address.version == 6 else host


class LocalPublisher:
    name = PublisherName.LOCAL.value

    def __init__(self, *, directory: Path, listen: str = "127.0.0.1:0", base_url: str = "") -> None:
        self.directory = directory
        self.listen = listen
        self._configured_base = base_url.rstrip("/")
        self._base = self._configured_base
        self._runner: web.AppRunner | None = None

    def is_installed(self) -> bool:
        return True

    @property
    def base_url(self) -> str:
        """The URL prefix of published archives (known once started)."""
        return self._base

    @property
    def serving(self) -> bool:
        return self._runner is not None

    def path_of(self, execution_id: str) -> Path:
        name = f"{execution_id}{SUFFIX}"
        if SERVED_NAME.fullmatch(name) is None:
            raise PublishError(f"execution ID {execution_id!r} cannot name a published file")
        return self.directory / name

    # -- server ------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the folder and listen; idempotent."""
        if self._runner is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        host, port = split_listen(self.listen)
        app = web.Application()
        app.router.add_get("/{name}", self._serve)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or None, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        if not self._configured_base:
            self._base = f"http://{url_host(host or str(bound_host))}:{bound_port}"
        log.info("Local publisher serving %s on %s:%s", self.directory, bound_host, bound_port)

    async def stop(self) -> None:
        """Stop listening and close open connections; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._base = self._configured_base

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if SERVED_NAME.fullmatch(name) is None:
            raise web.HTTPNotFound()
        path = self.directory / name
        try:
            mode = path.lstat().st_mode
        except OSError:
            raise web.HTTPNotFound() from None
        if not stat.S_ISREG(mode):
            raise web.HTTPNotFound()
        return web.FileResponse(
            path,
            headers={
                "Content-Type": "application/gzip",
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )

    # -- publisher ---------------------------------------------------------------------
    async def publish(self, execution: Execution, results_dir: Path) -> StorageSpec:
        if self._runner is None or not self._base:
            raise PublishError("Local publisher is not serving (start() was not called)")
        target = self.path_of(execution.id)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        await write_archive(results_dir, target)
        return StorageSpec(
            StorageSource=StorageSource.URL_DOWNLOAD, URL=f"{self._base}/{target.name}"
        )

    def remove(self, execution_id: str) -> None:
        """Delete an execution's archive (retention); no error when there is none."""
        with contextlib.suppress(FileNotFoundError, PublishError):
            self.path_of(execution_id).unlink()
