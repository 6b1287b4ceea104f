"""The upstream connection pool: the cap and the wait for a free connection (stale pooled
connections: test_stale_connections.py), idle expiry, a client that stops reading, and 1,000
concurrent requests over four connections each getting only their own answer."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket

import aiohttp
import pytest

from tests.conftest import Mock, RunningProxy, StartProxy, metric
from tests.rawupstream import RawUpstream, Step, json_response
from zrproxy.pool import Pool
from zrproxy.upstream import Upstreams

_MARKER = re.compile(rb"mk-[0-9a-f]{16}")


def _echo_marker(body: bytes) -> bytes:
    match = _MARKER.search(body)
    assert match is not None
    return json_response(b'{"marker":"%b"}' % match.group(0))


def _echo_marker_chunked(body: bytes) -> bytes:
    match = _MARKER.search(body)
    assert match is not None
    payload = b'{"marker":"%b"}' % match.group(0)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%b\r\n" % (len(payload[i : i + 7]), payload[i : i + 7])
            for i in range(0, len(payload), 7)
        )
        + b"0\r\n\r\n"
    )


async def _post(
    client: aiohttp.ClientSession, proxy: RunningProxy, content: str = "hi"
) -> tuple[int, bytes]:
    async with client.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": content}]},
        headers=proxy.auth(),
    ) as resp:
        return resp.status, await resp.read()


async def test_every_client_gets_only_its_own_answer(start_proxy: StartProxy) -> None:
    def script(index: int, _head: bytes) -> list[Step]:
        # Answers split and paced differently, so responses interleave on the pool.
        if index % 3 == 0:
            return [_echo_marker]
        if index % 3 == 1:
            return [0.0, _echo_marker_chunked]
        return [lambda body: _echo_marker(body)[:40], 0.001, lambda body: _echo_marker(body)[40:]]

    upstream = await RawUpstream(script).start()
    try:
        proxy = await start_proxy(
            [
                {
                    "name": "raw",
                    "kind": "openai",
                    "base_url": upstream.url,
                    "max_connections": 4,
                    "pool_timeout_s": 50,
                }
            ],
            # All 1,000 at once: above the default admission caps, which are not tested here.
            max_in_flight=2000,
            max_connections=2000,
        )
        markers = [f"mk-{secrets.token_hex(8)}" for _ in range(1000)]
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as client:
            results = await asyncio.gather(*(_post(client, proxy, m) for m in markers))
        for marker, (status, body) in zip(markers, results, strict=True):
            assert status == 200
            assert json.loads(body) == {"marker": marker}
        assert len(upstream.requests) == 1000
        assert upstream.max_open <= 4
        assert upstream.connections >= 1
    finally:
        await upstream.stop()


async def test_max_connections_caps_open_upstream_connections(start_proxy: StartProxy) -> None:
    upstream = await RawUpstream(lambda i, h: [0.2, json_response(b"{}")]).start()
    try:
        proxy = await start_proxy(
            [{"name": "raw", "kind": "openai", "base_url": upstream.url, "max_connections": 2}]
        )
        async with aiohttp.ClientSession() as client:
            results = await asyncio.gather(*(_post(client, proxy) for _ in range(6)))
        assert [status for status, _ in results] == [200] * 6
        assert upstream.max_open == 2  # the default cap would have opened 6
    finally:
        await upstream.stop()


async def test_pool_timeout_fails_over_like_a_connect_failure(
    start_proxy: StartProxy, mock: Mock
) -> None:
    upstream = await RawUpstream(lambda i, h: ["hold"]).start()
    try:
        proxy = await start_proxy(
            [
                {
                    "name": "raw",
                    "kind": "openai",
                    "base_url": upstream.url,
                    "max_connections": 1,
                    "pool_timeout_s": 0.2,
                },
                {"name": "mock", "kind": "openai", "base_url": mock.url},
            ],
            # Longer than pool_timeout_s, shorter than its default (5 s): a second
            # request that waited for the default would end at this deadline instead.
            first_byte_timeout_s=30,
            total_timeout_s=2,
        )
        async with aiohttp.ClientSession() as client:
            holder = asyncio.create_task(_post(client, proxy))
            while not upstream.requests:
                await asyncio.sleep(0.01)
            status, _ = await _post(client, proxy)
            holder.cancel()
        assert status == 200  # served by the route's next upstream
        assert (
            await metric(proxy, "zrproxy_upstream_errors_total", upstream="raw", kind="connect")
            == 1
        )
        assert len(upstream.requests) == 1  # the waiting request never reached it
    finally:
        await upstream.stop()


async def test_a_fresh_connection_closed_before_a_byte_is_not_retried(
    start_proxy: StartProxy,
) -> None:
    upstream = await RawUpstream(lambda i, h: ["close"]).start()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": "openai", "base_url": upstream.url}])
        async with aiohttp.ClientSession() as client:
            status, _ = await _post(client, proxy)
        assert status == 502
        assert len(upstream.requests) == 1
    finally:
        await upstream.stop()


async def test_a_stale_connection_after_a_partial_answer_is_not_retried(
    start_proxy: StartProxy,
) -> None:
    def script(index: int, _head: bytes) -> list[Step]:
        if index == 1:
            return [b"HTTP/1.1 200 OK\r\n", "close"]
        return [json_response(b"{}")]

    upstream = await RawUpstream(script).start()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": "openai", "base_url": upstream.url}])
        async with aiohttp.ClientSession() as client:
            await _post(client, proxy)
            status, _ = await _post(client, proxy)
        assert status == 502  # something of the answer had arrived: no second try
        assert len(upstream.requests) == 2
    finally:
        await upstream.stop()


async def test_idle_connections_expire() -> None:
    upstream = await RawUpstream(lambda i, h: [json_response(b"{}")]).start()
    try:
        port = int(upstream.url.split(":")[2].split("/")[0])
        pool = Pool(
            "127.0.0.1",
            port,
            None,
            max_connections=4,
            pool_timeout_s=1,
            connect_timeout_s=1,
            keepalive_s=0.2,
        )
        conn = await pool.acquire()
        pool.release(conn)
        assert await pool.acquire() is conn  # reused while fresh
        pool.release(conn)
        await asyncio.sleep(0.5)  # the sweep (every keepalive/2) closes it
        assert conn.closed
        assert pool.idle == 0
        again = await pool.acquire()
        assert again is not conn
        pool.close()
    finally:
        await upstream.stop()


async def test_a_client_that_stops_reading_is_closed_after_send_timeout(
    start_proxy: StartProxy, mock: Mock
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}], send_timeout_s=0.5
    )
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "mock-n200000-s8192", "stream": True, "messages": []}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.sendall(head + body)  # and never read
        for _ in range(200):  # bounded: 20 s at most, the default send timeout is 30 s
            if await metric(proxy, "zrproxy_client_aborts_total") >= 1:
                break
            await asyncio.sleep(0.1)
        assert await metric(proxy, "zrproxy_client_aborts_total") == 1
        assert await metric(proxy, "zrproxy_upstream_errors_total") == 0
    finally:
        sock.close()


@pytest.mark.parametrize("url", ["https://api.example.com/v1", "http://127.0.0.1:9/v1"])
async def test_one_tls_context_per_upstream(url: str) -> None:
    from zrproxy.config import parse_config

    data = {
        "upstreams": [{"name": "u", "kind": "openai", "base_url": url}],
        "routes": [{"model": "*", "upstreams": ["u"]}],
        "projects": [{"name": "p", "key_sha256": ["0" * 64]}],
    }
    upstreams = Upstreams(parse_config(data, {}))
    context = upstreams.pool("u")._ssl
    if url.startswith("https"):
        assert context is not None and context.check_hostname
    else:
        assert context is None
    await upstreams.close()


async def test_connections_and_exchanges_are_freed_without_the_collector(
    start_proxy: StartProxy,
) -> None:
    import gc
    import weakref

    from zrproxy.exchange import Exchange

    upstream = await RawUpstream(lambda i, h: [json_response(b'{"n":1}')]).start()
    gc.disable()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": "openai", "base_url": upstream.url}])
        pool = proxy.service._upstreams.pool("raw")  # type: ignore[union-attr]
        conn = await pool.acquire()
        exchange = Exchange()
        conn.start(exchange, b"POST /v1/x HTTP/1.1\r\nHost: u\r\nContent-Length: 0\r\n\r\n", b"",
                   False, 0.0)  # fmt: skip
        while not exchange.finished:
            await exchange.wait()
        assert exchange.ended
        refs = weakref.ref(conn), weakref.ref(exchange)
        del exchange
        assert refs[1]() is None  # an ended exchange: no cycle through the connection
        conn.close()
        del conn
        for _ in range(20):
            if refs[0]() is None:
                break
            await asyncio.sleep(0.01)
        pool.close()
        assert refs[0]() is None  # closed: parser and connection freed by refcount alone
    finally:
        gc.enable()
        await upstream.stop()
