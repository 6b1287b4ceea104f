"""The response path: upstream body bytes to the client as they are read, with backpressure.

# Goals
Every upstream read is written to the client at once, unchanged (the usage tap may only
drop the usage event we asked for ourselves). When the client's transport is full, the
upstream transport stops reading, so bytes wait in the kernel, not in our memory; a
client that reads nothing for send_timeout_s is a client problem, and is closed.

# Strategy
The upstream connection calls `_ClientSink.write` from its `data_received`: the tap,
then one client `transport.write`, synchronously. No task, future or await per chunk;
the handler sleeps in `Exchange.wait()` and wakes only at the end, on a failure, or when
the client needs draining (then it awaits aiohttp's drain, the only await per pause).

Writing: aiohttp's `StreamResponse.write` is a coroutine per chunk that counts bytes and
may await drain; from `data_received` we cannot await, and driving a coroutine per chunk
costs more than the write. Measured per 160-byte SSE chunk against a transport that
drops the bytes (so without the system call; on a shared 2-core machine, noisy):
`await StreamWriter.write` 4.1-4.7 us, its coroutine driven by hand 3.2 us, the framed
`transport.write` below 0.5-1.9 us. So after the head has gone out through aiohttp (coalesced with
the bytes that came with the upstream's head), the body goes to the client transport
directly, framed as aiohttp framed the response (chunked when `writer.chunked`). aiohttp
still writes the terminating chunk (`write_eof`, after the handler returns). What we rely
on of aiohttp is pinned by tests/test_aiohttp_pins.py.

Failures come back as a result, not an exception: a traceback would keep this frame, and
with it the last chunk, alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from zrproxy.http1 import Exchange
from zrproxy.outcomes import FailureKind, Outcome
from zrproxy.usage import UsageTap

# Above this, a chunk goes out as writev((size line, chunk, CRLF)) rather than one
# joined copy (a copy is cheaper than writev's iovec setup for SSE-sized chunks).
_JOIN_BELOW = 16 * 1024


class StreamingResponse(web.StreamResponse):
    """A StreamResponse whose head waits for the first body write (as `web.Response`'s
    does), so the head and the bytes that came with the upstream's head leave in one
    write: one system call less per stream, and the first byte sooner. The relay's first
    write comes right after `prepare`, empty if nothing came yet, so no head waits for a
    slow first chunk. Pinned by tests/test_aiohttp_pins.py."""

    _send_headers_immediately = False


@dataclass(slots=True)
class RelayResult:
    outcome: Outcome
    failure: FailureKind | None  # for UPSTREAM_FAILED_AFTER_FIRST_BYTE
    bytes_out: int
    chunks: int
    first_byte_at: float  # loop time of the first body byte written; 0.0 if none


class _ClientSink:
    __slots__ = (
        "_chunked",
        "_exchange",
        "_now",
        "_protocol",
        "_tap",
        "_transport",
        "chunks",
        "first_byte_at",
        "gone",
        "sent",
    )

    def __init__(
        self,
        exchange: Exchange,
        request: web.BaseRequest,
        tap: UsageTap | None,
        now: Callable[[], float],
    ) -> None:
        self._exchange = exchange
        self._transport = request.transport
        self._protocol = request.protocol
        self._chunked = request.writer.chunked  # type: ignore[attr-defined]
        self._tap = tap
        self._now = now
        self.sent = self.chunks = 0
        self.first_byte_at = 0.0
        self.gone = False

    @property
    def paused(self) -> bool:
        return bool(self._protocol.writing_paused)

    def counted(self, data: bytes) -> None:
        if not self.chunks:
            self.first_byte_at = self._now()
        self.sent += len(data)
        self.chunks += 1

    def write(self, data: bytes) -> None:
        tap = self._tap
        if tap is not None:
            data = tap.feed(data)
            if not data:
                return
        transport = self._transport
        if transport is None or transport.is_closing():
            self.gone = True
            self._exchange.pause()
            return
        if self._chunked:
            size = len(data)
            if size < _JOIN_BELOW:
                transport.write(b"%x\r\n%b\r\n" % (size, data))
            else:
                transport.writelines((b"%x\r\n" % size, data, b"\r\n"))
        else:
            transport.write(data)
        self.counted(data)
        if self._protocol.writing_paused:
            self._exchange.pause()


async def relay(
    exchange: Exchange,
    request: web.BaseRequest,
    out: web.StreamResponse,
    tap: UsageTap | None,
    now: Callable[[], float],
    send_timeout_s: float,
) -> RelayResult:
    """Relay the body of `exchange` (its head already relayed as `out`, prepared)."""
    sink = _ClientSink(exchange, request, tap, now)
    data = exchange.take_early()
    try:
        if tap is not None and data:
            data = tap.feed(data)
        if exchange.ended:
            if tap is not None:
                data += tap.flush()
            if data:
                sink.counted(data)
            try:
                await out.write_eof(data)  # head, body and end in one write
            except ConnectionError:
                return _result(Outcome.CLIENT_GONE, None, sink)
            return _result(Outcome.COMPLETED, None, sink)
        try:
            await out.write(data)  # the head, and what came with it
        except ConnectionError:
            return _result(Outcome.CLIENT_GONE, None, sink)
        if data:
            sink.counted(data)
        data = b""
        exchange.attach(sink.write)
        while True:
            if sink.gone:
                return _result(Outcome.CLIENT_GONE, None, sink)
            if exchange.failure is not None:
                return _result(Outcome.UPSTREAM_FAILED_AFTER_FIRST_BYTE, exchange.failure, sink)
            if exchange.ended:
                if tap is not None and (rest := tap.flush()):
                    try:
                        await out.write(rest)
                    except ConnectionError:
                        return _result(Outcome.CLIENT_GONE, None, sink)
                    sink.counted(rest)
                return _result(Outcome.COMPLETED, None, sink)
            if sink.paused:
                try:
                    async with asyncio.timeout(send_timeout_s):
                        await request.writer.drain()
                except TimeoutError:
                    return _result(Outcome.CLIENT_STALLED, None, sink)
                except ConnectionError:
                    return _result(Outcome.CLIENT_GONE, None, sink)
            exchange.resume()  # reading stopped for the client or before the relay began
            await exchange.wait()
    finally:
        data = b""
        if not exchange.finished:
            exchange.abandon()
        if tap is not None:
            tap.close()


def whole_body(
    exchange: Exchange, tap: UsageTap | None, now: Callable[[], float]
) -> tuple[bytes, RelayResult]:
    """The body of an exchange that has already ended, through the tap, and its result:
    for a response sent in one piece (head and body in one write)."""
    data = exchange.take_early()
    if tap is not None:
        data = tap.feed(data) + tap.flush() if data else tap.flush()
        tap.close()
    first_byte_at = now() if data else 0.0
    return data, RelayResult(Outcome.COMPLETED, None, len(data), 1 if data else 0, first_byte_at)


def _result(outcome: Outcome, failure: FailureKind | None, sink: _ClientSink) -> RelayResult:
    return RelayResult(outcome, failure, sink.sent, sink.chunks, sink.first_byte_at)
