"""A raw upstream on 127.0.0.1, port 0, that answers each request with exact bytes.

It reads a request (head, then a Content-Length body), then plays the script the test
gave for that request: bytes to write, pauses, a close or a reset. It records which
connection carried each request, so a test can tell a reused connection from a new one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

# A script step: bytes to write, a function of the request body giving bytes to write,
# seconds to wait, an event to wait for (the test sets it), "close", "reset" (RST),
# "hold" (never answer more), or "read-head-only" (answer before reading the body: must
# come first).
Step = bytes | float | str | asyncio.Event | Callable[[bytes], bytes]
Script = Callable[[int, bytes], list[Step]]


@dataclass
class RawUpstream:
    script: Script
    rcvbuf: int | None = None  # a small receive buffer, to keep a request body unsent
    tls: ssl.SSLContext | None = None  # serve https with this server context
    connections: int = 0
    open: int = 0
    max_open: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, body)
    server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        if self.tls is not None:
            return f"https://localhost:{port}/v1"
        return f"http://127.0.0.1:{port}/v1"

    async def start(self) -> RawUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self.server = await asyncio.start_server(self._serve, sock=sock, ssl=self.tls)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        conn = self.connections
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                steps = self.script(len(self.requests), head)
                body = b""
                if steps[:1] == ["read-head-only"]:
                    steps = steps[1:]
                else:
                    body = await reader.readexactly(length)
                self.requests.append((conn, body))
                for step in steps:
                    if callable(step):
                        step = step(body)
                    if isinstance(step, bytes):
                        writer.write(step)
                        await writer.drain()
                    elif isinstance(step, float):
                        await asyncio.sleep(step)
                    elif isinstance(step, asyncio.Event):
                        await step.wait()
                    elif step == "close":
                        writer.close()
                        return
                    elif step == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        writer.transport.abort()
                        return
                    elif step == "hold":
                        await asyncio.Event().wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.open -= 1
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()


def json_response(body: bytes, extra_head: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra_head
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def chunked(*parts: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailers + b"\r\n"
