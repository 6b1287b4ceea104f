"""The API listener's HTTP/1.1 server: one protocol per client connection on llhttp
(httptools), its input limits and timers, keep-alive, and the connection cap.

# Goals
Strict framing: llhttp runs with no leniencies, and we refuse what it lets through that
another parser could frame differently (any Transfer-Encoding but exactly one
`chunked`). A request llhttp refuses gets a fixed 400 and the connection is closed;
nothing of it reaches a handler. A request line past `max_request_line_bytes` gets 414,
a head past `max_header_bytes`, a field past `max_header_field_bytes` or more than
`max_header_fields` fields gets 431, each with the connection closed. A head must arrive
within `header_timeout_s` (so must the first request of a new connection); idle between
requests, a connection is closed after `keepalive_timeout_s`. Requests on one connection
are handled one at a time, in order; a client that leaves cancels its handler.

# Strategy
We count a head's bytes before llhttp sees them (httptools buffers a field until it is
whole), so an oversized head is refused before it is buffered: one `find(b"\\r\\n\\r\\n")`
per read while a head is arriving, body bytes never scanned. Bytes of a pipelined head
that arrive in the same read as the end of the request before it are not counted (the
per-field and field-count limits still hold, and a read is bounded).

Reading continues while a request is handled, so a client's close is seen at once (and
cancels the handler); it pauses while a pipelined request waits behind the one in flight,
and while the body buffered for a handler is over `_BODY_BUFFER` bytes.

A response is written by the handler's return value: a whole `Response` in one write,
or a `StreamingResponse` the handler has already started (its end is written here).

Nothing of a request outlives its response: `Request.release()` drops its header values
and unread body, and httptools keeps no field once it has handed it to `on_header`.
Parse errors are answered with fixed bodies, never the bytes that failed; llhttp's
reason and the traceback (which holds the read) are dropped where they are caught.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from zrproxy.config import ServerConfig
from zrproxy.dialects import error_body
from zrproxy.errors import (
    HeadTimeout,
    HeadTooLarge,
    InternalError,
    MalformedHttp,
    ProxyError,
    TransferCodingNotImplemented,
    UriTooLong,
    forget,
)
from zrproxy.headers import RequestHeaders
from zrproxy.request import Request
from zrproxy.response import Response, StreamingResponse, render_head

log = logging.getLogger("zrproxy")

Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]

_HEAD_END = b"\r\n\r\n"
# Body bytes buffered for a handler before reading pauses.
_BODY_BUFFER = 256 * 1024
# After an answer sent before the whole body was read, how long the rest is read and
# dropped before the connection closes.
_LINGER_S = 1.0
_METHODS = {m: m.decode("ascii") for m in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE")}


def _refusal(error: ProxyError) -> bytes:
    body = error_body("openai", error)
    head = render_head(
        b"1.1", error.status, [(b"Content-Type", b"application/json")], len(body), False, False
    )
    return head + body


# RFC 9110 token (a coding name) and what may follow its ";" (parameters, possibly none).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")
_PARAMS = re.compile(rb"[ \t!#$%&'*+.^_`|~0-9a-z;=-]*")

_REFUSALS = {
    400: MalformedHttp(),
    408: HeadTimeout(),
    414: UriTooLong(),
    431: HeadTooLarge(),
    500: InternalError(),
    501: TransferCodingNotImplemented(),
}


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a request we refuse."""

    def __init__(self, status: int) -> None:
        super().__init__("refused")
        self.status = status


class ApiServer:
    """The protocol factory of the API listener: counts connections (pausing accepting
    at `max_connections`), and closes them on drain and stop."""

    def __init__(
        self,
        handler: Handler,
        server_config: ServerConfig,
        max_connections: int,
        on_bad_request: Callable[[], None],
    ) -> None:
        self.handler = handler
        self.server_config = server_config
        self.max_connections = max_connections
        self.on_bad_request = on_bad_request
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self.on_full: Callable[[], None] | None = None  # the listener pauses accepting
        self.on_room: Callable[[], None] | None = None  # ...and resumes
        self._full = False

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def __call__(self) -> HttpProtocol:
        return HttpProtocol(self)

    def connection_made(self, conn: HttpProtocol) -> None:
        self.connections.add(conn)
        if len(self.connections) >= self.max_connections and self.on_full is not None:
            self._full = True
            self.on_full()

    def connection_lost(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        if self._full and len(self.connections) < self.max_connections:
            self._full = False
            if self.on_room is not None:
                self.on_room()

    def drain(self) -> None:
        """No more keep-alive: idle connections close now, busy ones after their
        response."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_when_idle()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Close every connection and wait (up to `timeout_s`) for their handlers."""
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_begun",
        "_body_paused",
        "_config",
        "_content_length",
        "_drain_waiters",
        "_encoding",
        "_error",
        "_expect",
        "_fields",
        "_head_bytes",
        "_head_timer",
        "_idle_since",
        "_in_head",
        "_keepalive_timer",
        "_line_bytes",
        "_line_done",
        "_loop",
        "_lowered",
        "_parser",
        "_parsing",
        "_queue",
        "_raw",
        "_reading_paused",
        "_requests",
        "_server",
        "_tail",
        "_te_names",
        "_te_params",
        "_url",
        "current",
        "task",
        "transport",
        "writing_paused",
    )

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._config = server.server_config
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # The parser holds our callbacks, a cycle cut in connection_lost.
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False
        self._body_paused = False
        self.current: Request | None = None  # the request being handled
        self.task: asyncio.Task[None] | None = None
        self._begun = False  # the current request's handler has begun to run
        self._parsing: Request | None = None  # the request whose body is arriving
        self._queue: deque[Request] = deque()  # pipelined, waiting for the current one
        self._error = 0  # a refusal to send once the response in flight is done
        self._requests = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the connection went idle; 0.0 while not idle
        # the head being read
        self._in_head = True
        self._head_bytes = 0
        self._line_bytes = 0
        self._line_done = False
        self._tail = b""  # the last 3 bytes of a head read, to find an end split by reads
        self._url: list[bytes] = []
        self._raw: list[tuple[bytes, bytes]] = []
        self._lowered: list[bytes] = []  # the names of _raw, lower-cased
        self._fields = 0
        # Transfer-Encoding: the coding names in order (tokens only, e.g. b"gzip"); -1 in
        # _te_names' place (None) once a value is no list of codings.
        self._te_names: list[bytes] | None = []
        self._te_params = False
        self._content_length: int | None = None
        self._expect = False
        self._encoding = b""

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._server.connection_made(self)
        if self._server.draining:
            self.abort()
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            forget(exc)
        self.transport = None
        self._parser = None
        self._cancel_timers()
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client left: its upstream request goes too
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("client gone"))
        self._drain_waiters.clear()
        parsing = self._parsing
        if parsing is not None and parsing is not self.current:
            parsing.release()
        for request in self._queue:
            request.release()
        self._queue.clear()
        self._parsing = None
        self._raw = []
        self._lowered = []
        self._url.clear()
        self._server.connection_lost(self)

    def eof_received(self) -> bool:
        return False  # close: a client that half-closes has left

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionError("client gone")
        if not self.writing_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._error:
            return  # refused, or lingering before the close: read and dropped
        self._idle_since = 0.0
        if self._in_head:
            status = self._measure_head(data)
            if status:
                self._refuse(status)
                return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400)  # we never upgrade (refused in on_headers_complete already)
        except _Refused as exc:
            status = exc.status
            forget(exc)
            self._refuse(status)
        except httptools.HttpParserError as exc:
            context = exc.__context__
            status = context.status if isinstance(context, _Refused) else 400
            forget(exc)
            self._refuse(status)

    # --- llhttp callbacks (httptools calls these by name) ---------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url.clear()
        self._raw = []
        self._lowered = []
        self._fields = 0
        self._te_names = []
        self._te_params = False
        self._content_length = None
        self._expect = False
        self._encoding = b""

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self._config.max_header_fields:
            raise _Refused(431)
        if len(name) + len(value) > self._config.max_header_field_bytes:
            raise _Refused(431)
        if self._parsing is not None:
            return  # a trailer: counted, then dropped
        lower = name.lower()
        if lower == b"transfer-encoding":
            # Only exactly one "chunked" is unambiguous (llhttp accepts "gzip, chunked",
            # and other parsers read such framings another way): see `_transfer_verdict`.
            names = self._te_names
            if names is not None:
                for element in value.lower().split(b","):
                    coding, semicolon, params = element.partition(b";")
                    coding = coding.strip(b" \t")
                    if not _TOKEN.fullmatch(coding) or not _PARAMS.fullmatch(params):
                        self._te_names = None
                        break
                    names.append(coding)
                    self._te_params |= bool(semicolon)
        elif lower == b"content-length":
            self._content_length = int(value)  # llhttp let through digits only, once
        elif lower == b"content-encoding":
            # Two of them: a coding we would have to guess the order of; refused on read.
            self._encoding = b"?" if self._encoding else value.strip(b" \t").lower()
        elif lower == b"expect":
            self._expect = value.strip(b" \t").lower() == b"100-continue"
        self._raw.append((name, value))
        self._lowered.append(lower)

    def _transfer_verdict(self) -> int:
        """0 for a request framed by Content-Length or by exactly one plain `chunked`;
        501 for well-formed transfer codings ending in one `chunked` (RFC 9112 6.1: a
        coding we do not decode, and no Content-Length beside it); 400 for the rest:
        a value that is no list of codings, `chunked` twice or not last (RFC 9112 6.3)."""
        names = self._te_names
        if names is None:
            return 400
        if not names or (names == [b"chunked"] and not self._te_params):
            return 0
        if names.count(b"chunked") == 1 and names[-1] == b"chunked":
            return 400 if self._content_length is not None else 501
        return 400

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is None:
            return
        verdict = self._transfer_verdict()
        chunked = bool(self._te_names)  # verdict 0: [b"chunked"] or no Transfer-Encoding
        self._te_names = []  # fragments of a header value: none outlives its head
        if verdict:
            raise _Refused(verdict)
        if parser.should_upgrade():
            # `Connection: upgrade` with `Upgrade`, or CONNECT: llhttp would hand the rest
            # of the stream over unparsed (a body it announced included). We never upgrade.
            raise _Refused(400)
        self._in_head = False
        self._head_bytes = self._line_bytes = 0
        self._line_done = False
        self._tail = b""
        self._cancel_head_timer()
        url = self._url
        target = url[0] if len(url) == 1 else b"".join(url)
        url.clear()
        method = parser.get_method()
        version = parser.get_http_version()
        request = Request(
            self,
            _METHODS.get(method) or method.decode("ascii"),
            target.decode("utf-8", "surrogateescape"),
            b"1.0" if version == "1.0" else b"1.1",
            RequestHeaders(self._raw, self._lowered),
            None if chunked else self._content_length,
            chunked,
            parser.should_keep_alive(),
            self._expect,
            self._encoding,
        )
        self._raw = []
        self._lowered = []
        self._requests += 1
        if not request.eof:
            self._parsing = request
        if self.current is None and not self._queue:
            self._start(request)
        else:
            self._queue.append(request)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None:
            buffered = request.feed(body)
            if buffered > _BODY_BUFFER and not self._body_paused:
                self._body_paused = True
                self._pause_reading()

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            self._parsing = None
            request.end()
        self._in_head = True

    # --- for the request ------------------------------------------------------------------

    def body_taken(self, size: int) -> None:
        if self._body_paused:
            self._body_paused = False
            self._update_reading()

    # --- requests, one at a time ----------------------------------------------------------

    def _start(self, request: Request) -> None:
        self.current = request
        self._begun = False
        self.task = self._loop.create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        self._begun = True
        response: Response | StreamingResponse | None
        try:
            response = await self._server.handler(request)
        except asyncio.CancelledError:
            response = None  # the client left, or the server is stopping
        except Exception as exc:
            log.error("request handling failed (%s)", type(exc).__name__)
            forget(exc)
            response = None
            if not request.started:
                self._write_refusal(500)
        self._finish(request, response)

    def _finish(self, request: Request, response: Response | StreamingResponse | None) -> None:
        transport = self.transport
        close = (
            transport is None
            or transport.is_closing()
            or response is None
            or response.close
            or not request.keep_alive
            or self._server.draining
            or self._error != 0
            # the handler did not read the whole body: what follows it is not a head
            or not request.eof
        )
        if isinstance(response, Response) and transport is not None and not transport.is_closing():
            body = response.body
            head = render_head(
                request.version, response.status, response.headers, len(body), False, not close
            )
            if request.method == "HEAD" or response.status in (204, 304):
                transport.write(head)
            elif len(body) < 16384:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
        elif isinstance(response, StreamingResponse):
            if not response.prepared:
                close = close or not response.start(request, b"", end=True)
            else:
                response.finish()
            close = close or response.close
        if request is self._parsing:
            self._parsing = None
        request.release()
        self.current = None
        self.task = None
        if transport is None:
            return
        if close:
            if self._error > 0:
                self._write_refusal(self._error)
            if request.eof:
                self._close()
            else:
                self._linger()
            return
        if self._queue:
            self._start(self._queue.popleft())
            self._update_reading()
            return
        self._update_reading()
        if self._in_head and not self._head_bytes:
            self._arm_keepalive_timer()

    def close_when_idle(self) -> None:
        if self.current is None and self.transport is not None:
            self._close()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.abort()
        task = self.task
        if task is not None and not task.done():
            task.cancel()

    def _close(self) -> None:
        self._cancel_timers()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _linger(self) -> None:
        """Close after a response that did not wait for the whole body: end our side,
        then read and drop what the client still sends for up to `_LINGER_S` (closing
        with unread bytes would reset the connection, and the client could lose our
        answer)."""
        transport = self.transport
        if transport is None:
            return
        self._cancel_timers()
        self._error = self._error or -1
        if transport.can_write_eof():
            transport.write_eof()
        self._keepalive_timer = self._loop.call_later(_LINGER_S, self.abort)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    # --- refusals -------------------------------------------------------------------------

    def _refuse(self, status: int) -> None:
        """Answer `status` with a fixed body and close; read nothing more."""
        self._error = status
        self._cancel_head_timer()
        self._tail = b""
        self._url.clear()
        self._raw = []
        self._lowered = []
        parsing = self._parsing
        if parsing is not None:
            self._parsing = None
            parsing.end(broken=True)
            if parsing is self.current:
                if self._begun:
                    # Its handler reads the break (InvalidRequest) and answers; we close.
                    self._error = -1
                else:
                    # Broken in the read that brought its head: refused like a head,
                    # before its handler ran at all (a task cancelled before its first
                    # step never runs its coroutine).
                    task = self.task
                    if task is not None:
                        task.cancel()
                    self.current = self.task = None
                    parsing.release()
        for request in self._queue:
            request.release()
        self._queue.clear()
        if self._error < 0:
            return
        self._server.on_bad_request()
        if self.current is None:
            self._write_refusal(status)
            self._close()
        else:
            self._pause_reading()

    def _write_refusal(self, status: int) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_REFUSAL_BYTES[status])

    # --- reading --------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        want_paused = bool(self._queue) or self._body_paused or self._error != 0
        if self._reading_paused and not want_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    # --- the head's size and time ---------------------------------------------------------

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
            if self._line_bytes > self._config.max_request_line_bytes:
                return 414
        self._head_bytes += counted
        if self._head_bytes > self._config.max_header_bytes:
            return 431
        self._tail = data[-3:] if end < 0 else b""
        if self._head_timer is None and end < 0:
            self._arm_head_timer()
        return 0

    def _arm_head_timer(self) -> None:
        self._idle_since = 0.0
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(
                self._config.header_timeout_s, self._head_timed_out
            )

    def _cancel_head_timer(self) -> None:
        timer = self._head_timer
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    # The keep-alive timer is set once and not moved per request (setting and cancelling
    # a timer per request cost 8% of the server's CPU): when it fires, it looks at when
    # the connection went idle, and sets itself again for then + keepalive_timeout_s.

    def _arm_keepalive_timer(self) -> None:
        loop = self._loop
        self._idle_since = now = loop.time()
        if self._keepalive_timer is None:
            self._keepalive_timer = loop.call_at(
                now + self._config.keepalive_timeout_s, self._keepalive_expired
            )

    def _keepalive_expired(self) -> None:
        self._keepalive_timer = None
        since = self._idle_since
        if not since or self.current is not None or self.transport is None:
            return  # not idle: armed again when it is
        due = since + self._config.keepalive_timeout_s
        if due <= self._loop.time():
            self.close_when_idle()
        else:
            self._keepalive_timer = self._loop.call_at(due, self._keepalive_expired)

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        timer = self._keepalive_timer
        if timer is not None:
            timer.cancel()
            self._keepalive_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or not self._in_head:
            return
        if self.current is not None:
            # A pipelined head behind a response still being sent: its clock starts when
            # that response is done (a 408 now would land inside it).
            self._arm_head_timer()
            return
        if self._head_bytes or self._requests:
            self._write_refusal(408)
        self._close()


_REFUSAL_BYTES = {status: _refusal(error) for status, error in _REFUSALS.items()}
