"""Request framing, differential against h11: for generated requests (Content-Length and
Transfer-Encoding variants, chunk framings, a pipelined request behind), whatever the
proxy forwards upstream is exactly the body h11 finds, and when h11 refuses a request or
finds it incomplete, the proxy forwards nothing.

The proxy and a recording upstream run on their own event loop in a thread, so
hypothesis drives them with plain blocking sockets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import orjson
import pytest
import uvloop
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import config_data
from zrproxy.app import Service
from zrproxy.auth import new_key
from zrproxy.config import parse_config


@dataclass
class Peers:
    port: int
    key: str
    bodies: list[bytes] = field(default_factory=list)


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    loop = uvloop.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    key, digest = new_key()
    box: dict[str, Peers] = {}

    async def main() -> None:
        bodies: list[bytes] = []

        async def record(request: web.Request) -> web.Response:
            bodies.append(await request.read())
            return web.Response(body=b'{"ok":true}', content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", record)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        upstream_port = runner.addresses[0][1]
        upstreams = [
            {"name": "rec", "kind": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1"}
        ]
        # Not zero retention: its `store: false` would change the bodies compared here.
        data = config_data(
            upstreams,
            digest,
            zero_retention=False,
            idle_timeout_s=0.3,
            body_timeout_s=0.5,
            header_timeout_s=0.5,
        )
        service = Service(parse_config(data, {}))
        await service.start()
        assert service.api_address is not None
        box["peers"] = Peers(service.api_address.port, key, bodies)
        ready.set()
        await stop.wait()
        await service.stop()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield box["peers"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()


BODY = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "framing"}]})
PIPELINED = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Half the time a clean framing (one right Content-Length, or chunked alone), else
    duplicated, odd or conflicting framing headers and chunk sizes."""
    n = len(BODY)
    odd_lengths = [f" {n}", f"{n} ", f"+{n}", f"0{n}", f"{n},{n}", f"{n - 5}", "-1", f"{n + 3}"]
    odd_lengths += ["0x10", "", f"{n}\x00", f"{n}\t"]
    odd_te = ["Chunked", " chunked", "chunked, chunked", "gzip, chunked", "chunked;x=1"]
    odd_te += ["identity", "xchunked", "chunked\x0b", "chunked "]
    odd_sizes = ["%X", "0%x", "%x;ext=1", "%x ", "-%x", "0x%x", "%x\x00"]
    clean = draw(st.booleans())
    chunked = draw(st.booleans())
    fields = [b"Host: x"]
    if clean:
        fields.append(b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % n)
    else:
        for _ in range(draw(st.integers(0, 2))):
            value = draw(st.sampled_from([str(n), *odd_lengths]))
            fields.append(b"Content-Length: " + value.encode())
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.sampled_from(["Transfer-Encoding", "transfer-encoding", "TE_x"]))
            value = draw(st.sampled_from(["chunked", *odd_te]))
            fields.append(name.encode() + b": " + value.encode())
        draw(st.randoms()).shuffle(fields)
    if chunked:
        cut = draw(st.integers(1, n - 1))
        size = "%x" if clean else draw(st.sampled_from(["%x", *odd_sizes]))
        body = (size % cut).encode() + b"\r\n" + BODY[:cut] + b"\r\n"
        body += b"%x\r\n" % (n - cut) + BODY[cut:] + b"\r\n0\r\n\r\n"
    else:
        body = BODY
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        + b"\r\n".join(fields)
        + b"\r\n\r\n"
        + body
        + PIPELINED
    )


def h11_body(raw: bytes) -> bytes | None:
    """The first request's body as h11 frames it, or None if h11 refuses it or finds it
    incomplete."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    body = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return body
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
    except h11.RemoteProtocolError:
        return None


def _send(peers: Peers, raw: bytes) -> None:
    auth = b"Authorization: Bearer " + peers.key.encode() + b"\r\n"
    raw = raw.replace(b"Host: x\r\n", b"Host: x\r\n" + auth, 1)
    with socket.create_connection(("127.0.0.1", peers.port), timeout=10) as sock:
        sock.sendall(raw)
        got = b""
        while b"\r\n\r\n" not in got:  # the first response's head, whatever it is
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=requests())
def test_the_proxy_frames_requests_as_h11_does_or_refuses(peers: Peers, raw: bytes) -> None:
    expected = h11_body(raw.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer k\r\n"))
    before = len(peers.bodies)
    _send(peers, raw)
    forwarded = peers.bodies[before:]
    if expected is None:
        assert forwarded == [], "forwarded a request h11 refuses or finds incomplete"
    else:
        assert forwarded in ([], [expected]), "forwarded another body than h11 frames"
