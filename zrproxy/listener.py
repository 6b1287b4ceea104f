"""The API listening socket, whose accepting can pause at the connection cap.

# Strategy
We own the listening socket and hand the event loop a duplicate of it for each period
of accepting. Pausing closes the loop's server (and so only the duplicate): the socket
itself stays listening, and the kernel queues new connections in its backlog until we
resume with a fresh duplicate. Public asyncio/aiohttp APIs only, on uvloop and the
standard loop alike, for any protocol factory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("zrproxy")


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


class PausableListener:
    """The loop's server on our own listening socket, with `pause()` and `resume()`."""

    __slots__ = ("_backlog", "_factory", "_headroom", "_on_pause", "_paused", "_server", "_sock")

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
        backlog: int,
        on_pause: Callable[[], None] | None = None,
        headroom: Callable[[], int] | None = None,
    ) -> None:
        self._factory = factory
        self._headroom = headroom  # connections still to accept before the cap
        self._sock: socket.socket | None = sock
        self._backlog = backlog
        self._server: asyncio.Server | None = None
        self._paused = False
        self._on_pause = on_pause  # called each time accepting pauses at the cap

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def paused(self) -> bool:
        return self._paused

    async def start(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        # The standard loop accepts up to `backlog` connections per wake-up, and a
        # connection is counted (connection_made) only a few loop turns after its accept:
        # with 1024, a burst would be accepted far past the cap, into EMFILE. So it gets a
        # third of the headroom per wake-up (libuv accepts one per wake-up anyway).
        batch = self._backlog
        if self._headroom is not None:
            batch = max(1, min(batch, self._headroom() // 3))
        self._server = await loop.create_server(self._factory, sock=self._sock.dup(), backlog=batch)
        if batch != self._backlog:
            self._sock.listen(self._backlog)  # the kernel's queue keeps its length

    def pause(self) -> None:
        """Stop accepting; connections wait in the kernel's backlog."""
        if self._paused or self._server is None:
            return
        self._paused = True
        self._server.close()
        self._server = None
        if self._on_pause is not None:
            self._on_pause()

    async def resume(self) -> None:
        if not self._paused or self._sock is None:
            return
        self._paused = False
        await self.start()

    async def restart(self, after_s: float) -> None:
        """Accept again on a fresh duplicate after the loop closed its server."""
        if self._paused:
            return
        self._paused = True
        if self._server is not None:
            self._server.close()
            self._server = None
        await asyncio.sleep(after_s)
        await self.resume()

    async def stop(self) -> None:
        """Stop accepting for good (the connections stay: the caller closes them)."""
        self._paused = True
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# Descriptors kept free for the admin listener, logging, DNS and the like.
_FD_RESERVE = 64
# accept() errors that mean "out of descriptors or buffers", not a broken listener.
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_REPORT_EVERY_S = 10.0


def fd_connection_cap() -> int:
    """How many client connections fit in the file-descriptor limit: each proxied
    request also holds an upstream connection, and a reserve stays free."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    return max(1, (soft - in_use - _FD_RESERVE) // 2)


class AcceptErrors:
    """An event-loop exception handler that counts refused accepts (out of descriptors)
    and logs them at most once per `_REPORT_EVERY_S`; anything else goes to the handler
    that was in place.

    The standard loop reports them as "socket.accept() out of system resource" (once per
    accept it tries in a wake-up) and retries a second later; the connections wait in the
    backlog. uvloop's libuv (>= 1.45: `uv__server_io`, src/unix/stream.c) never reports
    them: it accepts and closes every waiting connection with its spare descriptor
    (`uv__emfile_trick`), so only the fd-fitted connection cap protects there. An older
    libuv reported the error to uvloop's listen callback, which then closes the listening
    handle: `on_refused(listener_closed=True)` lets the caller start accepting again.
    """

    def __init__(
        self,
        on_refused: Callable[[bool], None],
        previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
    ) -> None:
        self._on_refused = on_refused
        self._previous = previous
        self._unreported = 0
        self._next_report = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            if "accept" in message or "listen" in message:
                self._refused(exc.errno, listener_closed="listen" in message)
                return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _refused(self, code: int, listener_closed: bool) -> None:
        self._unreported += 1
        self._on_refused(listener_closed)
        now = time.monotonic()
        if now >= self._next_report:
            log.warning(
                "API listener: %d connections not accepted (%s: out of file descriptors or "
                "buffers); see zrproxy_refused_accepts_total",
                self._unreported,
                errno.errorcode.get(code, str(code)),
            )
            self._unreported = 0
            self._next_report = now + _REPORT_EVERY_S
