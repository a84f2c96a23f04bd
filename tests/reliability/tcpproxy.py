"""A small asyncio TCP proxy on 127.0.0.1 that can cut or silently blackhole a link.

``blackhole()`` simulates a network partition: every connection stays open, but bytes in
either direction are read and dropped, so neither side sees an error — only its own ping
timeout can tell. New connections made during the blackhole are accepted and never
connected upstream (a connect that hangs). ``heal()`` ends the partition: the connections
that lived through it are closed (their byte streams lost data, so nothing could resume
them) and new ones are forwarded again. ``cut()`` closes everything at once (a visible
failure, for comparison).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    blackholed: bool = False

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.blackholed = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._close_links(list(self._links))
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def blackhole(self) -> None:
        """Partition: keep every connection open, drop every byte from now on."""
        self.blackholed = True
        for link in self._links:
            link.blackholed = True

    async def heal(self) -> None:
        """End the partition: close the links that lived through it, forward new ones."""
        self.blackholed = False
        await self._close_links([link for link in self._links if link.blackholed])

    async def cut(self) -> None:
        """Close every connection now (the peers see it at once)."""
        await self._close_links(list(self._links))

    async def _close_links(self, links: list[_Link]) -> None:
        for link in links:
            self._links.discard(link)
            link.close()
        tasks = [t for link in links for t in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        link = _Link(client=writer, blackholed=self.blackholed)
        self._links.add(link)
        try:
            if link.blackholed:
                # A connection made during the partition: accepted, never answered.
                await self._pump(reader, None, link)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                writer.close()
                self._links.discard(link)
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.close()
            self._handlers.discard(task)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, link: _Link
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                if link.blackholed or writer is None:
                    continue  # dropped on the floor: the sender sees no error
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer is not None and not link.blackholed:
                with contextlib.suppress(Exception):
                    writer.close()
