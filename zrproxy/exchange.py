"""One request on one upstream connection, as its handler sees it: waiting for the head and
the end, the body bytes that arrive before a sink is attached, the sink, the exchange's
deadline and the SSE check. The connection's protocol and framing are `zrproxy.http1`'s.

# Goals
No futures or tasks per chunk: the handler waits on an `Exchange` only for the head, for
the end, and when the client's side needs draining. Body bytes go from the connection's
read to the sink synchronously; before a sink is attached they are held, and past
`_EARLY_LIMIT` the connection stops reading, so an unread body waits in the kernel.

# Strategy
An `Exchange` has two halves. The public one is the handler's (`wait`, `attach`, `pause`,
`take_early`, `arm`, `abandon`, ...). The underscore one (`_head`, `_body`, `_end`,
`_fail`, and the `_conn`, `_sse` and `_max_event` slots) is the connection's: only
`http1.UpstreamConnection` calls or sets it (in `start`, its protocol and parser callbacks),
and the names stay private so a handler never does. The exchange sees its connection only through
`Connection`, so this module does not import `http1` (http1 imports it).

One deadline covers the whole exchange (`arm`): it is not moved per read, it looks at the
connection's last read when it fires.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from zrproxy.deadlines import Deadline, Deadlines
from zrproxy.outcomes import FailureKind
from zrproxy.sse import SseCheck

# While nobody consumes the body yet (between the head and the relay starting), reading
# pauses past this many bytes.
_EARLY_LIMIT = 256 * 1024
Sink = Callable[[bytes], None]


class Connection(Protocol):
    """What an exchange calls on the connection carrying it (`http1.UpstreamConnection`)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def last_read(self) -> float: ...

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def fail(self, kind: FailureKind) -> None: ...

    def abandon(self, exchange: Exchange) -> None: ...


class Exchange:
    """One request on one connection, as its handler sees it.

    The connection calls `_head`, `_body`, `_end` and `_fail`; the handler awaits `wait()`.
    `failure` is None or the kind of failure; `received` says whether any response byte
    arrived; `stale` that the connection was found closed before any byte of the request
    was written (the only case a request is tried again on the same upstream).
    """

    __slots__ = (
        "__weakref__",  # the tests check it is freed without the collector
        "_conn",
        "_deadlines",
        "_early",
        "_early_size",
        "_idle_s",
        "_max_event",
        "_sink",
        "_sse",
        "_timer",
        "_waiter",
        "content_length",
        "content_type",
        "ended",
        "failure",
        "headers",
        "received",
        "stale",
        "status",
    )

    def __init__(self, max_event_bytes: int = 0) -> None:
        self._conn: Connection | None = None
        # An SSE response's body is checked as it passes (zrproxy.sse); 0: not checked.
        self._max_event = max_event_bytes
        self._sse: SseCheck | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._timer: Deadline | None = None
        self._deadlines: Deadlines | None = None
        self._idle_s = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.content_length: int | None = None
        self.ended = False  # the response is complete and every body byte handed on
        self.failure: FailureKind | None = None
        self.received = False
        self.stale = False  # the connection was closed before we wrote a byte

    # --- for the handler ------------------------------------------------------------------

    @property
    def has_head(self) -> bool:
        return self.status != 0

    @property
    def finished(self) -> bool:
        return self.ended or self.failure is not None

    async def wait(self) -> None:
        """Until the next thing the handler must act on: the head, the end, a failure, or
        (with a sink attached) the client's side asking us to stop until it drains."""
        if self._conn is None:
            return
        waiter = self._waiter = self._conn.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    @property
    def early_size(self) -> int:
        """Body bytes held since the head, for a handler with no sink attached."""
        return self._early_size

    def peek_early(self) -> bytes:
        """The body bytes held so far, left in place for `take_early` or a sink."""
        early = self._early
        if len(early) > 1:
            early[:] = [b"".join(early)]
        return early[0] if early else b""

    def take_early(self) -> bytes:
        """The body bytes that arrived before a sink was attached."""
        early = self._early
        data = early[0] if len(early) == 1 else b"".join(early)
        early.clear()
        self._early_size = 0
        return data

    def attach(self, sink: Sink) -> None:
        """From now on body bytes go to `sink` as they are read."""
        self._sink = sink
        conn = self._conn
        if conn is not None:
            conn.resume()

    def pause(self) -> None:
        """The client's side is full: stop reading the upstream and wake the handler."""
        conn = self._conn
        if conn is not None:
            conn.pause()
        self._wake()

    def resume(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.resume()

    def abandon(self) -> None:
        """The handler is done with this exchange before its end: close the connection."""
        conn = self._conn
        self._detach()
        self._early.clear()
        if conn is not None:
            conn.abandon(self)

    def arm(self, deadlines: Deadlines, first_byte_s: float, idle_s: float) -> None:
        """One deadline for the whole exchange: first_byte_s until the head, then idle_s
        of silence. It is not moved per read: when it fires, it looks at the last read
        and, if there was one since, sets itself again for then + idle_s."""
        conn = self._conn
        if conn is None:
            return  # it ended already (nothing was sent)
        self._idle_s = idle_s
        self._deadlines = deadlines
        self._timer = deadlines.at(conn.loop.time() + first_byte_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        conn, deadlines = self._conn, self._deadlines
        if conn is None or deadlines is None:
            return
        now = conn.loop.time()
        if not self.status:
            conn.fail("timeout")
            return
        if conn.paused or self._sink is None:
            # The client's side holds us back (its own send timeout covers that), or the
            # handler has not started relaying yet: not the upstream's silence.
            due = now + self._idle_s
        else:
            due = conn.last_read + self._idle_s
            if due <= now:
                conn.fail("timeout")
                return
        self._timer = deadlines.at(due, self._on_timer)

    # --- from the connection --------------------------------------------------------------

    def _head(self) -> None:
        # From the head on, the deadline is idle_s of silence, not what is left of the
        # first-byte wait: moved only when that wait ends later (with the defaults it
        # doesn't, and the timer, when it fires, looks at the last read).
        timer, conn, deadlines = self._timer, self._conn, self._deadlines
        if timer is not None and conn is not None and deadlines is not None:
            due = conn.loop.time() + self._idle_s
            if timer.when() > due:
                timer.cancel()
                self._timer = deadlines.at(due, self._on_timer)
        self._wake()

    def _body(self, data: bytes) -> None:
        if self.failure is not None:
            return
        check = self._sse
        if check is not None:
            data = check.feed(data)
            if check.broken:
                # The whole events before the fault still go on; the rest is dropped.
                if data:
                    self._deliver(data)
                conn = self._conn
                if conn is not None:
                    conn.fail("protocol")
                return
            if not data:
                return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > _EARLY_LIMIT and self._conn is not None:
            self._conn.pause()
            self._wake()  # a handler waiting for the end without a sink (a 404's body)

    def _end(self) -> None:
        self.ended = True
        self._detach()
        self._wake()

    def _fail(self, kind: FailureKind) -> None:
        if self.failure is None and not self.ended:
            self.failure = kind
        self._detach()
        self._wake()

    def _detach(self) -> None:
        self._conn = None
        self._sink = None
        self._deadlines = None
        if self._sse is not None:
            self._sse.close()
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
