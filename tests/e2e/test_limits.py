"""Admission limits on the real proxy: global caps (503), per-project limits (429), the
connection cap, division between workers and the Redis backend with its fallback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import Mock, RunningProxy, StartProxy, config_data, metric
from tests.redis_server import free_port, redis_server
from zrproxy.limits import share

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def _body(model: str, stream: bool = True) -> bytes:
    return orjson.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )


def _upstreams(mock: Mock) -> list[dict[str, Any]]:
    return [{"name": "mock", "kind": "openai", "base_url": mock.url}]


@asynccontextmanager
async def _one_stream_open(
    client: aiohttp.ClientSession, proxy: RunningProxy
) -> AsyncIterator[None]:
    """A stream the mock paces over about a second, open for the block (it holds one
    in-flight request, one stream and one of the project's concurrent slots)."""
    first = await client.post(proxy.url + CHAT, data=_body("mock-n20-d50"), headers=proxy.auth())
    try:
        assert first.status == 200
        yield
    finally:
        await first.read()
        first.release()


async def _status(
    client: aiohttp.ClientSession, proxy: RunningProxy, path: str = CHAT, stream: bool = True
) -> int:
    async with client.post(proxy.url + path, data=_body("mock", stream), headers=proxy.auth()) as r:
        await r.read()
        return r.status


async def test_share_divides_each_limit_between_workers() -> None:
    assert share(10, 1) == 10
    assert share(10, 4) == 2
    assert share(3, 8) == 1  # never 0: every worker can serve something


async def test_max_in_flight_answers_503_without_upstream_work(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), max_in_flight=1)
    async with aiohttp.ClientSession() as client, _one_stream_open(client, proxy):
        started = mock.stats.started
        for path in (CHAT, MESSAGES):
            async with client.post(
                proxy.url + path, data=_body("mock"), headers=proxy.auth()
            ) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                payload = orjson.loads(await refused.read())
            error = payload["error"]
            assert error["type"] == "overloaded_error"
            if path == CHAT:
                assert error["code"] == "overloaded"
            else:
                assert payload["type"] == "error"
        assert mock.stats.started == started  # the refusals cost no upstream request
    async with aiohttp.ClientSession() as client:
        assert await _status(client, proxy) == 200  # load dropped: served again
    assert await metric(proxy, "zrproxy_rejections_total", reason="overloaded") == 2


async def test_max_streams_caps_streams_not_plain_requests(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), max_streams=1)
    async with aiohttp.ClientSession() as client, _one_stream_open(client, proxy):
        started = mock.stats.started
        async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            assert orjson.loads(await r.read())["error"]["code"] == "overloaded"
        assert mock.stats.started == started
        assert await _status(client, proxy, stream=False) == 200
    async with aiohttp.ClientSession() as client:
        assert await _status(client, proxy) == 200


async def _request_on_fresh_connection(url: str, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as client,
        client.post(url + CHAT, data=_body("mock", stream=False), headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


async def test_max_connections_pauses_accepting_until_one_closes(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), max_connections=2)
    port = proxy.service.api_address.port  # type: ignore[union-attr]
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    # Both idle connections were accepted (the server counts them) before the cap.
    server = proxy.service._api_server
    assert server is not None
    for _ in range(100):
        if server.open_connections == 2:
            break
        await asyncio.sleep(0.02)
    assert server.open_connections == 2
    third = asyncio.create_task(_request_on_fresh_connection(proxy.url, proxy.auth()))
    done, _ = await asyncio.wait({third}, timeout=0.5)
    assert not done  # waiting in the backlog: not accepted, not refused
    assert mock.stats.started == 0
    _, writer = idle.pop()
    writer.close()
    assert await asyncio.wait_for(third, 10) == 200  # accepting again once one closed
    for _, writer in idle:
        writer.close()


async def test_project_max_concurrent_answers_429_in_each_api_format(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), project={"max_concurrent": 1})
    async with aiohttp.ClientSession() as client, _one_stream_open(client, proxy):
        started = mock.stats.started
        async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "1"
            error = orjson.loads(await r.read())["error"]
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "rate_limit_exceeded"
        async with client.post(proxy.url + MESSAGES, data=_body("mock"), headers=proxy.auth()) as r:
            assert r.status == 429
            payload = orjson.loads(await r.read())
        assert payload == {"type": "error", "error": payload["error"]}
        assert payload["error"]["type"] == "rate_limit_error"
        assert mock.stats.started == started
    async with aiohttp.ClientSession() as client:
        assert await _status(client, proxy) == 200
    assert await metric(proxy, "zrproxy_rejections_total", reason="rate_limit") == 2


def _freeze_clock(proxy: RunningProxy, at: float) -> None:
    """Pin the limiter's wall clock inside one minute window, so the test can't straddle
    a window boundary."""
    assert proxy.service._proxy is not None
    proxy.service._proxy.limits.projects.clock = lambda: at


async def test_requests_per_minute(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock), project={"requests_per_minute": 2})
    _freeze_clock(proxy, 6_000_000.0 + 15)  # 15 s into a window: 45 s left
    statuses = []
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
                await r.read()
                statuses.append((r.status, r.headers.get("Retry-After")))
    assert statuses[:2] == [(200, None), (200, None)]
    assert statuses[2] == (429, "45")
    assert mock.stats.started == 2
    _freeze_clock(proxy, 6_000_000.0 + 60)  # the next window
    async with aiohttp.ClientSession() as client:
        async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
            assert r.status == 200


async def test_tokens_per_minute_from_the_usage_the_proxy_reads(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), project={"tokens_per_minute": 10})
    _freeze_clock(proxy, 6_000_000.0)
    async with aiohttp.ClientSession() as client:
        # 12 completion tokens (mock-n12) plus the prompt's: over the minute's 10.
        async with client.post(proxy.url + CHAT, data=_body("mock-n12"), headers=proxy.auth()) as r:
            assert r.status == 200
            await r.read()
        for _ in range(100):  # the usage is counted as the handler finishes
            if await metric(proxy, "zrproxy_tokens_total", type="completion") > 0:
                break
            await asyncio.sleep(0.02)
        started = mock.stats.started
        async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "60"
            assert orjson.loads(await r.read())["error"]["code"] == "rate_limit_exceeded"
        assert mock.stats.started == started


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        # One of two workers (config says 2): it holds max_concurrent=2 to a share of 1.
        ({"project": {"max_concurrent": 2}, "workers": 2}, 429),
        # 4 / 4 workers = 1 per process.
        ({"max_in_flight": 4, "workers": 4}, 503),
    ],
    ids=["per-project", "global"],
)
async def test_workers_divide_limits(
    mock: Mock, start_proxy: StartProxy, settings: dict[str, Any], refused: int
) -> None:
    proxy = await start_proxy(_upstreams(mock), **settings)
    async with aiohttp.ClientSession() as client, _one_stream_open(client, proxy):
        assert await _status(client, proxy) == refused


async def test_redis_holds_a_project_limit_across_processes(
    mock: Mock, start_proxy: StartProxy
) -> None:
    with redis_server() as url:
        # Two replicas with one Redis: requests_per_minute = 2 for the whole service.
        replicas = []
        for _ in range(2):
            p = await start_proxy(
                _upstreams(mock), project={"requests_per_minute": 2}, limits={"redis_url": url}
            )
            _freeze_clock(p, 6_000_000.0 + 1)
            replicas.append(p)
        statuses = []
        async with aiohttp.ClientSession() as client:
            for p in (replicas[0], replicas[1], replicas[1], replicas[0]):
                async with client.post(p.url + CHAT, data=_body("mock"), headers=p.auth()) as r:
                    await r.read()
                    statuses.append(r.status)
        # Per process (without Redis) each would have admitted two.
        assert statuses == [200, 200, 429, 429]
        assert mock.stats.started == 2
        assert await metric(replicas[0], "zrproxy_limits_backend", backend="redis") == 1
        # Metadata only: project names, counts and random lease ids.
        client = aioredis.Redis.from_url(url)
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys, "nothing was counted in redis"
        assert all(
            k.startswith(("zrproxy:r:acme:", "zrproxy:t:acme:", "zrproxy:c:acme")) for k in keys
        )
        for key in keys:
            if key.startswith("zrproxy:r:"):
                assert (await client.get(key)).isdigit()
        await client.aclose()


async def test_unreachable_redis_falls_back_to_shares_and_says_so(
    mock: Mock, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="zrproxy")
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proxy = await start_proxy(
        _upstreams(mock), project={"max_concurrent": 2}, limits={"redis_url": dead}, workers=2
    )
    async with aiohttp.ClientSession() as client, _one_stream_open(client, proxy):  # served
        # The fallback share: 2 / 2 workers = 1 in this process.
        for _ in range(3):
            assert await _status(client, proxy) == 429
    assert await metric(proxy, "zrproxy_limits_backend", backend="local") == 1
    assert await metric(proxy, "zrproxy_limits_backend", backend="redis") == 0
    lines = [r.getMessage() for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(lines) == 1


async def test_redis_going_away_mid_service_falls_back(
    mock: Mock, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="zrproxy")
    with redis_server() as url:
        proxy = await start_proxy(
            _upstreams(mock), project={"requests_per_minute": 100}, limits={"redis_url": url}
        )
        async with aiohttp.ClientSession() as client:
            async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
                assert r.status == 200
                await r.read()
        assert await metric(proxy, "zrproxy_limits_backend", backend="redis") == 1
    # redis-server is gone now: still served, on per-process shares.
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(proxy.url + CHAT, data=_body("mock"), headers=proxy.auth()) as r:
                assert r.status == 200
                await r.read()
    assert await metric(proxy, "zrproxy_limits_backend", backend="local") == 1
    lines = [r.getMessage() for r in caplog.records if "redis unreachable" in r.getMessage()]
    assert len(lines) == 1


def test_limit_keys_are_validated_by_key_path() -> None:
    from zrproxy.config import parse_config
    from zrproxy.errors import ConfigError

    upstream = {"name": "m", "kind": "openai", "base_url": "http://127.0.0.1:1/v1"}
    base = config_data([upstream], "a" * 64)
    project = {**base["projects"][0], "tokens_per_minute": True}
    for patch, key in (
        ({"limits": {"redis_url": "http://x"}}, "limits.redis_url"),
        ({"limits": {"redis": "redis://x"}}, "limits.redis"),
        ({"server": {**base["server"], "max_in_flight": 0}}, "server.max_in_flight"),
        ({"projects": [project]}, "projects[0].tokens_per_minute"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, **patch}, {})
        assert caught.value.key_path == key


def test_the_redis_url_is_never_printed() -> None:
    from zrproxy.config import LimitsConfig

    assert "s3cret" not in repr(LimitsConfig(redis_url="redis://:s3cret@127.0.0.1:6379/0"))
