"""The shape of an upstream's Server-Sent Events stream, checked as its bytes pass.

Never holds content: it keeps at most the last `_CONTEXT` bytes of the previous read
(what a line start split across reads needs), and drops them at the end.

# Goals
An SDK must never take a broken stream for a whole one. The SSE grammar lets a client
ignore what it does not understand: a line that is no known field is dropped, an event
with no data is not dispatched. So an upstream that sends garbage where content should
be gives a silently short answer. The check refuses, as the upstream's protocol error:
- a line that is not `data:`, `event:`, `id:`, `retry:`, a comment (`:`) or blank;
- a `data:` value that does not start as JSON does (`{` or `[`; OpenAI's `[DONE]` too);
- an event that names itself (`event:`) and ends with no `data:` line;
- an event (the bytes between blank lines) larger than `max_event_bytes`;
- a stream that ends, even at an event's end, without its API's last event: OpenAI's
  `data: [DONE]`, Anthropic's `message_stop`, the Responses API's `response.completed`,
  `response.incomplete` or `response.failed`, or an `error` event. Each API sends one as
  its last; without it the SDKs end the answer as if it were whole.
It checks the start of each data value, not the whole JSON (that would parse every
event on the hot path); an SDK raises its own JSON error for the rest.

# Strategy
One regular expression over each read finds the first bad line start; a line start
whose bytes are not all there yet (at the end of the read) is decided on the next read,
whose start is searched again with the previous read's last bytes in front. Two `rfind`s
find the last event boundary, for the event size. No per-line Python, and no copy of a
read on the way (only on a fault).
"""

from __future__ import annotations

import re

# The longest line prefix the check needs to see ("data: {").
_DECIDE = 7
# Bytes of the previous read kept in front of the next: a line start not yet decided,
# and an `event:` line with the blank line that would end it.
_CONTEXT = 128
_BAD = re.compile(
    rb"\n(?!data: ?[{\[]|event:|id:|retry:|:|\r?\n|[^\n]{0,%d}\Z)" % (_DECIDE - 1)
    # An event that begins with its name and ends with no data line.
    + rb"|\n\r?\nevent:[^\n]*\n(?:(?:event|id|retry)?:[^\n]*\n)*\r?\n"
)

# A last event, at a line start (a raw line break never occurs inside a data value).
_LAST = re.compile(
    rb"\n(?:data: ?\[DONE\]|event: ?(?:message_stop|response\.(?:completed|incomplete|failed)"
    rb"|error)\r?\n)"
)
_BLANK = re.compile(rb"\n\r?\n")
_ENDS = (b"\n\n", b"\n\r\n")  # a read that ends with an event's end
_JOIN_BELOW = 4096  # a read this small is searched joined to the previous read's tail


class SseCheck:
    """Feed it every body byte of one SSE response, in order; forward what it returns."""

    __slots__ = ("_context", "_event_bytes", "_held", "_last_seen", "_max", "broken")

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._context = b"\n\n"  # the last bytes seen; the stream starts as after an event
        self._held = b""  # a line start too short to decide, not forwarded yet
        self._event_bytes = 0
        self._last_seen = False  # the API's last event came
        self.broken = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to forward now: `data`, less a line start at its end too short to
        decide (held until the next read), plus the one held before. On a fault, sets
        `broken` and returns only the whole events before it."""
        context, held = self._context, self._held
        # Line starts at the seam need the previous read's tail in front. A small read
        # is searched joined to it (one search); a large one where it is (no copy).
        if len(data) <= _JOIN_BELOW:
            seam = context + data
            bad = _BAD.search(seam) is not None
        else:
            seam = context + data[:_CONTEXT]
            bad = _BAD.search(seam) is not None or _BAD.search(data) is not None
        if bad:
            return self._fault(context + data, len(context) - len(held))
        if not self._last_seen:
            self._last_seen = _LAST.search(seam) is not None or (
                len(data) > _JOIN_BELOW and _LAST.search(data) is not None
            )
        if self._event_bytes + len(data) > self._max:
            over = self._oversize(context, data)
            if over != -1:
                return self._fault(context + data, len(context) - len(held), over)
        elif data.endswith(_ENDS):
            # Most reads: whole events. The next read's line starts need only this blank
            # line in front.
            self._event_bytes = 0
            self._context = data[-3:]
            if held:
                self._held = b""
                return held + data
            return data
        else:
            end = _last_boundary(data, len(data))
            if not end:
                end = max(0, _last_boundary(seam, len(seam)) - len(context))
            self._event_bytes = len(data) - end if end else self._event_bytes + len(data)
        self._context = data[-_CONTEXT:] if len(data) >= _CONTEXT else seam[-_CONTEXT:]
        if data[-1] == 10:  # b"\n": nothing to hold back
            keep = 0
        else:
            line = data.rfind(b"\n")
            # A read that ends inside a line start (the regex excused it as undecided):
            # hold those few bytes back, so a bad line never reaches the client in part.
            keep = len(data) - line - 1 if line != -1 else len(held) + len(data)
        unsent = held + data if held else data
        if not keep or keep >= _DECIDE:
            self._held = b""
            return unsent
        self._held = unsent[len(unsent) - keep :]
        return unsent[: len(unsent) - keep]

    def _oversize(self, context: bytes, data: bytes) -> int:
        """Where (in context + data) the first event over the bound starts, or -1; else
        updates the size of the event in progress. Walks each event of the read: only
        when the bound may be crossed in it."""
        buf = context + data
        start = pos = len(context)
        size = self._event_bytes
        for blank in _BLANK.finditer(buf, start - 2):
            if blank.end() <= start:
                continue
            if size + blank.end() - pos > self._max:
                return pos
            size, pos = 0, blank.end()
        size += len(buf) - pos
        if size > self._max:
            return pos
        self._event_bytes = size
        return -1

    def ended_well(self) -> bool:
        """Whether the stream, now at its end, ended with a whole event, its API's last
        one having come."""
        context = self._context
        return (
            not self.broken
            and not self._held
            and self._last_seen
            and context.endswith((b"\n\n", b"\n\r\n"))
        )

    def close(self) -> None:
        self._context = self._held = b""

    def _fault(self, buf: bytes, unsent: int, before: int = -1) -> bytes:
        self.broken = True
        self._context = self._held = b""
        if before == -1:
            bad = _BAD.search(buf)
            assert bad is not None
            # +3: the blank line a missing-data match starts with belongs to the events
            # before it; a bad line's start can't be followed by one.
            before = bad.start() + 3
        return buf[unsent : max(unsent, _last_boundary(buf, before))]


def _last_boundary(buf: bytes, before: int) -> int:
    """Index just past the last blank line ending before `before` (0 if none)."""
    lf = buf.rfind(b"\n\n", 0, before)
    crlf = buf.rfind(b"\n\r\n", 0, before)
    if lf == -1 and crlf == -1:
        return 0
    return max(lf + 2 if lf != -1 else 0, crlf + 3 if crlf != -1 else 0)
