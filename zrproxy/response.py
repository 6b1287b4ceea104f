"""The responses a handler answers with, and the response head as it goes on the wire.

# Goals
A whole response leaves in one `transport.write`, head and body together; a stream's
head leaves with its first body bytes. Header fields are byte pairs (the upstream's as
llhttp gave them); no `Server` field, a `Date` field built once a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus

from zrproxy.request import Request

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
