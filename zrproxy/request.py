"""One client request as the handlers see it (`response` has what they answer with).

# Goals
What a handler needs and nothing more: the method, the target, the headers (raw byte
pairs, read through `RequestHeaders`), the body chunk by chunk, a `100 Continue` it sends
when it has decided to read the body, and the client's flow control for streaming.

# Strategy
`server.HttpProtocol` parses and owns the connection; a `Request` talks to it only
through the small `Connection` protocol below. When the response ends, the server calls
`Request.release()`: header values and unread body chunks are dropped at once, and the
link back to the connection is cut (no cycle for the collector to find later).

Never logs. Header values are decoded on lookup only, into strings the caller owns.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from typing import Protocol

from zrproxy.errors import InvalidRequest
from zrproxy.headers import RequestHeaders

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A compressed body is decoded at most this many bytes per read, so a small body that
# inflates to gigabytes meets the handler's size check one step at a time.
_DECODE_STEP = 64 * 1024
# Content-Encodings we decode (the upstream gets the plain body, and no Content-Encoding).
ENCODINGS = frozenset({b"gzip", b"x-gzip", b"deflate"})


class Connection(Protocol):
    """What a request asks of the connection it arrived on (`server.HttpProtocol`)."""

    transport: asyncio.Transport | None
    writing_paused: bool

    def body_taken(self, size: int) -> None: ...

    async def drain(self) -> None: ...


class Request:
    """One request: its head, its body as it arrives, and the connection to answer on."""

    __slots__ = (
        "_body_size",
        "_chunks",
        "_conn",
        "_continued",
        "_decoder",
        "_encoding",
        "_undecoded",
        "_waiter",
        "broken",
        "chunked",
        "content_length",
        "eof",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "path",
        "raw_path",
        "received",
        "started",
        "version",
    )

    def __init__(
        self,
        conn: Connection,
        method: str,
        raw_path: str,
        version: bytes,
        headers: RequestHeaders,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        expect_continue: bool,
        encoding: bytes = b"",
    ) -> None:
        self._conn: Connection | None = conn
        self.method = method
        self.raw_path = raw_path  # the target as sent, query string included
        self.path = raw_path.partition("?")[0]
        self.version = version  # b"1.1" or b"1.0"
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive  # what the client asked; the server may still close
        self.expect_continue = expect_continue
        self.eof = content_length == 0 or (content_length is None and not chunked)
        self.broken = False  # the body's framing broke: the rest never comes
        self.received = 0  # body bytes received so far
        self.started = False  # a response head has been written
        self._chunks: deque[bytes] = deque()
        self._body_size = 0  # bytes in _chunks
        self._waiter: asyncio.Future[None] | None = None
        self._continued = False
        self._encoding = encoding  # the Content-Encoding, lower-cased; b"" for none
        self._decoder: zlib._Decompress | None = None
        self._undecoded = b""  # compressed input the decoder has not taken yet

    # --- for the handler ------------------------------------------------------------------

    @property
    def transport(self) -> asyncio.Transport | None:
        conn = self._conn
        return conn.transport if conn is not None else None

    @property
    def writing_paused(self) -> bool:
        conn = self._conn
        return conn is not None and conn.writing_paused

    async def drain(self) -> None:
        """Until the client's transport takes writes again (ConnectionError if gone)."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("request finished")
        await conn.drain()

    def send_continue(self) -> None:
        """Answer `Expect: 100-continue`, once, if the client asked and its body has not
        started arriving. (Called only after auth and the size check.)"""
        transport = self.transport
        if (
            self.expect_continue
            and self.version == b"1.1"
            and not self._continued
            and not self.received
            and not self.eof
            and transport is not None
            and not transport.is_closing()
        ):
            self._continued = True
            transport.write(_CONTINUE)

    def take_whole_body(self) -> bytes | None:
        """The whole body when all of it has arrived, unencoded and not yet read;
        None otherwise (then `read_chunk` it). A request with no body gives b""."""
        if not self.eof or self.broken or self._encoding or self.received != self._body_size:
            return None
        return self._read_buffered()

    async def read_chunk(self) -> bytes:
        """The next piece of the body, decoded if it came gzip- or deflate-encoded; b""
        at its end. InvalidRequest if its framing or its encoding is broken, or its
        encoding is one we don't decode."""
        if not self._encoding or self._encoding == b"identity":
            return await self._read_raw()
        if self._encoding not in ENCODINGS:
            raise InvalidRequest()
        while True:
            data = self._undecoded
            if not data:
                data = await self._read_raw()
            decoder = self._decoder
            if decoder is None:
                if not data:
                    return b""  # an empty body: nothing to decode
                decoder = self._decoder = zlib.decompressobj(_wbits(self._encoding, data))
            if not data:
                if not decoder.eof:
                    raise InvalidRequest()  # the compressed stream was cut short
                return b""
            failed = False
            try:
                out = decoder.decompress(data, _DECODE_STEP)
            except zlib.error:
                failed = True  # zlib's messages are fixed texts; the input is not in them
                out = b""
            data = b""
            if failed or (decoder.eof and decoder.unused_data):
                raise InvalidRequest()
            self._undecoded = decoder.unconsumed_tail
            if out:
                return out

    def _read_buffered(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        size = self._body_size
        self._body_size = 0
        conn = self._conn
        if conn is not None:
            conn.body_taken(size)
        return data

    async def _read_raw(self) -> bytes:
        while True:
            if self._chunks:
                return self._read_buffered()
            if self.broken:
                raise InvalidRequest()
            if self.eof or self._conn is None:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    # --- for the server -------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Body bytes from the parser; returns how many are buffered, unread."""
        self._chunks.append(data)
        self.received += len(data)
        self._body_size += len(data)
        self._wake()
        return self._body_size

    def end(self, broken: bool = False) -> None:
        self.eof = True
        self.broken = self.broken or broken
        self._wake()

    def release(self) -> None:
        """The response is done: drop header values and unread body, and the connection."""
        self.headers.clear()
        self._chunks.clear()
        self._body_size = 0
        self._decoder = None
        self._undecoded = b""
        self._conn = None
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _wbits(encoding: bytes, first: bytes) -> int:
    if encoding != b"deflate":
        return 16 + zlib.MAX_WBITS  # gzip
    # "deflate" is the zlib format by the RFC; some clients send raw deflate (no header).
    zlib_header = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
    return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
