"""HTTP input limits on one client connection: the request head's size and time, and no
header value of a finished request left alive on an idle keep-alive connection.

# Goals
A request line past `max_request_line_bytes` gets 414, a head past `max_header_bytes`
(or a field past `max_header_field_bytes`, or more than `max_header_fields` fields:
aiohttp's parser counts those) gets 431, both with the connection closed. A head must
arrive within `header_timeout_s`, and so must the first request of a new connection;
that clock is not the keep-alive one (`keepalive_timeout_s`, idle between requests).

# Strategy
We see the bytes before aiohttp's parser does (`data_received`) while a head is being
read, so an oversized head is refused before the parser buffers it. The end of a head is
found with one `find(b"\\r\\n\\r\\n")` per read; body bytes are never scanned. Bytes of a
pipelined head that arrive in the same read as the end of the request before it are not
measured (the parser's per-field and field-count limits still hold), and such a head is
then timed by the keep-alive timeout. A refusal
is queued like one of aiohttp's parser errors (`_ErrInfo`), so the one error path of
aiohttp (our `handle_error`) answers it.

Header values must not outlive their request on an idle keep-alive connection, but two
holders keep the last head until the next request arrives: aiohttp's connection loop
(its last message is a local variable there) and the C parser (its header list, raw
headers and target are reset only when the next message begins). So parsed headers are
copied into a dict we own and cleared when the request ends, and once the connection is
idle with nothing buffered, its parser is replaced by a fresh one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import aiohttp.http_parser
from aiohttp import web
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import (
    MAX_MSG_QUEUE_SIZE,
    RequestHandler,
    RequestPayloadError,
    _ErrInfo,
)
from multidict import CIMultiDict, CIMultiDictProxy

from zrproxy.config import ServerConfig
from zrproxy.errors import StartupError

_HEAD_END = b"\r\n\r\n"
_HEADER_TIMEOUT_BODY = (
    b'{"error":{"message":"The request headers did not arrive in time.",'
    b'"type":"invalid_request_error","param":null,"code":"request_timeout"}}'
)
_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_HEADER_TIMEOUT_BODY)
) + _HEADER_TIMEOUT_BODY


class HeadTooLarge(Exception):
    """The request head exceeded a limit (never carries the bytes)."""

    def __init__(self, status: int) -> None:
        super().__init__("request head over a limit")
        self.status = status


# The oldest aiohttp whose parser and connection handler this module was checked against
# (pyproject.toml pins the same).
AIOHTTP_MIN = (3, 14)


def check_http_parser(
    version: str = aiohttp.__version__,
    parser: type = aiohttp.http_parser.HttpRequestParser,
) -> None:
    """Refuse to serve on aiohttp's pure-Python parser or an aiohttp older than the pin.

    The corpus and differential tests ran against aiohttp's C parser (llhttp); the
    Python one frames some requests differently. aiohttp falls back to it when
    AIOHTTP_NO_EXTENSIONS is set or its C extension is missing.
    """
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < AIOHTTP_MIN:
        raise StartupError(
            f"aiohttp {version} is older than {'.'.join(map(str, AIOHTTP_MIN))}, "
            "the oldest this proxy was checked against"
        )
    if parser is aiohttp.http_parser.HttpRequestParserPy:
        raise StartupError(
            "aiohttp runs its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS is set or its "
            "C extension is missing); zrproxy serves only on the C parser (llhttp)"
        )


def handler_limits(server: ServerConfig) -> dict[str, Any]:
    """aiohttp RequestHandler keyword arguments for the per-field limits."""
    return {
        # A request line longer than this is refused by us first (414); aiohttp applies
        # the same number to the request target alone.
        "max_line_size": server.max_request_line_bytes,
        "max_field_size": server.max_header_field_bytes,
        "max_headers": server.max_header_fields,
    }


class LimitedRequestHandler(RequestHandler):
    """aiohttp's connection handler with head limits, a head deadline and header
    values released when their request ends."""

    def __init__(self, manager: web.Server, *, server_config: ServerConfig, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        loop = kwargs["loop"]
        read_bufsize = kwargs.get("read_bufsize", DEFAULT_CHUNK_SIZE)
        decompress = kwargs.get("auto_decompress", True)
        # The same parser RequestHandler.__init__ builds, for a fresh one when idle.
        self._new_parser: Callable[[], Any] = lambda: HttpRequestParser(
            self,
            loop,
            read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=decompress,
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
        )
        self._max_line = server_config.max_request_line_bytes
        self._max_head = server_config.max_header_bytes
        self._header_timeout = server_config.header_timeout_s
        self._in_head = True  # the bytes arriving now belong to a request head
        self._head_bytes = 0
        self._line_bytes = 0
        self._line_done = False
        self._tail = b""  # the last 3 bytes of a head read, to find an end split by reads
        self._body: Any = None  # the payload of the last request whose head was parsed
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        # Our copies of parsed headers, by id of the proxy the request reads them through.
        self._owned_headers: dict[int, CIMultiDict[str]] = {}

    # --- the head deadline ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A new connection must bring a whole head within header_timeout_s; aiohttp's
        # keep-alive timer (armed here too) is for idle connections between requests.
        self._stop_keepalive_timer()
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._release_headers()
        self._body = None
        super().connection_lost(exc)

    def _stop_keepalive_timer(self) -> None:
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or not self._in_head:
            return
        if self._request_in_progress:
            # A pipelined head behind a response still being sent: its clock starts when
            # that response is done (a 408 now would land inside it).
            self._arm_head_timer()
            return
        if self._head_bytes or self._request_count:
            transport.write(_HEADER_TIMEOUT_RESPONSE)
        self.force_close()

    # --- the head's size ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._in_head and (self._body is None or self._body.is_eof()):
            self._start_head()
        if self._in_head and data:
            status = self._measure_head(data)
            if status:
                self._refuse(status)
                return
        before = self._request_count
        queued = len(self._messages)
        super().data_received(data)
        if self._request_count != before:
            self._own_headers(queued)
            self._cancel_head_timer()
            self._in_head = False
            self._head_bytes = self._line_bytes = 0
            self._line_done = False
            self._tail = b""
            self._body = self._messages[-1][1] if self._messages else None
            if self._body is not None and self._body.is_eof():
                self._start_head(arm=False)

    def _start_head(self, arm: bool = True) -> None:
        self._in_head = True
        self._body = None
        if arm:
            self._stop_keepalive_timer()
            self._arm_head_timer()

    def _measure_head(self, data: bytes) -> int:
        """0 while the head is within its limits, else the status to refuse it with."""
        end = data.find(_HEAD_END)
        if end < 0 and self._tail:
            joined = self._tail + data[:3]
            found = joined.find(_HEAD_END)
            if found >= 0:
                end = found - len(self._tail)
        counted = len(data) if end < 0 else end + len(_HEAD_END)
        if not self._line_done:
            newline = data.find(b"\n", 0, counted)
            self._line_bytes += counted if newline < 0 else newline
            self._line_done = newline >= 0
            if self._line_bytes > self._max_line:
                return 414
        self._head_bytes += counted
        if self._head_bytes > self._max_head:
            return 431
        self._tail = data[-3:] if end < 0 else b""
        if self._head_timer is None and end < 0:
            self._stop_keepalive_timer()
            self._arm_head_timer()
        return 0

    def _refuse(self, status: int) -> None:
        """Answer like one of aiohttp's parser errors, then close; read nothing more."""
        self._refused = True
        self._tail = b""
        self._cancel_head_timer()
        exc = HeadTooLarge(status)
        self._messages.append((_ErrInfo(status=status, exc=exc, message=""), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- header values die with their request ---------------------------------------------

    def _own_headers(self, first: int) -> None:
        messages = self._messages
        for index in range(first, len(messages)):
            message, payload = messages[index]
            if isinstance(message, _ErrInfo):
                continue
            owned: CIMultiDict[str] = CIMultiDict(message.headers)
            view = CIMultiDictProxy(owned)  # the proxy a request reads headers through
            self._owned_headers[id(view)] = owned
            messages[index] = (message._replace(headers=view, raw_headers=()), payload)

    async def _handle_request(self, request: web.BaseRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._handle_request(request, *args, **kwargs)
        finally:
            owned = self._owned_headers.pop(id(request.headers), None)
            if owned is not None:
                owned.clear()
            body = self._body
            if (
                self._parser is not None
                and not self._messages
                and self._head_bytes == 0
                and (body is None or body.is_eof())
                and not self._upgraded
            ):
                # Nothing of a next request has arrived: the parser's state is only the
                # finished request's head, which a fresh parser doesn't hold.
                self._parser = self._new_parser()

    def _release_headers(self) -> None:
        for owned in self._owned_headers.values():
            owned.clear()
        self._owned_headers.clear()
