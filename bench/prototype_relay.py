"""A reverse proxy on raw asyncio Protocols. NOT PRODUCTION CODE: a measurement of a design
(bench/README.md, "What would reach the missed targets"), run by `python -m bench.prototype`.

# Goals
The floor of a Python relay on uvloop that does zrproxy's per-request work in its
simplest form: parse the request with aiohttp's C parser (llhttp), take the JSON body and
parse it once with the stdlib, check the Bearer key by a SHA-256 dict lookup, write head
and body to one upstream over pooled keep-alive connections, and pass the upstream's
response bytes (status line, headers, chunked framing) to the client unchanged, as they
arrive, with backpressure.

# Strategy
No tasks, futures or StreamReaders on the response path: everything happens inside
`data_received`. A small incremental scanner follows the upstream's framing
(Content-Length, or chunk sizes up to the last chunk and its trailers) only to know when
the connection can go back to the pool. The scanner is strict on purpose: the client
re-parses the same bytes, and any leniency here is a framing disagreement between us and
it (response desync).

# Leaves out
Metrics, the usage tap, failover and retrying a stale pooled connection, error mapping
(a few canned replies), header filtering both ways, request ids, timeouts, drain,
`Expect: 100-continue`, upgrades, HTTP/1.0 clients, the models endpoint.
`--zrproxy-pieces` adds back, with zrproxy's own functions, everything per request but
failover, error mapping, drain and the idle-timeout sweep (FullClient, FullUpstream).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import re
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

import uvloop

# llhttp through aiohttp's own C extension (a Cython module: no type stubs)
from aiohttp._http_parser import HttpRequestParser  # type: ignore[import-not-found]
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

from zrproxy.dialects import UpstreamBodies, parse_request
from zrproxy.errors import ProxyError
from zrproxy.headers import (
    REQUEST_ID,
    SSE_HEADERS,
    client_response_headers,
    request_id,
    upstream_request_headers,
)
from zrproxy.metrics import Metrics, status_class
from zrproxy.usage import UsageTap

PATH = "/v1/chat/completions"
MAX_BODY_BYTES = 4 * 1024 * 1024
_READ_LIMIT = 2**16  # the parser's StreamReader high-water mark (we never await it)
_MAX_HEAD_BYTES = 64 * 1024  # the upstream's status line and headers
_MAX_LINE_BYTES = 1024  # one chunk-size line (extensions included)
# A chunk-size line: hex digits, optional extensions, CRLF. No spaces, no bare LF, no "0x"
# or "+" or "_" (which int(x, 16) would take): exactly what RFC 9112 7.1 allows.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[^\r\n]*)?\r\n")


def _canned(status: int, reason: str, message: str, close: bool = False) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    connection = "Connection: close\r\n" if close else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{connection}\r\n"
    )
    return (head + body).encode()


BAD_REQUEST = _canned(400, "Bad Request", "Malformed request.", close=True)
BAD_JSON = _canned(400, "Bad Request", "The body must be a JSON object with a model.")
UNAUTHORIZED = _canned(401, "Unauthorized", "Invalid API key.")
NOT_FOUND = _canned(404, "Not Found", "Not found.")
TOO_LARGE = _canned(413, "Payload Too Large", "Request body too large.", close=True)
BAD_GATEWAY = _canned(502, "Bad Gateway", "Upstream failed.", close=True)
BAD_VERSION = _canned(505, "HTTP Version Not Supported", "HTTP/1.1 only.", close=True)


class Relay:
    """What every connection shares: the keys, the upstream address, the idle pool."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, upstream: tuple[str, int], digests: set[bytes]
    ) -> None:
        self.loop = loop
        self.upstream = upstream
        self.digests = frozenset(digests)
        host, port = upstream
        self.head_prefix = (
            f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.idle: list[Upstream] = []
        self.upstream_class: type[Upstream] = Upstream
        self.client_class: type[Client] = Client
        # --zrproxy-pieces only:
        self.request_line = f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        self.injected = {"Accept-Encoding": "identity"}  # as zrproxy's upstream.py
        self.metrics = Metrics()

    def forward(self, client: Client, request: bytes) -> None:
        """Send `request` on a pooled connection, or on a new one."""
        while self.idle:
            upstream = self.idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                upstream.start(client, request)
                return
        self.loop.create_task(self._connect(client, request))

    async def _connect(self, client: Client, request: bytes) -> None:
        host, port = self.upstream
        factory = self.upstream_class
        try:
            _, upstream = await self.loop.create_connection(lambda: factory(self), host, port)
        except OSError:
            client.upstream_failed()
            return
        if client.gone:
            upstream.close()
        else:
            upstream.start(client, request)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; relays one response at a time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.paused = False
        self.sent = 0  # response bytes passed to the client so far
        self._head = b""  # the start of a status line and headers split across reads
        self._in_head = True
        self._chunked = False
        self._until_close = False
        self._trailers = False
        self._left = 0  # Content-Length bytes, or chunk data + CRLF, still to pass
        self._carry = b""  # a chunk-size or trailer line split across reads
        self._keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self, client: Client, request: bytes) -> None:
        assert self.transport is not None
        self.client, self.sent = client, 0
        self._in_head, self._chunked, self._until_close = True, False, False
        self._trailers = False
        self._left, self._keep, self._carry, self._head = 0, True, b"", b""
        client.upstream = self
        if client.writing_paused:
            self.pause()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # bytes nobody asked for: this connection is out of step
            self.close()
            return
        try:
            end = self._scan(data)
        except ValueError:  # framing we do not follow exactly: cut both sides
            client.upstream_failed(self.sent)
            self.close()
            return
        if end < 0:
            client.write(data)
            self.sent += len(data)
            return
        if end < len(data):  # bytes past the end of the response: out of step
            data, self._keep = data[:end], False
        client.write(data)
        self._done(client)

    def _done(self, client: Client) -> None:
        self.client = None
        if self.paused:
            self.resume()
        if self._keep:
            self.relay.idle.append(self)
        else:
            self.close()
        client.response_done(close=not self._keep)

    def _scan(self, data: bytes, body: list[bytes] | None = None) -> int:
        """Offset just past the end of the response in `data`, or -1 if it goes on; the
        body's payload bytes (without chunk framing) go to `body` when given."""
        pos = 0
        if self._in_head:
            buf = self._head + data if self._head else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD_BYTES:
                    raise ValueError("head too long")
                self._head = buf
                return -1
            self._parse_head(buf[:end])
            pos = end + 4 - len(self._head)  # where the body starts in `data`
            self._head = b""
            self._in_head = False
            if not (self._chunked or self._until_close or self._left):
                return pos
        if self._until_close:
            if body is not None:
                body.append(data[pos:])
            return -1
        if not self._chunked:
            if body is not None:
                body.append(data[pos : pos + self._left])
            if len(data) - pos < self._left:
                self._left -= len(data) - pos
                return -1
            pos += self._left
            self._left = 0
            return pos
        return self._scan_chunks(data, pos, body)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.1 ") or not status_line[9:12].isdigit():
            raise ValueError("status line")
        status = int(status_line[9:12])
        length: int | None = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or name != name.strip():
                raise ValueError("header line")
            name = name.lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise ValueError("content-length")
                length = int(value)
            elif name == b"transfer-encoding":
                if value.lower() != b"chunked" or self._chunked:
                    raise ValueError("transfer-encoding")
                self._chunked = True
            elif name == b"connection" and b"close" in value.lower():
                self._keep = False
        if self._chunked and length is not None:
            raise ValueError("both framings")  # RFC 9112 6.3: a smuggling signature
        if status < 200 or status in (204, 304):
            self._chunked, self._left = False, 0
        elif length is not None:
            self._left = length
        elif not self._chunked:
            self._until_close, self._keep = True, False  # delimited by the upstream closing

    def _scan_chunks(self, data: bytes, pos: int, body: list[bytes] | None) -> int:
        # Goals: per chunk, in the common case (a whole size line in this read), one regex
        # match in C, one int() and a slice test; lines split across reads go the slow way.
        left, self._left = self._left, 0  # chunk data + its CRLF still to pass
        n = len(data)
        while True:
            if left:
                end = pos + left
                if body is not None:
                    stop = min(end - 2, n)
                    if stop > pos:
                        body.append(data[pos:stop])
                if end > n:  # the chunk goes on in the next read
                    left = end - n
                    if left == 1 and data[-1] != 0x0D:
                        raise ValueError("chunk data not followed by CRLF")
                    self._left = left
                    return -1
                if (data[end - 2 : end] != b"\r\n") if left >= 2 else (data[end - 1] != 0x0A):
                    raise ValueError("chunk data not followed by CRLF")
                pos, left = end, 0
            if self._carry or self._trailers:
                lf = data.find(b"\n", pos)
                if lf < 0:
                    self._carry += data[pos:]
                    if len(self._carry) > _MAX_LINE_BYTES:
                        raise ValueError("line too long")
                    return -1
                line, self._carry = self._carry + data[pos : lf + 1], b""
                pos = lf + 1
                if self._trailers:
                    if line == b"\r\n":
                        return pos
                    if len(line) > _MAX_LINE_BYTES or not line.endswith(b"\r\n"):
                        raise ValueError("trailer")
                    continue
                match = _CHUNK_SIZE.fullmatch(line)
            else:
                match = _CHUNK_SIZE.match(data, pos)
                if match is None and data.find(b"\n", pos) < 0:
                    self._carry = data[pos:]  # the size line goes on in the next read
                    if len(self._carry) > _MAX_LINE_BYTES:
                        raise ValueError("line too long")
                    return -1
                if match is not None:
                    pos = match.end()
            if match is None:
                raise ValueError("chunk size")
            size = int(match.group(1), 16)
            if size:
                left = size + 2
            else:
                self._trailers = True  # then trailer lines up to an empty one

    def pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.relay.idle:
            self.relay.idle.remove(self)
        client, self.client = self.client, None
        if client is None:
            return
        if self._until_close and not self._in_head:
            client.response_done(close=True)  # the close was the end of the response
        else:
            client.upstream_failed(self.sent)


class Client(asyncio.Protocol):
    """One client connection: parse requests, hand each to an upstream, one at a time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.gone = False
        self._busy = False
        self._close_after = False
        self._reading_paused = False
        self.writing_paused = False
        self._pending: deque[tuple[Any, Any]] = deque()  # (RawRequestMessage, payload)
        self._parser = HttpRequestParser(self, relay.loop, _READ_LIMIT)

    # -- what aiohttp's StreamReader calls on its protocol: we bound the body ourselves
    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages, _, _ = self._parser.feed_data(data)
        except (HttpProcessingError, ValueError):
            self._reject(BAD_REQUEST, close=True)
            return
        if messages:
            self._pending.extend(messages)
        if self._busy:  # a pipelined request: hold it in the kernel until we are done
            self._pause_reading_client()
        else:
            self._next()

    def _next(self) -> None:
        while self._pending and not self._busy and not self.gone:
            msg, payload = self._pending[0]
            if not payload.is_eof():
                if payload._size > MAX_BODY_BYTES:
                    self._reject(TOO_LARGE, close=True)
                return  # the body is still arriving
            self._pending.popleft()
            self._handle(msg, payload)

    def _handle(self, msg: Any, payload: Any) -> None:
        if msg.version != HttpVersion11:
            self._reject(BAD_VERSION, close=True)
            return
        self._close_after = msg.should_close
        if msg.method != "POST" or msg.path != PATH:
            self._reject(NOT_FOUND)
            return
        auth = msg.headers.get("Authorization")
        if auth is None or auth[:7].lower() != "bearer ":
            self._reject(UNAUTHORIZED)
            return
        digest = hashlib.sha256(auth[7:].strip().encode("utf-8", "surrogateescape")).digest()
        if digest not in self.relay.digests:
            self._reject(UNAUTHORIZED)
            return
        body = payload.read_nowait(-1)
        if len(body) > MAX_BODY_BYTES:
            self._reject(TOO_LARGE, close=True)
            return
        request = self._upstream_request(msg, body)
        if request is not None:
            self._busy = True
            self.relay.forward(self, request)

    def _upstream_request(self, msg: Any, body: bytes) -> bytes | None:
        """What goes upstream, or None after a rejection."""
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None  # the decode error keeps the body in .doc: it dies here
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), str):
            self._reject(BAD_JSON)
            return None
        _stream = parsed.get("stream") is True  # zrproxy decides the usage tap on this
        del parsed
        return self.relay.head_prefix + b"%d\r\n\r\n" % len(body) + body

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.gone:
            self.transport.write(data)

    def response_done(self, close: bool) -> None:
        self.upstream = None
        self._busy = False
        if close or self._close_after:
            self._close()
            return
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._next()

    def upstream_failed(self, sent: int = 0) -> None:
        """Before any response byte: a 502. After: cut the connection, so the client can't
        take a truncated response for a whole one."""
        self.upstream = None
        if sent == 0:
            self.write(BAD_GATEWAY)
        self._close()

    def _reject(self, reply: bytes, close: bool = False) -> None:
        self.write(reply)
        if close:
            self._close()

    def _pause_reading_client(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _close(self) -> None:
        self.gone = True
        self._pending.clear()
        if self.transport is not None:
            self.transport.close()

    # -- backpressure: while the client's socket is full, stop reading the upstream
    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.upstream is not None:
            self.upstream.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._pending.clear()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:  # mid-response: the upstream learns at once
            upstream.client = None
            upstream.close()


# --- the same skeleton plus zrproxy's per-request pieces (--zrproxy-pieces) -----------------
# Still no failover, error mapping, drain or idle-timeout sweep; see bench/README.md.

_LABELS = ("bench", "default", "mock")  # project, route, upstream names, as in bench's config
_TOTAL_TIMEOUT_S = 600.0


@dataclass(slots=True)
class _Exchange:
    """Metadata of one request, as zrproxy's proxy keeps it."""

    started: float
    rid: str
    tap: UsageTap
    deadline: asyncio.TimerHandle
    stream: bool
    bytes_in: int
    status: int = 0
    bytes_out: int = 0
    chunks: int = 0
    first_byte_at: float = 0.0
    last_read: float = 0.0  # what an idle-timeout sweep would read
    is_sse: bool = False


class FullClient(Client):
    """`Client` plus a request id, one deadline timer, zrproxy's request parse and
    include_usage rewrite, its request header filter, and its metrics."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.ex: _Exchange | None = None

    def _upstream_request(self, msg: Any, body: bytes) -> bytes | None:
        relay = self.relay
        loop = relay.loop
        try:
            parsed = parse_request(body)
        except ProxyError:
            self._reject(BAD_JSON)
            return None
        started = loop.time()
        rid = request_id(msg.headers.get(REQUEST_ID))
        ask_usage = parsed.stream and not parsed.client_wants_usage
        bodies = UpstreamBodies(body, parsed, None, ask_usage)
        out = bodies.for_upstream("openai", {})
        bodies.clear()
        headers = upstream_request_headers(msg.headers, relay.injected)
        headers[REQUEST_ID] = rid
        relay.metrics.in_flight.inc()
        deadline = loop.call_at(started + _TOTAL_TIMEOUT_S, self._expire)
        tap = UsageTap(strip_usage_event=ask_usage)
        self.ex = _Exchange(started, rid, tap, deadline, parsed.stream, len(body))
        head = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        return (
            relay.request_line
            + head.encode("latin-1")
            + b"Content-Length: %d\r\n\r\n" % (len(out))
            + out
        )

    def _expire(self) -> None:
        upstream = self.upstream
        self.upstream_failed(upstream.sent if upstream is not None else 0)
        if upstream is not None:
            upstream.client = None
            upstream.close()

    def _finish(self, aborted: bool = False) -> None:
        ex, self.ex = self.ex, None
        if ex is None:
            return
        ex.deadline.cancel()
        m = self.relay.metrics
        child = m.child
        project, route, upstream = _LABELS
        m.in_flight.dec()
        if ex.is_sse:
            m.open_streams.dec()
        if aborted:
            child(m.client_aborts, route).inc()
        status = status_class(ex.status or 499)
        stream = "true" if ex.stream else "false"
        child(m.requests, project, route, upstream, status, stream).inc()
        finished = self.relay.loop.time()
        child(m.duration, route).observe(finished - ex.started)
        if ex.first_byte_at:
            child(m.ttfb, route).observe(ex.first_byte_at - ex.started)
        child(m.bytes_in, project, route).inc(ex.bytes_in)
        if ex.bytes_out:
            child(m.bytes_out, project, route).inc(ex.bytes_out)
        if ex.chunks and ex.is_sse:
            child(m.chunks, route).inc(ex.chunks)
        tap = ex.tap
        if tap.prompt_tokens:
            child(m.tokens, project, route, "prompt").inc(tap.prompt_tokens)
        if tap.completion_tokens:
            child(m.tokens, project, route, "completion").inc(tap.completion_tokens)
        tap.close()

    def response_done(self, close: bool) -> None:
        self._finish()
        super().response_done(close)

    def upstream_failed(self, sent: int = 0) -> None:
        self._finish()
        super().upstream_failed(sent)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(aborted=True)
        super().connection_lost(exc)


class FullUpstream(Upstream):
    """`Upstream` plus zrproxy's response header filter (and so a rewritten head), the
    usage tap on the payload, and so chunked framing taken apart and rebuilt: the tap may
    drop the usage event we asked for, which changes the chunk sizes."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self._new_head = b""

    def _exchange(self) -> _Exchange:
        ex = cast(FullClient, self.client).ex
        assert ex is not None
        return ex

    def _parse_head(self, head: bytes) -> None:
        super()._parse_head(head)
        ex = self._exchange()
        lines = head.split(b"\r\n")
        incoming: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            incoming.add(name.decode("latin-1"), value.strip().decode("latin-1"))
        headers = client_response_headers(CIMultiDictProxy(incoming), ex.rid)
        ex.status = int(lines[0][9:12])
        ex.is_sse = headers.get("Content-Type", "").startswith("text/event-stream")
        if ex.is_sse:
            headers.update(SSE_HEADERS)
            self.relay.metrics.open_streams.inc()
        if self._chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif self._until_close:
            framing = b""
        else:
            framing = b"Content-Length: %d\r\n" % self._left  # the tap never resizes these
        text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        self._new_head = lines[0] + b"\r\n" + text.encode("latin-1") + framing + b"\r\n"

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self.close()
            return
        ex = self._exchange()
        now = self.relay.loop.time
        ex.last_read = now()
        body: list[bytes] = []
        try:
            end = self._scan(data, body)
        except ValueError:
            client.upstream_failed(self.sent)
            self.close()
            return
        if end >= 0 and end < len(data):
            self._keep = False
        out: list[bytes] = []
        if self._new_head:
            out.append(self._new_head)
            self._new_head = b""
        payload = ex.tap.feed(body[0] if len(body) == 1 else b"".join(body))
        if end >= 0:
            payload += ex.tap.flush()
        if payload:
            if not ex.chunks:
                ex.first_byte_at = now()
            ex.chunks += 1
            ex.bytes_out += len(payload)
            if self._chunked:
                out += (b"%x\r\n" % len(payload), payload, b"\r\n")
            else:
                out.append(payload)
        if end >= 0 and self._chunked:
            out.append(b"0\r\n\r\n")
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            client.write(data)
            self.sent += len(data)
        if end >= 0:
            self._done(client)


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


async def serve(
    listen: tuple[str, int], upstream: tuple[str, int], digests: set[bytes], full: bool
) -> int:
    loop = asyncio.get_running_loop()
    relay = Relay(loop, upstream, digests)
    if full:
        relay.client_class, relay.upstream_class = FullClient, FullUpstream
    factory = relay.client_class
    server = await loop.create_server(lambda: factory(relay), *listen, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    # As zrproxy's settle_heap(): startup objects out of the collector's way, gen 0 rarer.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"prototype relay ready: http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prototype_relay", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the upstream")
    parser.add_argument(
        "--key-sha256", action="append", required=True, help="hex digest of an accepted key"
    )
    parser.add_argument(
        "--zrproxy-pieces",
        action="store_true",
        help="also do zrproxy's per-request work: request id, deadline, header filters, "
        "include_usage rewrite, usage tap (and so re-chunking), metrics",
    )
    args = parser.parse_args(argv)
    digests = {bytes.fromhex(d) for d in args.key_sha256}
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(
            serve(_address(args.listen), _address(args.upstream), digests, args.zrproxy_pieces)
        )


if __name__ == "__main__":
    raise SystemExit(main())
