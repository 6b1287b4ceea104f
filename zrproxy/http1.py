"""HTTP/1.1 to an upstream: one connection's protocol, its response parser (llhttp, through
httptools) and the framing rules that decide whether the connection may carry another
request.

# Goals
The worst failure this proxy can have is one customer's bytes reaching another, and on a
pooled connection that happens exactly when we and the upstream disagree on where a
response ends. So a connection goes back to the pool only after a response whose end was
unambiguous: its Content-Length reached, or its last chunk and trailers, and not one byte
more. Anything else closes it, and the response it was carrying ends as failed.

# Strategy
llhttp parses (strictly: no leniencies) and rejects conflicting or invalid lengths, both
Content-Length and Transfer-Encoding, bad chunk sizes and bare LFs. We add what it allows:
a Transfer-Encoding other than exactly one `chunked`, a body delimited by closing the
connection, an oversized head, an upgrade, any response begun before our request left our
buffer, bytes after the end, and bytes on an idle connection.

llhttp skips CR/LF between messages, so "bytes after the end" made only of CR and LF would
pass it; any other byte after the end makes it start a message, which we refuse. A
response ends on a CR/LF run of known length (4 for a head and for a chunked body's last
chunk and trailers, `<not CR/LF>\r\n\r\n`; the body's own run for Content-Length), so
we count the run the stream ends with, across reads: the end was exact when the two
agree. Counting across reads keeps the verdict the same however the bytes were split.

Body bytes of one read are joined and handed on once (one client write per upstream
read) to the `zrproxy.exchange.Exchange` the request's handler waits on; the connection
calls its underscore half (`_head`, `_body`, `_end`, `_fail`).
"""

from __future__ import annotations

import asyncio
import select
from typing import Protocol

import httptools

from zrproxy.errors import forget
from zrproxy.exchange import Exchange
from zrproxy.outcomes import FailureKind
from zrproxy.sse import SseCheck

MAX_HEAD_BYTES = 64 * 1024  # status line, headers and trailers of one response
_JOIN_READS_BELOW = 64 * 1024  # smaller reads go to the client in one write
_CRLF = b"\r\n"
_TAIL = 64  # how far back from the end of a read the CR/LF run is looked for at first
# A head, and a chunked body's last chunk and trailers, end on `<not CR/LF>\r\n\r\n`.
_END_RUN = 4


class Owner(Protocol):
    """What a connection tells its pool (`pool.Pool`)."""

    def release(self, conn: UpstreamConnection) -> None: ...

    def lost(self, conn: UpstreamConnection) -> None: ...


class _Anomaly(Exception):
    """Raised inside a parser callback to stop parsing a response we refuse."""


class UpstreamConnection(asyncio.Protocol):
    """One pooled HTTP/1.1 connection to an upstream; carries one exchange at a time."""

    def __init__(self, pool: Owner, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        # The parser holds our callbacks, so the two form a cycle: cut on close, so a closed
        # connection is freed by reference counting, not left to the collector.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._exchange: Exchange | None = None
        self.idle_since = 0.0
        # How long the upstream said it keeps this connection idle (its `Keep-Alive:
        # timeout=N`, less a margin); None: it did not say.
        self.idle_limit_s: float | None = None
        self.expires = 0.0  # loop time after which the pool no longer hands it out
        self.last_read = 0.0
        self.requests = 0  # exchanges started on this connection
        self.closed = False
        self._paused = False
        self._poller: select.poll | None = None  # for peer_gone, made on first use
        self._pieces: list[bytes] = []
        self._run = 0  # how many CR/LF bytes the stream read so far ends with
        # per response
        self._head_bytes = 0
        self._te_count = 0
        self._te_chunked = False
        self._content_length: int | None = None
        self._interim = False
        self._had_interim = False
        self._head_fed = 0  # bytes fed while the head was incomplete
        self._body_run = 0  # the CR/LF run the body so far ends with
        self._body_other = False  # the body so far has a byte other than CR/LF
        self._complete = False
        self._keep_alive = False
        self._no_body = False

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            forget(exc)
        self.closed = True
        self.transport = None
        self._parser = None
        self._poller = None  # its fd number may be reused from now on
        exchange = self._exchange
        if exchange is not None:
            # Our request was written: even with no response byte, the upstream may have
            # acted on it, so this is its failure ("reset"), never a reason to send again.
            self._exchange = None
            exchange._fail("reset")
        self._pool.lost(self)

    def eof_received(self) -> bool:
        return False  # close; connection_lost ends any exchange in progress

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            self.close()  # bytes on an idle connection: not ours to read, never reused
            return
        if not exchange.received:
            exchange.received = True
            transport = self.transport
            # The upstream answered before our request left our buffer: whatever it is
            # answering, it is not all of what we sent.
            # llhttp skips CR/LF before a status line; others don't: not ours to guess.
            if (transport is not None and transport.get_write_buffer_size()) or data[0] != 72:
                self._refuse(exchange)  # 72: "H"
                return
        self.last_read = self.loop.time()
        parser = self._parser
        if parser is None:
            return
        pieces = self._pieces
        self._run = _crlf_run(data, self._run)
        head_pending = not exchange.status
        if head_pending:
            # httptools hands on a header only once it is whole: count what we feed.
            self._head_fed += len(data)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # llhttp's messages are fixed strings; the traceback holds this frame (and
            # `data`) and dies here.
            forget(exc)
            self._refuse(exchange)
            return
        if head_pending and not exchange.status and self._head_fed > MAX_HEAD_BYTES:
            self._refuse(exchange)
            return
        if pieces:
            if len(pieces) == 1 or len(data) > _JOIN_READS_BELOW:
                # A large read goes on piece by piece: joining would hold a third copy
                # of it (the read, llhttp's pieces, the join) while the client is slow.
                for body in pieces:
                    exchange._body(body)
            else:
                body = b"".join(pieces)
                exchange._body(body)
            pieces.clear()
            body = b""
        if self._complete and self._exchange is exchange:
            check = exchange._sse
            if not self._ends_exactly() or (check is not None and not check.ended_well()):
                # (An event stream that ended inside an event, or with none, is cut short:
                # SDKs drop a last event without its blank line.)
                self._refuse(exchange)
                return
            self._exchange = None
            exchange._end()
            if self._keep_alive and not self.closed:
                self._pool.release(self)
            else:
                self.close()

    # --- llhttp callbacks (httptools calls these by name) ---------------------------------

    def on_message_begin(self) -> None:
        if self._complete or self._exchange is None:
            raise _Anomaly  # a second response to one request
        self._head_bytes = 0
        self._te_count = 0
        self._te_chunked = False
        self._content_length = None
        self.idle_limit_s = None
        self._body_run = 0
        self._body_other = False
        self._exchange.headers.clear()

    def on_status(self, status: bytes) -> None:
        self._head_bytes += len(status) + 16
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Anomaly

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _Anomaly
        exchange = self._exchange
        if exchange is None or exchange.status:
            return  # a trailer: dropped
        lower = name.lower()
        if lower == b"transfer-encoding":
            self._te_count += 1
            self._te_chunked = value.lower() == b"chunked"
        elif lower == b"content-length":
            self._content_length = int(value)  # llhttp let through digits only
        elif lower == b"content-type":
            exchange.content_type = value
        elif lower == b"keep-alive":
            self.idle_limit_s = _idle_limit(value)
        exchange.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        if exchange is None:
            raise _Anomaly
        parser = self._parser
        if parser is None:
            raise _Anomaly
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _Anomaly  # we never ask to upgrade
            self._interim = True  # 100/102/103: skipped, the real response follows
            self._had_interim = True
            exchange.headers.clear()
            exchange.content_type = b""
            return
        if self._te_count:
            if self._te_count > 1 or not self._te_chunked:
                raise _Anomaly  # only exactly one "chunked" is unambiguous
        elif self._content_length is None and not (self._no_body or status in (204, 304)):
            raise _Anomaly  # a body delimited by closing: its end can't be told from a cut
        # After an interim response llhttp skips CR/LF before the next head, where other
        # parsers may not: such a connection is not reused.
        self._keep_alive = (
            parser.should_keep_alive()
            and parser.get_http_version() == "1.1"
            and not self._had_interim
        )
        exchange.status = status
        exchange.content_length = None if self._te_count else self._content_length
        if exchange._max_event and _is_sse(exchange.content_type):
            exchange._sse = SseCheck(exchange._max_event)
        exchange._head()
        if self._no_body:
            self._complete = True
            self._keep_alive = False  # llhttp would read the body the head announces

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)
        if not self._te_count:  # only a Content-Length body's own run is needed
            run = _crlf_run(body, self._body_run)
            if run < len(body):
                self._body_other = True
            self._body_run = run

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True

    # --- for the pool and the exchange ----------------------------------------------------

    def start(
        self, exchange: Exchange, head: bytes, body: bytes, no_body: bool, now: float
    ) -> None:
        """Send one request; the response goes to `exchange`."""
        exchange._conn = self
        self._exchange = exchange
        self.requests += 1
        self._complete = False
        self._interim = False
        self._had_interim = False
        self._head_fed = 0
        self._no_body = no_body
        self.last_read = now
        transport = self.transport
        if transport is None or transport.is_closing():
            self._exchange = None
            exchange.stale = True  # nothing was sent: a fresh connection may carry it
            exchange._fail("reset")
            return
        if len(body) < 16384:
            transport.write(head + body)
        else:
            transport.writelines((head, body))

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self._paused

    def fail(self, kind: FailureKind) -> None:
        """End the exchange in progress with `kind` and close (deadlines use this)."""
        exchange = self._exchange
        self._exchange = None
        if exchange is not None:
            exchange._fail(kind)
        self.close()

    def abandon(self, exchange: Exchange) -> None:
        if self._exchange is exchange:
            self._exchange = None
        self.close()

    def peer_gone(self) -> bool:
        """Whether this idle connection can no longer carry a request: closed, or the
        upstream closed or wrote to it and our loop has not read that yet. One poll(2)
        with no wait (as urllib3 and httpcore check a pooled socket): an idle connection
        has nothing to read unless its peer is done with it (for TLS, a close_notify)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return True
        poller = self._poller
        if poller is None:
            # Made once per connection: the socket object uvloop builds for
            # get_extra_info, and the poll object, cost more than the poll itself.
            sock = transport.get_extra_info("socket")
            if sock is None:
                return False
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        transport = self.transport
        self.closed = True
        if transport is not None and not transport.is_closing():
            transport.abort()  # nothing of ours is left to send; don't linger

    # --- framing --------------------------------------------------------------------------

    def _refuse(self, exchange: Exchange) -> None:
        self._pieces.clear()
        self._exchange = None
        exchange._fail("protocol")
        self.close()

    def _ends_exactly(self) -> bool:
        """Whether the response that just completed ended at the last byte read.

        Only CR/LF can follow the end unnoticed by llhttp (see the module docstring), so
        the stream must end on exactly the CR/LF run the response itself ends with.
        """
        if self._content_length and not self._te_count and not self._no_body:
            # A body of only CR/LF continues the head's run.
            expected = self._body_run if self._body_other else _END_RUN + self._body_run
        else:
            expected = _END_RUN
        return self._run == expected


def _idle_limit(value: bytes) -> float | None:
    """From a `Keep-Alive: timeout=N, max=M` header: how long to keep the connection idle,
    a little under N (by min(1 s, N/2)) so our next request doesn't race its close."""
    for part in value.split(b","):
        name, _, number = part.partition(b"=")
        if name.strip().lower() == b"timeout":
            try:
                timeout = float(number.strip())
            except ValueError:
                return None
            if timeout != timeout:  # NaN
                return None
            return max(0.0, timeout - min(1.0, timeout / 2))
    return None


def _is_sse(content_type: bytes) -> bool:
    return content_type.partition(b";")[0].strip().lower() == b"text/event-stream"


def _crlf_run(data: bytes, before: int) -> int:
    """The length of the CR/LF run `data` ends with, counting `before` (the run the
    stream ended with until now) when `data` is nothing but CR/LF."""
    if data[-1] not in _CRLF:
        return 0
    tail = data[-_TAIL:]
    run = len(tail) - len(tail.rstrip(_CRLF))
    if run < len(tail):
        return run
    if len(data) == len(tail):
        return before + run
    run = len(data) - len(data.rstrip(_CRLF))  # a long run: rare, look at all of it
    return run if run < len(data) else before + run
