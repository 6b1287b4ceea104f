"""The aiohttp behaviour the relay relies on (zrproxy/streaming.py) still holds.

The relay writes body bytes to the client transport itself, after aiohttp sent the head.
That is only correct while: `StreamResponse.write(b"")` sends the buffered head,
`request.writer.chunked` says whether aiohttp chunks the response, `write_eof` ends a
chunked body with the last chunk, and `request.protocol.writing_paused` reflects the
transport's flow control. An aiohttp upgrade that changes one of these fails here.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter


async def _serve(handler: web.Server) -> tuple[web.ServerRunner, int]:
    runner = web.ServerRunner(handler, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def _raw_request(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(65536), 5)
    while not data.endswith(b"0\r\n\r\n") and b"HTTP/1.0" not in data[:9]:
        more = await asyncio.wait_for(reader.read(65536), 5)
        if not more:
            break
        data += more
    if b"HTTP/1.0" in data[:9]:
        data += await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_direct_body_writes_follow_the_head_and_precede_the_last_chunk() -> None:
    seen: dict[str, object] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b"")  # sends the buffered head
        writer = request.writer
        assert isinstance(writer, StreamWriter)
        seen["chunked"] = writer.chunked
        assert isinstance(request.protocol, BaseProtocol)
        seen["paused"] = request.protocol.writing_paused
        assert request.transport is not None
        if writer.chunked:
            request.transport.write(b"5\r\nhello\r\n")
        else:
            request.transport.write(b"hello")
        return out  # aiohttp calls write_eof

    runner, port = await _serve(web.Server(handler))
    try:
        data = await _raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"5\r\nhello\r\n0\r\n\r\n"
        assert seen == {"chunked": True, "paused": False}

        data = await _raw_request(port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
        assert body == b"hello"
        assert seen["chunked"] is False
    finally:
        await runner.cleanup()


def test_flow_control_flag_follows_pause_and_resume() -> None:
    loop = asyncio.new_event_loop()
    try:
        protocol = BaseProtocol(loop)
        assert protocol.writing_paused is False
        protocol.pause_writing()
        assert protocol.writing_paused is True
        protocol.resume_writing()
        assert protocol.writing_paused is False
    finally:
        loop.close()


async def test_a_streaming_response_head_waits_for_the_first_write() -> None:
    from zrproxy.streaming import StreamingResponse

    assert web.StreamResponse._send_headers_immediately is True  # what we override
    written: list[int] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        out = StreamingResponse(headers={"Content-Type": "text/event-stream"})
        writer = request.writer
        assert isinstance(writer, StreamWriter)
        await out.prepare(request)
        written.append(writer.output_size)  # nothing sent by prepare
        await out.write(b"data: 1\n\n")
        written.append(writer.output_size)  # head and chunk together
        return out

    runner, port = await _serve(web.Server(handler))
    try:
        data = await _raw_request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.endswith(b"9\r\ndata: 1\n\n\r\n0\r\n\r\n")
        assert written[0] == 0 and written[1] > len(b"data: 1\n\n")
    finally:
        await runner.cleanup()
