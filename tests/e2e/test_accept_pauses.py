"""Each time the API listener stops accepting at its connection cap, it is counted
(`zrproxy_accept_pauses_total`): the one signal of fd pressure that the loop cannot
hide (uvloop's libuv sheds connections at the fd limit without reporting them)."""

from __future__ import annotations

import asyncio

from tests.conftest import Mock, RunningProxy, StartProxy, metric


async def _open_connections(proxy: RunningProxy, expected: int) -> None:
    server = proxy.service._api_server
    assert server is not None
    for _ in range(200):
        if server.open_connections == expected:
            return
        await asyncio.sleep(0.02)
    assert server.open_connections == expected


async def test_each_pause_at_the_cap_is_counted(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}], max_connections=2
    )
    port = proxy.service.api_address.port  # type: ignore[union-attr]
    first = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await _open_connections(proxy, 2)
    assert await metric(proxy, "zrproxy_accept_pauses_total") == 1
    first.pop()[1].close()  # below the cap: accepting again
    await _open_connections(proxy, 1)
    again = await asyncio.open_connection("127.0.0.1", port)
    await _open_connections(proxy, 2)
    assert await metric(proxy, "zrproxy_accept_pauses_total") == 2
    for _, writer in [*first, again]:
        writer.close()
