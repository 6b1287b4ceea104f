"""One client request as the handlers see it, and the responses they answer it with.

# Goals
What a handler needs and nothing more: the method, the target, the headers (raw byte
pairs, read through `RequestHeaders`), the body chunk by chunk, a `100 Continue` it sends
when it has decided to read the body, and the client's flow control for streaming. A
whole response leaves in one `transport.write`, head and body together.

# Strategy
`server.HttpProtocol` parses and owns the connection; a `Request` talks to it only
through the small `Connection` protocol below. When the response ends, the server calls
`Request.release()`: header values and unread body chunks are dropped at once, and the
link back to the connection is cut (no cycle for the collector to find later).

Never logs. Header values are decoded on lookup only, into strings the caller owns.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

from zrproxy.errors import InvalidRequest
from zrproxy.headers import RequestHeaders

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A compressed body is decoded at most this many bytes per read, so a small body that
# inflates to gigabytes meets the handler's size check one step at a time.
_DECODE_STEP = 64 * 1024
# Content-Encodings we decode (the upstream gets the plain body, and no Content-Encoding).
ENCODINGS = frozenset({b"gzip", b"x-gzip", b"deflate"})
_LAST_CHUNK = b"0\r\n\r\n"
# Above this, a chunk goes out as writev((size line, chunk, CRLF)) rather than one
# joined copy (a copy is cheaper than writev's iovec setup for SSE-sized chunks).
_JOIN_BELOW = 16 * 1024
_NO_BODY = frozenset({204, 304})  # statuses whose responses never carry a body
_STATUS_LINES: dict[tuple[bytes, int], bytes] = {}
_date_second = 0
_date_line = b""

HeaderItems = Mapping[str, str] | Iterable[tuple[str, str]]
Fields = list[tuple[bytes, bytes]]  # a response's header fields, as they go on the wire


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

    async def _read_raw(self) -> bytes:
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                size = self._body_size
                self._body_size = 0
                conn = self._conn
                if conn is not None:
                    conn.body_taken(size)
                return data
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


class Response:
    """A whole response: head and body leave in one write."""

    __slots__ = ("body", "close", "headers", "prepared", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: HeaderItems | None = None,
        content_type: str | None = None,
        *,
        fields: Fields | None = None,
    ) -> None:
        self.status = status
        self.body = body
        items: Fields = [] if content_type is None else [(b"Content-Type", content_type.encode())]
        if fields is not None:
            items += fields
        if headers is not None:
            items += _encoded(headers)
        self.headers = items
        self.close = False
        self.prepared = False  # a whole response never starts before it is returned

    def force_close(self) -> None:
        """Close the connection after this response (and say so in its head)."""
        self.close = True


class StreamingResponse:
    """A response whose body is written as it comes: chunked on HTTP/1.1 unless its
    length is known, delimited by closing on HTTP/1.0. The head leaves with the first
    body bytes (`start`), so a stream's head and first event take one write."""

    __slots__ = (
        "_head_only",
        "_transport",
        "chunked",
        "close",
        "content_length",
        "finished",
        "headers",
        "prepared",
        "status",
    )

    def __init__(self, status: int, fields: Fields, content_length: int | None = None) -> None:
        self.status = status
        self.headers = fields
        self.content_length = content_length
        self.prepared = False
        self.finished = False
        self.chunked = False
        self.close = False
        self._head_only = False
        self._transport: asyncio.Transport | None = None

    def force_close(self) -> None:
        self.close = True

    def start(self, request: Request, data: bytes = b"", end: bool = False) -> bool:
        """Write the head with `data` (and, with `end`, the end of the body). False if
        the client is gone."""
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        self._transport = transport
        self.prepared = request.started = True
        self._head_only = request.method == "HEAD"
        http10 = request.version == b"1.0"
        if self.content_length is None and not self._head_only:
            if http10:
                self.close = True  # the end of the body is the end of the connection
            else:
                self.chunked = True
        keep_alive = request.keep_alive and not self.close
        if not keep_alive:
            self.close = True
        head = render_head(
            request.version,
            self.status,
            self.headers,
            self.content_length,
            self.chunked,
            keep_alive,
        )
        if self._head_only:
            data, end = b"", True
        if end:
            self.finished = True
        if self.chunked:
            if data:
                head += b"%x\r\n%b\r\n" % (len(data), data)
            if end:
                head += _LAST_CHUNK
            transport.write(head)
        elif data:
            transport.write(head + data if len(data) < _JOIN_BELOW else head)
            if len(data) >= _JOIN_BELOW:
                transport.write(data)
        else:
            transport.write(head)
        return True

    def write(self, data: bytes) -> bool:
        """One body piece, framed. False if the client is gone."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        if self._head_only or not data:
            return True
        if self.chunked:
            size = len(data)
            if size < _JOIN_BELOW:
                transport.write(b"%x\r\n%b\r\n" % (size, data))
            else:
                transport.writelines((b"%x\r\n" % size, data, b"\r\n"))
        else:
            transport.write(data)
        return True

    def finish(self) -> None:
        """End the body (the last chunk, if chunked). After a cut, nothing is written."""
        if self.finished:
            return
        self.finished = True
        transport = self._transport
        if self.chunked and transport is not None and not transport.is_closing():
            transport.write(_LAST_CHUNK)


def _encoded(headers: HeaderItems) -> Fields:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in items]


def _status_line(version: bytes, status: int) -> bytes:
    line = _STATUS_LINES.get((version, status))
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = b"HTTP/%b %d %b\r\n" % (version, status, reason.encode("latin-1"))
        _STATUS_LINES[(version, status)] = line
    return line


def _date() -> bytes:
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    return _date_line


def render_head(
    version: bytes,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    content_length: int | None,
    chunked: bool,
    keep_alive: bool,
) -> bytes:
    """A response head: status line, the given fields, then Date and our framing and
    connection fields (no Server field: it tells a scanner which CVEs to try)."""
    parts = [_status_line(b"1.0" if version == b"1.0" else b"1.1", status)]
    for field in headers:
        parts.append(b"%b: %b\r\n" % field)
    parts.append(_date())
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None and status not in _NO_BODY:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    if not keep_alive:
        parts.append(b"Connection: close\r\n\r\n")
    elif version == b"1.0":
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)
