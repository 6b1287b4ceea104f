"""The connections to one upstream: a capped pool of keep-alive HTTP/1.1 connections.

# Goals
At most `max_connections` open or opening connections per upstream. A request that finds
none free waits at most `pool_timeout_s`, then fails like a connect failure (so the
route fails over): no queue that grows without bound. An idle connection lives at most
`keepalive_s`; one closed by the upstream while idle is dropped when noticed.

# Strategy
Idle connections form a stack (the most recently used is warmest and least likely to
have been closed by the upstream). A connection that comes back goes straight to the
longest waiter. A closed connection frees its slot for the longest waiter, which then
connects. One sweep timer per pool runs only while connections are idle.

A connection is handed out only if it is still fit: not past its idle expiry
(`keepalive_s`, or less if the upstream's `Keep-Alive: timeout=N` said so), and not closed
by the upstream, even if our loop has not read that yet (`peer_gone`). Those are
dropped there, before a byte of the request is written; once a request is written, the
pool never sends it again (`upstream.Upstreams`).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections import deque

from zrproxy.http1 import UpstreamConnection


class PoolTimeout(Exception):
    """No connection became free within pool_timeout_s (content-free)."""


class EgressRefused(ConnectionRefusedError):
    """The egress proxy answered CONNECT with something other than 200. `reason` is our
    fixed text with its status code (three digits), never its body or our credentials."""

    def __init__(self, status: bytes) -> None:
        code = status.decode("ascii") if status.isdigit() and len(status) == 3 else "malformed"
        if code == "407":
            reason = (
                "the egress proxy refused its credentials (407 Proxy Authentication"
                " Required): check egress_proxy_auth_env"
            )
        else:
            reason = f"the egress proxy refused the tunnel (status {code})"
        super().__init__(reason)
        self.reason = reason


class Budget:
    """The upstream connections of every pool against one process-wide limit: the file
    descriptors left for them. The API listener's connection cap counts one upstream
    connection per client connection; idle pooled connections are beyond that count
    (after a burst, every pool keeps its own), so at the limit a new connection first
    closes the longest-idle one of any pool. It never makes a request wait: the
    connections in use are bounded by the client connections."""

    __slots__ = ("limit", "open", "pools")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.pools: list[Pool] = []

    def make_room(self) -> None:
        if self.open < self.limit:
            return
        oldest: UpstreamConnection | None = None
        for pool in self.pools:
            conn = pool.oldest_idle()
            if conn is not None and (oldest is None or conn.idle_since < oldest.idle_since):
                oldest = conn
        if oldest is not None:
            oldest.close()


class Pool:
    """One upstream's connections. Create inside the running loop."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        max_connections: int,
        pool_timeout_s: float,
        connect_timeout_s: float,
        keepalive_s: float,
        egress_proxy: tuple[str, int] | None = None,
        egress_auth: str | None = None,
        budget: Budget | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._budget = budget
        if budget is not None:
            budget.pools.append(self)
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._max = max_connections
        self._pool_timeout = pool_timeout_s
        self._connect_timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._egress = egress_proxy
        # "USER:PASSWORD" for the egress proxy, sent as Proxy-Authorization: Basic on CONNECT.
        self._egress_auth_header = (
            ""
            if egress_auth is None
            else "Proxy-Authorization: Basic "
            + base64.b64encode(egress_auth.encode("utf-8")).decode("ascii")
            + "\r\n"
        )
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._count = 0  # open or opening connections, against max_connections
        # A waiter's future gets a connection, or None: "a slot is yours, connect".
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def size(self) -> int:
        return self._count

    @property
    def idle(self) -> int:
        return sum(1 for conn in self._idle if not conn.closed)

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A connection ready for a request: an idle one (unless `fresh`), a new one, or
        the next one freed. Raises PoolTimeout, TimeoutError (connect) or OSError."""
        if not fresh:
            conn = self._pop_idle()
            if conn is not None:
                return conn
        if self._count < self._max:
            self._count += 1
            return await self._connect()
        waiter: asyncio.Future[UpstreamConnection | None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._pool_timeout):
                conn = await waiter
        except TimeoutError:
            self._hand_back(waiter)
            raise PoolTimeout() from None
        except BaseException:
            self._hand_back(waiter)
            raise
        if conn is None:
            return await self._connect()  # the slot was counted for us
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """A connection whose last response ended exactly: reuse it."""
        if self._closed or conn.closed:
            conn.close()
            return
        now = conn.idle_since = self._loop.time()
        limit = self._keepalive
        if conn.idle_limit_s is not None:
            limit = min(limit, conn.idle_limit_s)
            if limit <= 0:
                conn.close()  # the upstream keeps no idle connection worth our request
                return
        conn.expires = now + limit
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(self._keepalive / 2, self._sweep)

    def oldest_idle(self) -> UpstreamConnection | None:
        for conn in self._idle:  # the stack's bottom is the longest idle
            if not conn.closed:
                return conn
        return None

    def lost(self, conn: UpstreamConnection) -> None:
        """`conn` is closed: its slot is free."""
        if conn in self._all:
            self._all.discard(conn)
            if self._budget is not None:
                self._budget.open -= 1
            if not self._all:
                # A set keeps the table it grew to until cleared (after a burst of 5,000
                # connections, 512 KiB); clearing it once empty gives the table back.
                self._all.clear()
            self._count -= 1
            self._grant_slot()

    def close(self) -> None:
        self._closed = True
        if self._budget is not None and self in self._budget.pools:
            self._budget.pools.remove(self)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    # --- internals ------------------------------------------------------------------------

    async def _connect(self) -> UpstreamConnection:
        conn = UpstreamConnection(self, self._loop)
        budget = self._budget
        if budget is not None:
            budget.make_room()
            budget.open += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._egress is None:
                    await self._loop.create_connection(
                        lambda: conn,
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None,
                    )
                else:
                    sock = await self._tunnel(*self._egress)
                    await self._loop.create_connection(
                        lambda: conn,
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None,
                    )
        except BaseException:
            if budget is not None:
                budget.open -= 1
            self._count -= 1
            self._grant_slot()
            conn.close()
            raise
        self._all.add(conn)
        return conn

    async def _tunnel(self, proxy_host: str, proxy_port: int) -> socket.socket:
        """A socket to the upstream through an HTTP forward proxy (CONNECT): every scheme
        is tunnelled, so TLS runs end to end and the proxy sees only host and port."""
        infos = await self._loop.getaddrinfo(proxy_host, proxy_port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, address)
            target = f"[{self._host}]" if ":" in self._host else self._host
            request = (
                f"CONNECT {target}:{self._port} HTTP/1.1\r\nHost: {target}:{self._port}\r\n"
                f"{self._egress_auth_header}\r\n"
            )
            await self._loop.sock_sendall(sock, request.encode("ascii"))
            head = b""
            while b"\r\n\r\n" not in head:
                # Byte by byte: nothing past the proxy's answer may be read here, it would
                # be the upstream's (TLS) bytes.
                byte = await self._loop.sock_recv(sock, 1)
                if not byte or len(head) > 8192:
                    raise ConnectionError("egress proxy closed or answered too much")
                head += byte
            status = head.split(b" ", 2)[1:2]
            if status != [b"200"]:
                raise EgressRefused(status[0] if status else b"")
        except BaseException:
            sock.close()
            raise
        return sock

    def _pop_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        if not idle:
            return None
        now = self._loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.expires <= now or conn.peer_gone():
                conn.close()
                continue
            return conn
        return None

    def _grant_slot(self) -> None:
        while self._waiters and self._count < self._max:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._count += 1
                waiter.set_result(None)
                return

    def _hand_back(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        """A waiter gave up; if it was granted something meanwhile, pass that on."""
        if waiter.cancelled():
            return
        if not waiter.done():
            waiter.cancel()
            return
        granted = waiter.result()
        if granted is None:
            self._count -= 1
            self._grant_slot()
        else:
            self.release(granted)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._loop.time()
        keep: list[UpstreamConnection] = []
        for conn in self._idle:
            if conn.closed:
                continue
            if conn.expires <= now:
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep
        if keep and not self._closed:
            self._sweeper = self._loop.call_later(self._keepalive / 2, self._sweep)
