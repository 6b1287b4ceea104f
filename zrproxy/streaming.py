"""The response path: upstream body bytes to the client as they are read, with backpressure.

# Goals
Every upstream read is written to the client at once, unchanged (the usage tap may only
drop the usage event we asked for ourselves). When the client's transport is full, the
upstream transport stops reading, so bytes wait in the kernel, not in our memory; a
client that reads nothing for send_timeout_s is a client problem, and is closed.

# Strategy
The upstream connection calls `_ClientSink.write` from its `data_received`: the tap,
then one framed client `transport.write` (`StreamingResponse.write`), synchronously. No
task, future or await per chunk; the handler sleeps in `Exchange.wait()` and wakes only
at the end, on a failure, or when the client needs draining (then it awaits the
connection's `resume_writing`, the only await per pause). The head leaves with the bytes
that came with the upstream's head, in one write; the server writes the terminating
chunk after the handler returns.

Failures come back as a result, not an exception: a traceback would keep this frame, and
with it the last chunk, alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from zrproxy.exchange import Exchange
from zrproxy.outcomes import FailureKind, Outcome
from zrproxy.request import Request
from zrproxy.response import StreamingResponse
from zrproxy.usage import UsageTap


@dataclass(slots=True)
class RelayResult:
    outcome: Outcome
    failure: FailureKind | None  # for UPSTREAM_FAILED_AFTER_FIRST_BYTE
    bytes_out: int
    chunks: int
    first_byte_at: float  # loop time of the first body byte written; 0.0 if none


class _ClientSink:
    __slots__ = (
        "_exchange",
        "_now",
        "_out",
        "_request",
        "_tap",
        "chunks",
        "first_byte_at",
        "gone",
        "sent",
    )

    def __init__(
        self,
        exchange: Exchange,
        request: Request,
        out: StreamingResponse,
        tap: UsageTap | None,
        now: Callable[[], float],
    ) -> None:
        self._exchange = exchange
        self._request = request
        self._out = out
        self._tap = tap
        self._now = now
        self.sent = self.chunks = 0
        self.first_byte_at = 0.0
        self.gone = False

    @property
    def paused(self) -> bool:
        return self._request.writing_paused

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
        if not self._out.write(data):
            self.gone = True
            self._exchange.pause()
            return
        self.counted(data)
        if self._request.writing_paused:
            self._exchange.pause()


async def relay(
    exchange: Exchange,
    request: Request,
    out: StreamingResponse,
    tap: UsageTap | None,
    now: Callable[[], float],
    send_timeout_s: float,
) -> RelayResult:
    """Relay the body of `exchange` as `out`, whose head goes with the first bytes."""
    sink = _ClientSink(exchange, request, out, tap, now)
    data = exchange.take_early()
    try:
        if tap is not None and data:
            data = tap.feed(data)
        if exchange.ended:
            if tap is not None:
                data += tap.flush()
            if data:
                sink.counted(data)
            if not out.start(request, data, end=True):  # head, body and end in one write
                return _result(Outcome.CLIENT_GONE, None, sink)
            return _result(Outcome.COMPLETED, None, sink)
        # The head, and what came with it (nothing, if nothing came yet: no head waits
        # for a slow first chunk).
        if not out.start(request, data):
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
                    if not out.write(rest):
                        return _result(Outcome.CLIENT_GONE, None, sink)
                    sink.counted(rest)
                return _result(Outcome.COMPLETED, None, sink)
            if sink.paused:
                try:
                    async with asyncio.timeout(send_timeout_s):
                        await request.drain()
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
