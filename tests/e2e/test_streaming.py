"""Streaming through the real proxy: chunk by chunk, backpressure, client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests import processes
from tests.conftest import Mock, RunningProxy, StartProxy
from tests.fakes import FakeUpstreams

CHAT = "/v1/chat/completions"


def chat_body(model: str, stream: bool = True, text: str = "hello") -> bytes:
    return orjson.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}
    )


@contextlib.asynccontextmanager
async def lockstep_upstream(chunks: int) -> AsyncIterator[tuple[str, list[asyncio.Event]]]:
    """An upstream that sends chunk i only after the test says chunk i-1 arrived."""
    acks = [asyncio.Event() for _ in range(chunks)]

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(chunks):
            await response.write(f'data: {{"i":{i}}}\n\n'.encode())
            await asyncio.wait_for(acks[i].wait(), timeout=10)
        await response.write(b"data: [DONE]\n\n")
        return response

    fakes = FakeUpstreams()
    try:
        yield (await fakes.start("lock", handler=handler)).url, acks
    finally:
        await fakes.close()


async def test_each_chunk_reaches_the_client_before_the_next_is_sent(
    start_proxy: StartProxy,
) -> None:
    # The upstream waits for our acknowledgement of chunk i before sending chunk i+1, so a
    # proxy that buffers (whole events, or a response) deadlocks and the test times out.
    async with lockstep_upstream(5) as (url, acks):
        proxy = await start_proxy([{"name": "lock", "kind": "openai", "base_url": url}])
        async with (
            aiohttp.ClientSession() as client,
            client.post(proxy.url + CHAT, data=chat_body("m"), headers=proxy.auth()) as resp,
        ):
            assert resp.status == 200
            for i in range(5):
                line = await asyncio.wait_for(resp.content.readline(), timeout=5)
                assert line == f'data: {{"i":{i}}}\n'.encode()
                assert await resp.content.readline() == b"\n"
                acks[i].set()
            assert await resp.content.read() == b"data: [DONE]\n\n"


@pytest.fixture
def mock_process() -> Iterator[str]:
    """The bundled mock in its own process, so memory measured here is the proxy's."""
    with processes.mock_process() as mock:
        yield mock.url


# Stated in the README: what one stream can hold in the proxy while its client is slow.
PER_STREAM_BOUND_BYTES = 512 * 1024


async def test_slow_client_holds_bounded_memory(mock_process: str, start_proxy: StartProxy) -> None:
    proxy = await start_proxy([{"name": "mock", "kind": "openai", "base_url": mock_process}])
    host, port = proxy.url.removeprefix("http://").split(":")
    body = chat_body("mock-n4000-s16384")  # ~64 MiB of completion, as fast as it can go
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    # A raw socket with a small receive buffer that we stop reading: the slow client.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        await loop.sock_sendall(sock, request)
        first = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=10)
        assert first.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.5)  # let every buffer between upstream and client fill up
        filled, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(10):
            await asyncio.sleep(0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held, growth = peak - before, peak - filled
    print(f"slow client: stream holds {held / 1024:.0f} KiB, grew {growth / 1024:.0f} KiB stalled")
    # Backpressure held: the stream's memory is bounded and stopped growing once stalled.
    assert held < PER_STREAM_BOUND_BYTES, held
    assert growth < 64 * 1024, growth
    # And it kept relaying once the client read again: drain a few MiB.
    received = 0
    deadline = time.monotonic() + 20
    while received < 8 * 1024 * 1024 and time.monotonic() < deadline:
        received += len(await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout=10))
    sock.close()
    assert received >= 8 * 1024 * 1024


async def _mock_record_end(mock: Mock, rid: str, timeout: float = 8.0) -> None:
    """Wait until the mock saw request `rid` end as disconnected (every model these tests
    use runs 10 s or more, or forever, when nobody leaves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = mock.stats.requests.get(rid)
        if record is not None and record.end is not None:
            assert record.end == "disconnected", record.end
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the upstream request was not closed")


@pytest.mark.parametrize("model", ["mock-n200-d50", "mock-hangbody"])
async def test_client_disconnect_closes_the_upstream_request(
    mock: Mock, proxy: RunningProxy, model: str
) -> None:
    # Mid-stream, and while the upstream is silent after its first chunk: the upstream
    # must see its request closed because the client left (nobody pays for unread
    # tokens), long before it would end by itself. How fast is a benchmark figure
    # (abort propagation), not an assert: it depends on the machine's load.
    rid = f"disconnect-{model}"
    headers = {**proxy.auth(), "X-Request-Id": rid}
    async with aiohttp.ClientSession() as client:
        resp = await client.post(proxy.url + CHAT, data=chat_body(model), headers=headers)
        assert resp.status == 200
        await asyncio.wait_for(resp.content.readline(), timeout=5)
        resp.close()  # drops the connection under the open response
    await _mock_record_end(mock, rid)


async def test_client_leaving_before_upstream_headers_closes_upstream(
    mock: Mock, proxy: RunningProxy
) -> None:
    rid = "disconnect-before-headers"
    headers = {**proxy.auth(), "X-Request-Id": rid}
    async with aiohttp.ClientSession() as client:
        task = asyncio.create_task(
            client.post(proxy.url + CHAT, data=chat_body("mock-f30000"), headers=headers)
        )
        while rid not in mock.stats.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await _mock_record_end(mock, rid)
