"""An upstream 404 that means a wrong base_url (the provider's "unknown URL" answer) is
the operator's problem: counted as upstream error kind `not_found`, logged once per
upstream without content, failed over, and answered 502 `upstream_not_found` in the
API's format, never with the provider's body (OpenAI's quotes our request line). A 404
about the model the client asked for is the client's, and passes through as before.
Fakes answer with the providers' real bodies; the mock, started as one kind, answers
only that kind's paths."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import Mock, StartProxy, metric
from tests.fakes import (
    ANTHROPIC_MODEL_404,
    ANTHROPIC_UNKNOWN_URL_404,
    AZURE_DEPLOYMENT_404,
    AZURE_UNKNOWN_URL_404,
    OPENAI_MODEL_404,
    OPENAI_UNKNOWN_URL_404,
    OPENAI_UNKNOWN_URL_CODE_404,
    FakeUpstreams,
)
from zrproxy.mock_upstream import MOCK_STATS, start_mock

HELLO = [{"role": "user", "content": "hi"}]
REASON = "check its base_url"


def answering(body: bytes, content_type: str = "application/json") -> web.Response:
    return web.Response(status=404, body=body, content_type=content_type)


def upstream(kind: str, url: str, name: str = "up") -> dict[str, object]:
    extra: dict[str, object] = {}
    if kind == "azure_openai":
        url, extra = url.removesuffix("/v1"), {"api_version": "2024-10-21"}
    return {"name": name, "kind": kind, "base_url": url, **extra}


async def _chat(proxy_url: str, key: str, session: aiohttp.ClientSession) -> tuple[int, bytes]:
    body = {"model": "gpt-4o", "messages": HELLO}
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(proxy_url + "/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.read()


@pytest.mark.parametrize(
    ("kind", "body", "content_type"),
    [
        ("openai", OPENAI_UNKNOWN_URL_404, "application/json"),
        ("openai", OPENAI_UNKNOWN_URL_CODE_404, "application/json"),
        ("openai", b"<html><body><h1>404 Not Found</h1>nginx</body></html>", "text/html"),
        ("azure_openai", AZURE_UNKNOWN_URL_404, "application/json"),
    ],
)
async def test_an_unknown_url_404_is_502_counted_and_logged_once(
    fakes: FakeUpstreams,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    body: bytes,
    content_type: str,
) -> None:
    caplog.set_level(logging.WARNING)

    async def handle(_request: web.Request) -> web.Response:
        return answering(body, content_type)

    fake = await fakes.start("wrong-base", handler=handle)
    proxy = await start_proxy([upstream(kind, fake.url)])
    for _ in range(2):
        status, answer = await _chat(proxy.url, proxy.key, session)
        assert status == 502
        error = orjson.loads(answer)["error"]
        assert error["code"] == "upstream_not_found"
        assert answer.find(b"Invalid URL") == answer.find(b"Resource not found") == -1
        assert b"nginx" not in answer
    count = await metric(proxy, "zrproxy_upstream_errors_total", upstream="up", kind="not_found")
    assert count == 2
    reasons = [r.getMessage() for r in caplog.records if REASON in r.getMessage()]
    assert reasons == [
        "upstream up: answered 404 for the endpoint path (the provider's unknown-URL"
        " answer): check its base_url"
    ]


async def test_anthropics_unknown_url_404_through_the_sdk(
    fakes: FakeUpstreams, start_proxy: StartProxy
) -> None:
    async def handle(_request: web.Request) -> web.Response:
        return answering(ANTHROPIC_UNKNOWN_URL_404)

    fake = await fakes.start("wrong-base", handler=handle)
    proxy = await start_proxy([upstream("anthropic", fake.url)])
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=proxy.key, max_retries=0)
    async with client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(model="claude-x", max_tokens=5, messages=HELLO)
    assert info.value.status_code == 502
    assert info.value.body == {
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "The upstream does not serve this endpoint at its configured address.",
        },
    }


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("openai", OPENAI_MODEL_404),
        ("anthropic", ANTHROPIC_MODEL_404),
        ("azure_openai", AZURE_DEPLOYMENT_404),
    ],
)
async def test_a_model_404_is_the_clients_and_passes_through(
    fakes: FakeUpstreams,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    kind: str,
    body: bytes,
) -> None:
    async def handle(_request: web.Request) -> web.Response:
        return answering(body)

    fake = await fakes.start("model-404", handler=handle)
    proxy = await start_proxy([upstream(kind, fake.url)])
    path = "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"
    payload = {"model": "gpt-9", "messages": HELLO, "max_tokens": 5}
    async with session.post(proxy.url + path, json=payload, headers=proxy.auth()) as resp:
        assert resp.status == 404
        assert await resp.read() == body
    assert await metric(proxy, "zrproxy_upstream_errors_total", kind="not_found") == 0


@pytest.fixture
async def openai_mock() -> AsyncIterator[Mock]:
    runner, url = await start_mock(kind="openai")
    try:
        yield Mock(url, runner.app[MOCK_STATS])
    finally:
        await runner.cleanup()


async def test_a_wrong_base_url_fails_over_to_the_next_upstream(
    openai_mock: Mock, start_proxy: StartProxy
) -> None:
    # The same mock twice: once behind a base_url with the wrong version path, where it
    # answers OpenAI's unknown-URL 404, once right.
    wrong = upstream("openai", openai_mock.url.removesuffix("/v1") + "/v2", name="wrong")
    proxy = await start_proxy([wrong, upstream("openai", openai_mock.url, name="right")])
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        chat = await client.chat.completions.create(model="mock-n2", messages=HELLO)
    assert chat.choices[0].message.content
    wrong_count = await metric(
        proxy, "zrproxy_upstream_errors_total", upstream="wrong", kind="not_found"
    )
    assert wrong_count == 1
    assert await metric(proxy, "zrproxy_failovers_total") == 1


async def test_a_404_body_that_never_ends_or_is_huge_is_not_found(
    fakes: FakeUpstreams, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    async def never_ends(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=404, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(OPENAI_MODEL_404[:20])
        await asyncio.get_running_loop().create_future()  # the rest never comes
        return response

    async def huge(_request: web.Request) -> web.Response:
        # A model-not-found document padded past any API's error size.
        return answering(OPENAI_MODEL_404[:-1] + b',"pad":"' + b"x" * 100_000 + b'"}')

    slow = await fakes.start("slow", handler=never_ends)
    big = await fakes.start("big", handler=huge)
    proxy = await start_proxy(
        [upstream("openai", slow.url, name="slow"), upstream("openai", big.url, name="big")],
        idle_timeout_s=0.5,
    )
    status, answer = await _chat(proxy.url, proxy.key, session)
    assert status == 502 and orjson.loads(answer)["error"]["code"] == "upstream_not_found"
    assert slow.hits == big.hits == 1
    for name in ("slow", "big"):
        count = await metric(
            proxy, "zrproxy_upstream_errors_total", upstream=name, kind="not_found"
        )
        assert count == 1, name
