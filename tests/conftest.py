"""Shared fixtures: the real proxy and the bundled mock, on loopback sockets, port 0.

The proxy runs through our own `Service` (never aiohttp's TestServer), so tests see
production settings: handler cancellation on, access log off, our request handler.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeUpstreams
from zrproxy.app import Service
from zrproxy.auth import new_key
from zrproxy.config import parse_config
from zrproxy.mock_upstream import MOCK_STATS, MockStats, start_mock

_E2E = Path(__file__).parent / "e2e"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """uvloop everywhere. An end-to-end test whose proxy runs in the test's own loop (it
    uses `start_proxy`, directly or through `proxy`) runs on the standard loop too, which
    scrub mode runs on: ids `[uvloop-...]` and `[asyncio-...]`. Tests of the mock alone,
    and tests whose proxy is a subprocess (it picks its own loop), run on uvloop only."""
    if item.path.is_relative_to(_E2E) and "start_proxy" in getattr(item, "fixturenames", ()):
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@dataclass
class Mock:
    """The bundled mock, once per provider kind, the two sharing one `stats`: each
    answers only its kind's paths, so a request sent across kinds fails the test."""

    url: str  # the OpenAI-kind mock's base URL, ending in /v1, for an upstream base_url
    stats: MockStats
    anthropic_url: str = ""  # the Anthropic-kind mock's; "" for a mock of one kind

    def url_for(self, kind: str) -> str:
        return self.anthropic_url if kind == "anthropic" and self.anthropic_url else self.url


@dataclass
class RunningProxy:
    service: Service
    url: str  # http://127.0.0.1:PORT
    admin_url: str
    key: str  # a valid API key of project "acme"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
async def fakes() -> AsyncIterator[FakeUpstreams]:
    """Fake upstreams for what the mock cannot express (see tests/fakes.py)."""
    f = FakeUpstreams()
    yield f
    await f.close()


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    runner, url = await start_mock(kind="openai")
    stats = runner.app[MOCK_STATS]
    try:
        anthropic_runner, anthropic_url = await start_mock(kind="anthropic", stats=stats)
    except BaseException:
        await runner.cleanup()
        raise
    try:
        yield Mock(url, stats, anthropic_url)
    finally:
        await anthropic_runner.cleanup()
        await runner.cleanup()


def config_data(
    upstreams: list[dict[str, Any]],
    key_sha256: str,
    *,
    routes: list[dict[str, Any]] | None = None,
    projects: list[dict[str, Any]] | None = None,
    zero_retention: bool = True,
    project: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    **server: Any,
) -> dict[str, Any]:
    """A config as parsed TOML data; listeners on loopback port 0. `project` adds keys to
    the default project "acme"; `limits` is the [limits] table.

    Upstreams declare `zero_data_retention = true` unless they say otherwise: the test
    upstreams (the bundled mock, fakes on loopback) keep nothing, and projects have zero
    retention by default, so only such upstreams may serve them."""
    data = {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **server},
        "upstreams": [{"zero_data_retention": True, **u} for u in upstreams],
        "routes": routes or [{"model": "*", "upstreams": [u["name"] for u in upstreams]}],
        "projects": projects
        or [
            {
                "name": "acme",
                "key_sha256": [key_sha256],
                "zero_retention": zero_retention,
                **(project or {}),
            }
        ],
    }
    if limits is not None:
        data["limits"] = limits
    return data


def kind_for(path: str) -> str:
    """The upstream kind that serves an API path (the proxy never crosses them)."""
    return "anthropic" if path.startswith("/v1/messages") else "openai"


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """start_proxy(upstreams, routes=..., projects=..., zero_retention=..., environ=...,
    **server) -> RunningProxy"""
    services: list[Service] = []

    async def start(
        upstreams: list[dict[str, Any]],
        *,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> RunningProxy:
        key, digest = new_key()
        data = config_data(copy.deepcopy(upstreams), digest, **kwargs)
        service = Service(parse_config(data, environ or {}))
        await service.start()
        services.append(service)
        return RunningProxy(
            service, f"http://{service.api_address}", f"http://{service.admin_address}", key
        )

    yield start
    for service in services:
        await service.stop()


@pytest.fixture
async def proxy(mock: Mock, start_proxy: StartProxy) -> RunningProxy:
    """The proxy with the OpenAI-kind mock as upstream "mock" and the Anthropic-kind one
    as "mock-anthropic", serving every model on every endpoint."""
    return await start_proxy(
        [
            {"name": "mock", "kind": "openai", "base_url": mock.url},
            {"name": "mock-anthropic", "kind": "anthropic", "base_url": mock.anthropic_url},
        ]
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The client of a test (aiohttp, no connection reused across tests)."""
    async with aiohttp.ClientSession() as s:
        yield s


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    data: Any = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, bytes]:
    """One request; the response (released) and its whole body."""
    async with session.request(method, url, data=data, headers=headers) as resp:
        return resp, await resp.read()


async def post(
    session: aiohttp.ClientSession, url: str, data: Any, headers: Mapping[str, str]
) -> tuple[aiohttp.ClientResponse, bytes]:
    return await exchange(session, "POST", url, data=data, headers=headers)


async def metric(proxy: RunningProxy | str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 if none), read
    from a proxy's admin listener (a `RunningProxy`, or the admin URL of a process)."""
    admin_url = proxy if isinstance(proxy, str) else proxy.admin_url
    async with aiohttp.ClientSession() as s, s.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def settled_metric(
    proxy: RunningProxy | str, name: str, expected: float, **labels: str
) -> float:
    """`metric()` once it equals `expected`, or its value after 10 s of polling. For a
    proxy in another process: it counts a request just after the client has the whole
    response, so a scrape right after the response may not see it yet."""
    deadline = asyncio.get_running_loop().time() + 10
    while (value := await metric(proxy, name, **labels)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    return value


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes  # de-chunked
    complete: bool  # the terminating chunk (or the whole Content-Length) arrived


async def raw_post(url: str, path: str, body: bytes, headers: dict[str, str]) -> RawResponse:
    """POST on a raw socket and read the response as sent: unlike aiohttp's client, which
    drops bytes that arrive together with a cut, this keeps every byte before the cut and
    says whether the body was ended properly."""
    import asyncio

    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(head.encode() + b"\r\n" + body)
    try:
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        lines = raw_head.decode("latin-1").split("\r\n")
        fields = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:-2])
        }
        status = int(lines[0].split()[1])
        parts: list[bytes] = []
        complete = False
        try:
            if fields.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int(
                        (await asyncio.wait_for(reader.readuntil(b"\r\n"), 60)).split(b";")[0], 16
                    )
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        complete = True
                        break
                    parts.append((await asyncio.wait_for(reader.readexactly(size + 2), 60))[:-2])
            else:
                length = int(fields.get("content-length", "0"))
                parts.append(await asyncio.wait_for(reader.readexactly(length), 60))
                complete = True
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                parts.append(exc.partial)
        return RawResponse(status, fields, b"".join(parts), complete)
    finally:
        writer.close()
