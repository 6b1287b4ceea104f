"""The API listening socket, whose accepting can pause at the connection cap.

# Strategy
We own the listening socket and hand the event loop a duplicate of it for each period
of accepting. Pausing closes the loop's server (and so only the duplicate): the socket
itself stays listening, and the kernel queues new connections in its backlog until we
resume with a fresh duplicate. Public asyncio/aiohttp APIs only, on uvloop and the
standard loop alike.
"""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web


def listening_socket(host: str, port: int, *, reuse_port: bool, backlog: int) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (raises OSError)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class PausableSite(web.BaseSite):
    """An aiohttp site on our own listening socket, with `pause()` and `resume()`."""

    __slots__ = ("_name", "_paused", "_sock")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock: socket.socket | None = sock
        self._paused = False
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def paused(self) -> bool:
        return self._paused

    async def start(self) -> None:
        await super().start()
        await self._serve()

    async def _serve(self) -> None:
        assert self._sock is not None
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            server, sock=self._sock.dup(), backlog=self._backlog
        )

    def pause(self) -> None:
        """Stop accepting; connections wait in the kernel's backlog."""
        if self._paused or self._server is None:
            return
        self._paused = True
        self._server.close()
        self._server = None

    async def resume(self) -> None:
        if not self._paused or self._sock is None:
            return
        self._paused = False
        await self._serve()

    async def stop(self) -> None:
        await super().stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
