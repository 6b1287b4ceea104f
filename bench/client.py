"""A minimal HTTP/1.1 client on asyncio for timing: one exchange at a time on a keep-alive
connection (TTFB, time to last byte, arrival time of each SSE content event), and
cheap stream holders that read and discard (memory and abort scenarios).

Raw sockets rather than aiohttp so the client's own cost stays small and the same for
every target: overhead figures are differences against the direct-to-mock run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

import orjson

PATH = "/v1/chat/completions"
# One marker per OpenAI chat content delta (the mock's role-only head event has "role").
_CONTENT_EVENT = b'"delta":{"content"'


def body(model: str, stream: bool) -> bytes:
    messages = [{"role": "user", "content": "Hello from the zrproxy benchmark"}]
    payload: dict[str, object] = {"model": model, "messages": messages}
    if stream:
        payload["stream"] = True
    return orjson.dumps(payload)


def request(host: str, port: int, data: bytes, key: str, rid: str | None = None) -> bytes:
    rid_line = f"X-Request-Id: {rid}\r\n" if rid else ""
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n{rid_line}\r\n"
    )
    return head.encode() + data


@dataclass(slots=True)
class Exchange:
    status: int
    ttfb: float  # seconds from sending the request to the first body byte
    ttlb: float  # ... to the last body byte
    events: list[float] = field(default_factory=list)  # arrival of each content event


class Connection:
    """One keep-alive connection; `exchange()` sends a request and reads the whole reply."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def exchange(self, raw_request: bytes, timeout_s: float = 30) -> Exchange:
        async with asyncio.timeout(timeout_s):
            return await self._exchange(raw_request)

    async def _exchange(self, raw_request: bytes) -> Exchange:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        clock = time.perf_counter
        start = clock()
        writer.write(raw_request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = head.lower()
        ex = Exchange(status, 0.0, 0.0)
        if b"transfer-encoding: chunked" in headers:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await reader.readexactly(size + 2)
                now = clock() - start
                if not ex.ttfb:
                    ex.ttfb = now
                if size == 0:
                    break
                ex.events.extend([now] * data.count(_CONTENT_EVENT))
        else:
            length = int(headers.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            left = length
            while left > 0:
                left -= len(await reader.read(left))
                if not ex.ttfb:
                    ex.ttfb = clock() - start
        ex.ttlb = clock() - start
        if b"connection: close" in headers:
            await self.close()
        return ex

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None


class _Holder(asyncio.Protocol):
    """Sends one request, notes when the first body bytes arrive, then discards data."""

    def __init__(self, raw_request: bytes, close_on_first: bool) -> None:
        self.raw_request = raw_request
        self.close_on_first = close_on_first
        # The monotonic time of the first body bytes; 0.0 if the connection closed first.
        self.first: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.closed_at = 0.0
        self.transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.raw_request)

    def data_received(self, data: bytes) -> None:
        if self.first.done():
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 or len(self._head) == end + 4:
            return  # the first body bytes are still to come
        self._head = b""
        self.first.set_result(time.monotonic())
        if self.close_on_first:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_result(0.0)  # closed before the first body byte

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            self.closed_at = time.monotonic()


async def _open(host: str, port: int, holder: _Holder) -> bool:
    loop = asyncio.get_running_loop()
    try:
        await loop.create_connection(lambda: holder, host, port)
    except OSError:
        return False
    return await holder.first > 0


async def open_streams(
    host: str,
    port: int,
    raw_requests: list[bytes],
    *,
    batch: int,
    deadline: float,
    close_on_first: bool = False,
) -> list[_Holder]:
    """Open one connection per request in batches, each batch waiting for its first body
    bytes; stops at `deadline` (loop time). Returns the holders that got a first byte."""
    loop = asyncio.get_running_loop()
    opened: list[_Holder] = []
    for start in range(0, len(raw_requests), batch):
        left = deadline - loop.time()
        if left <= 0:
            break
        holders = [_Holder(r, close_on_first) for r in raw_requests[start : start + batch]]
        tasks = [asyncio.ensure_future(_open(host, port, h)) for h in holders]
        await asyncio.wait(tasks, timeout=left)
        for holder, task in zip(holders, tasks, strict=True):
            if task.done() and task.result():
                opened.append(holder)
            else:
                task.cancel()
                holder.close()
    return opened
