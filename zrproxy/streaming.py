"""The relay loop: upstream bytes to the client as they arrive, with backpressure.

# Goals
Every chunk read from the upstream is written to the client at once, unchanged (the
usage tap may only drop the usage event we asked for ourselves). While the client is
slow, `write` waits for the socket to drain, so we stop reading the upstream and its
bytes wait in the kernel, not in our memory. Nothing per chunk but the read, the write
and two counters.

# Strategy
Failures come back as an outcome, not an exception: an exception's traceback would keep
this frame, and with it the last chunk, alive. On cancellation (client gone, drain) the
`finally` drops the chunk before the exception travels up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import StreamReader
from aiohttp.web import StreamResponse

from zrproxy.errors import forget
from zrproxy.usage import UsageTap

Outcome = Literal["completed", "upstream_error", "upstream_timeout", "client_gone"]


@dataclass(slots=True)
class RelayResult:
    outcome: Outcome
    bytes_out: int
    chunks: int
    first_byte_at: float  # loop time of the first body byte written; 0.0 if none


async def relay(
    source: StreamReader, sink: StreamResponse, tap: UsageTap | None, now: Callable[[], float]
) -> RelayResult:
    """Copy `source` to `sink` chunk by chunk until either side ends; `now` is the loop's
    clock, for the time of the first byte."""
    read = source.readany
    write = sink.write
    sent = chunks = 0
    first_byte_at = 0.0
    data = b""
    try:
        while True:
            try:
                data = await read()
            except TimeoutError as exc:
                forget(exc)
                return RelayResult("upstream_timeout", sent, chunks, first_byte_at)
            except (aiohttp.ClientError, OSError) as exc:
                forget(exc)
                return RelayResult("upstream_error", sent, chunks, first_byte_at)
            ended = not data
            if tap is not None:
                # At the end, whatever the tap still holds back goes out as it is.
                data = tap.flush() if ended else tap.feed(data)
            if data:
                if not chunks:
                    first_byte_at = now()
                try:
                    await write(data)
                except (ConnectionError, aiohttp.ClientError) as exc:
                    forget(exc)
                    return RelayResult("client_gone", sent, chunks, first_byte_at)
                sent += len(data)
                chunks += 1
            if ended:
                return RelayResult("completed", sent, chunks, first_byte_at)
    finally:
        data = b""
        if tap is not None:
            tap.close()
