"""Token usage read out of responses as they pass through, without holding them back.

# Goals
Count prompt and completion tokens from the upstream's own usage objects, for OpenAI-
and Anthropic-style streams and plain JSON bodies, at the cost of one `bytes.find` per
chunk; never delay a content byte; keep no content once the response ends.

# Strategy
In JSON a raw `"usage":` can only be an object key: inside a string value the quotes are
escaped. So a byte search finds every usage object without parsing the body; only the
small object itself is decoded. The last occurrence of each field wins (Anthropic
repeats cumulative counts in message_delta).

When we asked an OpenAI stream for usage the client did not ask for, the final usage
event must not reach the client. That event carries no content ("choices":[]), so the
tap may hold back the *start* of an event until it can tell which kind it is: an event
whose bytes show `"choices":[{` is a content event and is forwarded at once.
"""

from __future__ import annotations

import orjson

_KEY = b'"usage":'
_KEY_TAIL = len(_KEY) - 1
_OBJECT = b'"usage":{'
_OBJECT_SPACED = b'"usage": {'
_EVENT_END = b"\n\n"
_CONTENT_EVENT = b'"choices":[{'
# An event start longer than this is forwarded even if undecided (never hold much).
_MAX_HELD = 4096
_MAX_USAGE_OBJECT = 2048
# Top-level usage fields, and the two nested ones: OpenAI's cached input and reasoning
# output (Chat Completions' *_tokens_details and the Responses API's).
_FIELDS = (
    "prompt_tokens",
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "completion_tokens",
    "output_tokens",
)
_DETAILS = {
    "prompt_tokens_details": ("cached_tokens", "cached"),
    "input_tokens_details": ("cached_tokens", "cached"),
    "completion_tokens_details": ("reasoning_tokens", "reasoning"),
    "output_tokens_details": ("reasoning_tokens", "reasoning"),
}
# The token types counted, disjoint so that their sum is what the upstream billed.
TOKEN_TYPES = ("prompt", "cache_read", "cache_creation", "completion", "reasoning")


def _object_end(buf: bytes, start: int) -> int:
    """Index just past the JSON object starting at `start` (usage holds no strings with
    braces), or -1 if it is not complete in `buf`. Walks from brace to brace with
    `bytes.find`/`count` (C), not byte by byte."""
    stop = min(len(buf), start + _MAX_USAGE_OBJECT)
    pos = start
    while True:
        end = buf.find(b"}", pos, stop)
        if end == -1:
            return -1 if stop == len(buf) else len(buf)  # too long: give up on this object
        if buf.count(b"{", start, end) == buf.count(b"}", start, end) + 1:
            return end + 1
        pos = end + 1


class UsageTap:
    """Feed it every chunk in order; read `tokens()` at the end."""

    __slots__ = ("_after_newline", "_counts", "_held", "_mid_event", "_pending", "_strip", "_tail")

    def __init__(self, strip_usage_event: bool = False) -> None:
        self._strip = strip_usage_event
        self._counts: dict[str, int] = {}
        self._tail = b""  # last bytes of the previous chunk, for a key split across chunks
        self._pending = b""  # an unfinished usage object (content-free)
        self._held = b""  # strip mode: an undecided event start (content-free)
        self._mid_event = False  # strip mode: inside a content event being forwarded
        self._after_newline = False  # ... and the last forwarded byte was a newline

    def tokens(self) -> dict[str, int]:
        """Tokens by type (TOKEN_TYPES), each counted once:
        - prompt: input not read from a cache. OpenAI's prompt/input_tokens include their
          cached_tokens, which are taken out; Anthropic's input_tokens already exclude
          its cache tokens.
        - cache_read: OpenAI's cached_tokens, Anthropic's cache_read_input_tokens.
        - cache_creation: Anthropic's cache_creation_input_tokens.
        - completion: output other than reasoning (OpenAI's reasoning_tokens are part of
          its completion/output_tokens, and are taken out).
        - reasoning: OpenAI's reasoning_tokens.
        """
        c = self._counts
        cached, reasoning = c.get("cached", 0), c.get("reasoning", 0)
        prompt = max(c.get("prompt_tokens", 0), c.get("input_tokens", 0))
        output = max(c.get("completion_tokens", 0), c.get("output_tokens", 0))
        return {
            "prompt": max(prompt - cached, 0),
            "cache_read": cached + c.get("cache_read_input_tokens", 0),
            "cache_creation": c.get("cache_creation_input_tokens", 0),
            "completion": max(output - reasoning, 0),
            "reasoning": reasoning,
        }

    def feed(self, data: bytes) -> bytes:
        """Scan `data` for usage; return the bytes to forward (all of them unless stripping)."""
        if not data:
            return data
        if self._strip:
            return self._feed_stripping(data)
        self._scan(data)
        return data

    def flush(self) -> bytes:
        """Bytes still held back when the upstream ends (an event cut short)."""
        held, self._held = self._held, b""
        return held

    def close(self) -> None:
        """Drop every byte kept between chunks."""
        self._tail = self._pending = self._held = b""

    # --- scanning ---------------------------------------------------------------------

    def _scan(self, data: bytes) -> bool:
        """Record every usage object in `data`; True if one was found."""
        found = False
        if self._pending:
            data = self._pending + data
            self._pending = b""
        elif self._tail:
            joined = self._tail + data[:_KEY_TAIL]
            split = joined.find(_KEY)
            if split != -1:
                data = self._tail[split:] + data
        pos = data.find(_KEY)
        while pos != -1:
            start = pos + len(_KEY)
            while start < len(data) and data[start] in b" \t\r\n":
                start += 1
            if start == len(data):
                self._pending = data[pos:]
                return found
            if data[start] == 0x7B:
                end = _object_end(data, start)
                if end == -1:
                    self._pending = data[pos:]
                    return found
                self._record(data[start:end])
                found = True
                start = end
            pos = data.find(_KEY, start)
        if len(data) < _KEY_TAIL:
            data = self._tail + data
        self._tail = data[-_KEY_TAIL:]
        return found

    def _scan_event(self, event: bytes) -> bool:
        found = self._scan(event)
        self._tail = self._pending = b""
        return found

    def _record(self, raw: bytes) -> None:
        try:
            usage = orjson.loads(raw)
        except orjson.JSONDecodeError:
            usage = None
        if not isinstance(usage, dict):
            return
        for name in _FIELDS:
            value = usage.get(name)
            if type(value) is int and value >= 0:
                self._counts[name] = value
        for name, (field, counted_as) in _DETAILS.items():
            details = usage.get(name)
            value = details.get(field) if isinstance(details, dict) else None
            if type(value) is int and value >= 0:
                self._counts[counted_as] = value

    # --- strip mode: OpenAI stream whose usage event we asked for ---------------------

    def _feed_stripping(self, data: bytes) -> bytes:
        if self._held:
            data = self._held + data
            self._held = b""
        if self._mid_event:
            # The blank line that ends the event may straddle the two chunks.
            if self._after_newline and data[:1] == b"\n":
                cut = 1
            else:
                end = data.find(_EVENT_END)
                if end == -1:
                    self._after_newline = data.endswith(b"\n")
                    return data
                cut = end + 2
            self._mid_event = False
            head, data = data[:cut], data[cut:]
            return head + self._feed_stripping(data) if data else head
        # Every chunk of such a stream says "usage":null; only an object needs cutting.
        if _OBJECT in data or _OBJECT_SPACED in data:
            return self._cut_usage_events(data)
        return self._forward_complete(data)

    def _forward_complete(self, data: bytes) -> bytes:
        """`data` minus an unfinished event at its end that might be the usage event."""
        if data.endswith(_EVENT_END) or not data:
            return data
        start = data.rfind(_EVENT_END) + 2 if _EVENT_END in data else 0
        partial = data[start:]
        if _CONTENT_EVENT in partial or len(partial) > _MAX_HELD:
            self._mid_event = True
            self._after_newline = partial.endswith(b"\n")
            return data
        self._held = partial
        return data[:start]

    def _cut_usage_events(self, data: bytes) -> bytes:
        """Drop each whole event that carries a usage object and no content. Only those
        events are located; the bytes around them pass as they are (a read under load
        holds many events, and splitting all of them cost 14% of a stream's CPU)."""
        out: list[bytes] = []
        while True:
            pos = data.find(_OBJECT)
            if pos == -1:
                pos = data.find(_OBJECT_SPACED)
            if pos == -1:
                break
            before = data.rfind(_EVENT_END, 0, pos)
            start = 0 if before == -1 else before + 2
            end = data.find(_EVENT_END, pos)
            if end == -1:
                break  # the event is not complete yet: held below, it carries no content
            event = data[start : end + 2]
            self._scan_event(event)
            # Usage riding on a content event is counted, and the event forwarded.
            out.append(data[: end + 2] if _CONTENT_EVENT in event else data[:start])
            data = data[end + 2 :]
        out.append(self._forward_complete(data))
        return b"".join(out)
