"""Graceful drain: readiness flips at once, the listener closes, streams get a deadline."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import Mock, StartProxy, config_data, raw_post
from tests.processes import mock_process, proxy_process
from zrproxy.auth import new_key

CHAT = "/v1/chat/completions"


def _body(model: str) -> bytes:
    return orjson.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )


async def _open_streams(admin_url: str) -> float:
    async with aiohttp.ClientSession() as client, client.get(admin_url + "/metrics") as r:
        text = await r.text()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("zrproxy_open_streams")
    )


async def _read_all(resp: aiohttp.ClientResponse) -> bytes:
    return await resp.content.read()


async def test_drain_finishes_short_streams_and_ends_long_ones(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}], drain_timeout_s=1.0
    )
    async with aiohttp.ClientSession() as client:
        short = await client.post(
            proxy.url + CHAT, data=_body("mock-n5-d100"), headers=proxy.auth()
        )
        # Read raw: the proxy cuts it after the error event, and aiohttp's client drops
        # bytes that arrive together with a cut.
        long = asyncio.create_task(raw_post(proxy.url, CHAT, _body("mock-n200-d50"), proxy.auth()))
        while mock.stats.started < 2:
            await asyncio.sleep(0.02)
        assert short.status == 200
        drain = asyncio.create_task(proxy.service.drain())
        await asyncio.sleep(0.1)
        # Readiness flips at once; the admin listener keeps answering.
        async with client.get(proxy.admin_url + "/readyz") as ready:
            assert ready.status == 503
        async with client.get(proxy.admin_url + "/healthz") as health:
            assert health.status == 200
        # The API listener takes no new connections.
        try:
            async with aiohttp.ClientSession() as fresh:
                await fresh.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth())
        except aiohttp.ClientConnectionError:
            pass
        else:
            raise AssertionError("a new connection was accepted while draining")
        short_body, long_resp = await asyncio.gather(_read_all(short), long)
        assert long_resp.status == 200 and not long_resp.complete
        long_body = long_resp.body
        await drain
        # The short stream ran to its natural end; the long one got the API's error event.
        assert short_body.endswith(b"data: [DONE]\n\n")
        assert b'"error"' not in short_body
        assert b"[DONE]" not in long_body
        last_event = long_body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        assert last_event.startswith(b"data: ")
        error = orjson.loads(last_event[len(b"data: ") :])["error"]
        assert error["code"] == "draining"


async def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    key, digest = new_key()
    with mock_process() as mock:
        config = config_data(
            [{"name": "mock", "kind": "openai", "base_url": mock.url}], digest, drain_timeout_s=1
        )
        with proxy_process(config, tmp_path) as proxy:
            headers = {"Authorization": f"Bearer {key}"}
            stream = asyncio.create_task(raw_post(proxy.url, CHAT, _body("mock-n200-d50"), headers))
            for _ in range(200):
                if await _open_streams(proxy.admin_url) >= 1:
                    break
                await asyncio.sleep(0.05)
            proxy.process.send_signal(signal.SIGTERM)
            resp = await stream
            assert resp.status == 200 and not resp.complete
            assert b'"code":"draining"' in resp.body
            assert await asyncio.to_thread(proxy.process.wait, 15) == 0
