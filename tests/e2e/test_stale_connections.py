"""Pooled upstream connections the upstream closes while idle. The rule: a request is
sent to an upstream at most once. A connection found closed at checkout is dropped and a
fresh one used (not an upstream failure); once the request is written, a connection that
dies without a response byte is the upstream's failure (`reset`), and the request fails
over, never resent where it may have run. The upstream's `Keep-Alive: timeout=N` expires
a pooled connection before the upstream closes it, so that race stays rare."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from tests.conftest import RunningProxy, StartProxy, metric
from tests.rawupstream import RawUpstream, Step, json_response
from zrproxy.pool import Pool


async def _post(client: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[int, bytes]:
    async with client.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers=proxy.auth(),
    ) as resp:
        return resp.status, await resp.read()


async def _errors(proxy: RunningProxy, upstream: str = "raw") -> float:
    return await metric(proxy, "zrproxy_upstream_errors_total", upstream=upstream)


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["right-after-a-response", "after-a-delay"])
async def test_a_connection_the_upstream_closed_while_idle_is_not_used(
    start_proxy: StartProxy, delay: float
) -> None:
    # Each answer is followed by the upstream closing the connection (at once, or a
    # little later, as its idle timer would), before our next request.
    def script(index: int, _head: bytes) -> list[Step]:
        steps: list[Step] = [json_response(b'{"n":%d}' % index)]
        return [*steps, delay, "close"] if delay else [*steps, "close"]

    upstream = await RawUpstream(script).start()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": "openai", "base_url": upstream.url}])
        async with aiohttp.ClientSession() as client:
            results = []
            for _ in range(3):
                results.append(await _post(client, proxy))
                await asyncio.sleep(delay * 2)
    finally:
        await upstream.stop()
    assert results == [(200, b'{"n":0}'), (200, b'{"n":1}'), (200, b'{"n":2}')]
    assert [conn for conn, _ in upstream.requests] == [1, 2, 3]  # each on a fresh one
    assert await _errors(proxy) == 0


@pytest.mark.parametrize("second_upstream", [False, True], ids=["alone", "with-a-second"])
async def test_a_connection_closed_after_the_request_was_written_is_never_resent(
    start_proxy: StartProxy, second_upstream: bool
) -> None:
    # Request 1 goes on the pooled connection; the upstream reads it and closes without
    # a byte (its idle timer raced our request). It may have started the work: so it is
    # this upstream's failure, and the request moves on to the next upstream, if any.
    def script(index: int, _head: bytes) -> list[Step]:
        return ["close"] if index == 1 else [json_response(b'{"n":%d}' % index)]

    upstream = await RawUpstream(script).start()
    other = await RawUpstream(lambda i, h: [json_response(b'{"other":%d}' % i)]).start()
    upstreams = [{"name": "raw", "kind": "openai", "base_url": upstream.url}]
    if second_upstream:
        upstreams.append({"name": "other", "kind": "openai", "base_url": other.url})
    try:
        proxy = await start_proxy(
            upstreams,
            routes=[{"model": "m", "upstreams": [u["name"] for u in upstreams]}],
        )
        async with aiohttp.ClientSession() as client:
            first = await _post(client, proxy)
            second = await _post(client, proxy)
    finally:
        await upstream.stop()
        await other.stop()
    assert first == (200, b'{"n":0}')
    assert [conn for conn, _ in upstream.requests] == [1, 1]  # received once, not resent
    errors = await metric(proxy, "zrproxy_upstream_errors_total", upstream="raw", kind="reset")
    assert errors == 1
    if second_upstream:
        assert second == (200, b'{"other":0}')
        assert len(other.requests) == 1
    else:
        assert second[0] == 502
        assert other.requests == []


async def test_checkout_drops_a_connection_closed_before_the_loop_read_it() -> None:
    # The upstream's FIN is in our socket, but our loop has not run since: the pool must
    # see it at checkout (poll), not hand out a connection our request would die on.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    pool = Pool(
        "127.0.0.1",
        listener.getsockname()[1],
        None,
        max_connections=4,
        pool_timeout_s=1,
        connect_timeout_s=1,
        keepalive_s=30,
    )
    try:
        conn = await pool.acquire()
        server_side, _ = await loop.sock_accept(listener)
        pool.release(conn)
        assert await pool.acquire() is conn  # a live idle connection is reused
        pool.release(conn)
        server_side.close()  # FIN, and no await until the checkout below
        again = await pool.acquire()
        assert again is not conn
        assert conn.closed
        fresh_side, _ = await loop.sock_accept(listener)
        fresh_side.close()
    finally:
        pool.close()
        listener.close()


@pytest.mark.parametrize(
    ("keep_alive", "pause", "connections"),
    [
        (b"", 1.3, [1, 1]),  # no header: the pool's own expiry (30 s) keeps it
        (b"Keep-Alive: timeout=2\r\n", 1.3, [1, 2]),  # expired at 1 s, before the upstream
        (b"Keep-Alive: timeout=0\r\n", 0.0, [1, 2]),  # it keeps none: not pooled
    ],
    ids=["no-header", "timeout-2", "timeout-0"],
)
async def test_keep_alive_timeout_expires_the_pooled_connection_first(
    start_proxy: StartProxy, keep_alive: bytes, pause: float, connections: list[int]
) -> None:
    # The upstream says how long it keeps an idle connection, and (here) never closes it
    # itself, so only the proxy's expiry can explain a new connection.
    upstream = await RawUpstream(lambda i, h: [json_response(b"{}", keep_alive)]).start()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": "openai", "base_url": upstream.url}])
        async with aiohttp.ClientSession() as client:
            assert await _post(client, proxy) == (200, b"{}")
            await asyncio.sleep(pause)
            assert await _post(client, proxy) == (200, b"{}")
    finally:
        await upstream.stop()
    assert [conn for conn, _ in upstream.requests] == connections
    assert await _errors(proxy) == 0


async def test_a_live_tls_connection_is_reused(start_proxy: StartProxy, tmp_path: Path) -> None:
    # The checkout's poll sees raw socket bytes: a TLS connection at rest must show none
    # (its session tickets were read with the first answer), or every request would pay
    # for a new handshake.
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = await RawUpstream(lambda i, h: [json_response(b"{}")], tls=server).start()
    try:
        proxy = await start_proxy(
            [{"name": "raw", "kind": "openai", "base_url": upstream.url, "ca_file": str(ca_file)}]
        )
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                assert await _post(client, proxy) == (200, b"{}")
                await asyncio.sleep(0.05)  # idle in the pool for a while
    finally:
        await upstream.stop()
    assert [conn for conn, _ in upstream.requests] == [1, 1, 1]
