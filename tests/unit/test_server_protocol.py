"""zrproxy/server.py's flow control and request lifecycle, on a fake transport: reading
pauses while the body buffered for a handler is over its bound and while a pipelined
request waits, and resumes when they clear; a finished request keeps nothing."""

from __future__ import annotations

import asyncio

from tests.transports import RecordingTransport
from zrproxy.config import ServerConfig
from zrproxy.request import Request
from zrproxy.response import Response, StreamingResponse
from zrproxy.server import ApiServer, HttpProtocol


def _protocol(handler: object) -> tuple[HttpProtocol, RecordingTransport]:
    server = ApiServer(handler, ServerConfig(), 100, lambda: None)  # type: ignore[arg-type]
    protocol = server()
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


def _head(length: int, target: str = "/x") -> bytes:
    return f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


async def test_reading_pauses_while_the_buffered_body_is_over_its_bound() -> None:
    go = asyncio.Event()
    seen: list[int] = []

    async def handler(request: Request) -> Response | StreamingResponse:
        await go.wait()
        size = 0
        while chunk := await request.read_chunk():
            size += len(chunk)
        seen.append(size)
        return Response(200, b"ok")

    protocol, transport = _protocol(handler)
    size = 1024 * 1024
    protocol.data_received(_head(size))
    piece = b"x" * 65536
    for _ in range(size // len(piece) // 2):
        protocol.data_received(piece)
    assert transport.paused  # past 256 KiB nobody has read yet
    go.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not transport.paused  # the handler took what was buffered
    for _ in range(size // len(piece) // 2):
        protocol.data_received(piece)
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen == [size]
    assert transport.written[-1].endswith(b"\r\n\r\nok")


async def test_a_pipelined_request_pauses_reading_until_its_turn() -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def handler(request: Request) -> Response | StreamingResponse:
        order.append(request.path)
        if request.path == "/first":
            await release.wait()
        return Response(200, request.path.encode())

    protocol, transport = _protocol(handler)
    protocol.data_received(_head(0, "/first") + _head(0, "/second"))
    await asyncio.sleep(0)
    assert transport.paused and order == ["/first"]
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["/first", "/second"]
    assert not transport.paused
    bodies = [w.rpartition(b"\r\n\r\n")[2] for w in transport.written]
    assert bodies == [b"/first", b"/second"]


async def test_a_finished_request_keeps_no_header_or_body() -> None:
    kept: list[Request] = []

    async def handler(request: Request) -> Response | StreamingResponse:
        kept.append(request)
        return Response(200, b"")

    protocol, _transport = _protocol(handler)
    # The handler never reads this body: it is dropped with the request.
    protocol.data_received(_head(5).replace(b"Host: x", b"Cookie: secret") + b"abcde")
    for _ in range(3):
        await asyncio.sleep(0)
    request = kept[0]
    assert request.headers.raw == []
    assert request.transport is None  # cut from the connection
    assert await request.read_chunk() == b""
    assert protocol.current is None and protocol.task is None
