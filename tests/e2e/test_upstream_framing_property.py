"""Property: any upstream byte stream, split anywhere, is relayed the same way, and the
relay reuses a connection only where h11 (an independent HTTP/1.1 implementation) agrees
that the response ended exactly there and the connection may carry another request.

The real connection protocol (zrproxy.http1) is fed the stream read by read, as the event
loop would; its transport is a recorder, because the property is about where reads split
the bytes, which a socket does not let a test choose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.transports import RecordingTransport
from zrproxy.exchange import Exchange
from zrproxy.http1 import UpstreamConnection


@dataclass
class _Pool:
    released: list[UpstreamConnection] = field(default_factory=list)

    def release(self, conn: UpstreamConnection) -> None:
        self.released.append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        pass


@dataclass(frozen=True)
class Relayed:
    status: int
    body: bytes
    completed: bool
    reusable: bool


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def relay(loop: asyncio.AbstractEventLoop, reads: list[bytes]) -> Relayed:
    pool = _Pool()
    transport = RecordingTransport()
    conn = UpstreamConnection(pool, loop)
    conn.connection_made(transport)
    exchange = Exchange()
    conn.start(exchange, b"POST / HTTP/1.1\r\n\r\n", b"", False, loop.time())
    body: list[bytes] = []
    exchange.attach(body.append)
    for data in reads:
        if transport.closed:
            break
        conn.data_received(data)
    if not transport.closed and not exchange.finished:
        conn.connection_lost(None)  # the stream ends: EOF
    reusable = bool(pool.released) and not transport.closed
    return Relayed(
        exchange.status, b"".join(body), exchange.ended and exchange.failure is None, reusable
    )


def h11_verdict(stream: bytes) -> tuple[bool, int, bytes]:
    """(whether h11 ends the response exactly at the end of `stream` with the connection
    reusable, its status, its body)."""
    conn = h11.Connection(our_role=h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("Host", "u"), ("Content-Length", "0")])
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(stream)
    status, body = 0, []
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return False, status, b"".join(body)
    except h11.ProtocolError:
        return False, status, b"".join(body)
    exact = conn.trailing_data == (b"", False)
    reusable = exact and conn.their_state is h11.DONE and conn.our_state is h11.DONE
    return reusable, status, b"".join(body)


# --- responses: mostly well-formed, with the mistakes that matter ---------------------

_BODY_BYTES = st.binary(max_size=40) | st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"0", b"{}", b" "]), max_size=12
).map(b"".join)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([200, 200, 201, 204, 304, 400, 429, 500, 503]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    body = draw(_BODY_BYTES)
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked", "none"]))
    head = [b"HTTP/%b %d X" % (version, status), b"Content-Type: application/json"]
    if draw(st.booleans()):
        head.append(draw(st.sampled_from([b"Connection: close", b"Connection: keep-alive"])))
    payload = b""
    if framing == "length":
        length = draw(
            st.sampled_from([b"%d" % len(body)] * 6 + [b"%d" % (len(body) + 1), b"+1", b"1 1"])
            | st.just(b"%d" % max(len(body) - 1, 0))
        )
        head.append(b"Content-Length: " + length)
        if draw(st.integers(0, 9)) == 0:
            head.append(b"Content-Length: " + length)
        if draw(st.integers(0, 9)) == 0:
            head.append(b"Transfer-Encoding: chunked")
        payload = body
    elif framing == "chunked":
        head.append(
            b"Transfer-Encoding: "
            + draw(st.sampled_from([b"chunked"] * 8 + [b"gzip, chunked", b"Chunked"]))
        )
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for part in parts:
            if part:
                ext = draw(st.sampled_from([b"", b"", b";x=1"]))
                payload += b"%x%b\r\n%b\r\n" % (len(part), ext, part)
        trailers = draw(st.sampled_from([b"", b"", b"T: v\r\n"]))
        payload += b"0\r\n" + trailers + b"\r\n"
    stream = b"\r\n".join(head) + b"\r\n\r\n" + payload
    if draw(st.integers(0, 5)) == 0:
        stream = b"HTTP/1.1 100 Continue\r\n\r\n" + stream
    stream += draw(
        st.sampled_from(
            [b""] * 10 + [b"\r\n", b"\n", b"\r\n\r\n", b"x", b"HTTP/1.1 200 OK\r\n\r\n"]
        )
    )
    if stream and draw(st.integers(0, 4)) == 0:  # one byte changed, dropped or added
        at = draw(st.integers(0, len(stream) - 1))
        byte = bytes([draw(st.sampled_from(b"\r\n 0a:;"))])
        op = draw(st.sampled_from(["replace", "drop", "insert"]))
        tail = stream[at + 1 :] if op != "insert" else stream[at:]
        stream = stream[:at] + (b"" if op == "drop" else byte) + tail
    return stream


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=responses(), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_relays_the_same_and_reuse_needs_h11s_agreement(
    loop: asyncio.AbstractEventLoop, stream: bytes, cuts: list[int]
) -> None:
    whole = relay(loop, [stream])
    split = relay(loop, _split(stream, cuts))
    bytewise = relay(loop, [stream[i : i + 1] for i in range(len(stream))])
    valid, status, body = h11_verdict(stream)
    for relayed in (whole, split, bytewise):
        if relayed.reusable:
            assert valid, stream  # reused only where h11 ends it exactly, keep-alive
            assert (relayed.status, relayed.body) == (status, body), stream
    if valid:
        # Framing h11 accepts is relayed identically whatever the reads (llhttp may be
        # stricter than h11: then the response fails the same way every time).
        assert split == whole and bytewise == whole, stream
    else:
        assert not whole.reusable and not split.reusable and not bytewise.reusable


@pytest.mark.parametrize(
    "stream",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n\r\n",
    ],
)
def test_the_property_sees_reuse(loop: asyncio.AbstractEventLoop, stream: bytes) -> None:
    # The control: valid keep-alive responses are reused, so "not reusable" is not vacuous.
    assert relay(loop, [stream]).reusable
    assert h11_verdict(stream)[0]
