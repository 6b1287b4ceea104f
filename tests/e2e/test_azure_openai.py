"""Upstream kind `azure_openai`: the OpenAI SDK talks to the proxy as to OpenAI, the proxy
talks to Azure OpenAI as Azure wants it: the `api-key` header, the operator's
`api-version` as the only query string, deployment paths. The upstream is the bundled
mock playing Azure (`--kind azure_openai`: only deployment paths, `api-key` and
`api-version` required, Azure's error bodies), checked first against the official
`AzureOpenAI` client so its paths are the ones Azure's SDK uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import Mock, StartProxy, metric
from tests.fakes import AZURE_HEADERS, FakeUpstreams
from zrproxy.mock_upstream import MOCK_STATS, RequestRecord, start_mock

API_VERSION = "2024-10-21"
ENV = {"AZURE_OPENAI_KEY": "azure-operator-key-0123"}
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def azure() -> AsyncIterator[Mock]:
    """The mock playing an Azure OpenAI resource; url is its endpoint (no /v1)."""
    runner, url = await start_mock(kind="azure_openai")
    try:
        yield Mock(url, runner.app[MOCK_STATS])
    finally:
        await runner.cleanup()


def azure_upstream(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "azure",
        "kind": "azure_openai",
        "base_url": url,
        "api_version": API_VERSION,
        "api_key_env": "AZURE_OPENAI_KEY",
        **extra,
    }


def record(mock: Mock, rid: str) -> RequestRecord:
    return mock.stats.requests[rid]


async def test_the_mock_speaks_azure_as_the_official_azure_sdk_expects(azure: Mock) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=azure.url, api_key="k", api_version=API_VERSION, max_retries=0
    )
    async with client:
        chat = await client.chat.completions.create(
            model="my-deploy", messages=HELLO, extra_headers={"X-Request-Id": "sdk"}
        )
    assert chat.choices[0].message.content
    rec = record(azure, "sdk")
    assert rec.path == "/openai/deployments/my-deploy/chat/completions"
    assert (rec.api_version, rec.api_key) == (API_VERSION, "k")


async def test_chat_goes_to_the_listed_deployment_with_api_key_and_api_version(
    azure: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        [azure_upstream(azure.url, deployments={"gpt-4o": "prod-gpt4o"})], environ=ENV
    )
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        chat = await client.chat.completions.create(
            model="gpt-4o", messages=HELLO, extra_headers={"X-Request-Id": "az-chat"}
        )
    assert chat.choices[0].message.content
    rec = record(azure, "az-chat")
    assert rec.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert rec.api_version == API_VERSION
    assert rec.api_key == ENV["AZURE_OPENAI_KEY"]
    assert rec.authorization is None  # neither ours nor the client's Bearer
    # Zero retention (the project default): Azure gets no `store` (older api-versions
    # reject it, and Azure stores nothing unless asked).
    assert "store" not in rec.body_keys


async def test_a_model_without_a_listed_deployment_uses_its_own_name(
    azure: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        [azure_upstream(azure.url, deployments={"gpt-4o": "prod-gpt4o"})], environ=ENV
    )
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        emb = await client.embeddings.create(
            model="text-embedding-3-small", input="hi", extra_headers={"X-Request-Id": "az-e"}
        )
        text = await client.completions.create(
            model="gpt-35-instruct", prompt="hi", extra_headers={"X-Request-Id": "az-c"}
        )
    assert emb.data and text.choices
    assert record(azure, "az-e").path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert record(azure, "az-c").path == "/openai/deployments/gpt-35-instruct/completions"


async def test_streams_are_asked_for_usage_and_counted(
    azure: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy([azure_upstream(azure.url)], environ=ENV)
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        stream = await client.chat.completions.create(
            model="mock-n4",
            messages=HELLO,
            stream=True,
            extra_headers={"X-Request-Id": "az-s"},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks and all(c.usage is None for c in chunks)  # the usage event was ours
    assert record(azure, "az-s").stream_options == {"include_usage": True}
    tokens = await metric(proxy, "zrproxy_tokens_total", upstream="azure")
    assert tokens > 0


async def test_a_client_query_string_is_never_forwarded(
    azure: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy([azure_upstream(azure.url)], environ=ENV)
    body = orjson.dumps({"model": "mock-n2", "messages": HELLO})
    url = proxy.url + "/v1/chat/completions?api-version=2099-01-01&deployment=other"
    headers = {**proxy.auth(), "X-Request-Id": "az-q", "Content-Type": "application/json"}
    async with session.post(url, data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.read()
    rec = record(azure, "az-q")
    assert rec.api_version == API_VERSION
    assert rec.path == "/openai/deployments/mock-n2/chat/completions"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "gpt-4o", "input": "hi"}),
        ("/v1/moderations", {"model": "gpt-4o", "input": "hi"}),
    ],
)
async def test_endpoints_azure_deployments_lack_are_400(
    azure: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
) -> None:
    proxy = await start_proxy([azure_upstream(azure.url)], environ=ENV)
    async with session.post(proxy.url + path, json=body, headers=proxy.auth()) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "unsupported_endpoint_for_model"
    assert azure.stats.started == 0


async def test_responses_fail_over_to_an_openai_upstream_of_the_route(
    azure: Mock, mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        [azure_upstream(azure.url), {"name": "oa", "kind": "openai", "base_url": mock.url}],
        environ=ENV,
    )
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        chat = await client.chat.completions.create(model="mock-n2", messages=HELLO)
        response = await client.responses.create(model="mock-n2", input="hi")
    assert chat.choices and response.output
    assert azure.stats.started == 1 and mock.stats.started == 1  # chat to Azure, first


async def test_azure_refusing_our_key_is_upstream_auth_failed(
    azure: Mock, start_proxy: StartProxy
) -> None:
    upstream = azure_upstream(azure.url)
    del upstream["api_key_env"]  # no api-key header: the mock answers Azure's 401
    proxy = await start_proxy([upstream])
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="mock-n2", messages=HELLO)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_auth_failed"
    kinds = await metric(proxy, "zrproxy_upstream_errors_total", upstream="azure", kind="auth")
    assert kinds == 1


async def test_azure_response_headers_pass_the_allowlist(
    fakes: FakeUpstreams, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    fake = await fakes.start("azure")
    fake.headers = dict(AZURE_HEADERS)
    base = fake.url.removesuffix("/v1")
    proxy = await start_proxy([azure_upstream(base)], environ=ENV)
    body = {"model": "gpt-4o", "messages": HELLO}
    async with session.post(
        proxy.url + "/v1/chat/completions", json=body, headers=proxy.auth()
    ) as resp:
        assert resp.status == 200
        names = {name.lower() for name in resp.headers}
    assert resp.headers["X-Upstream-Request-Id"] == AZURE_HEADERS["x-request-id"]
    leaked = names & {n for n in AZURE_HEADERS if n != "x-request-id"}
    assert leaked == set()
    assert (
        fake.last.raw_path
        == f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"
    )
    assert fake.last.headers["api-key"] == ENV["AZURE_OPENAI_KEY"]
    assert "authorization" not in {n.lower() for n in fake.last.headers}


async def test_a_model_id_goes_into_the_deployment_path_percent_encoded(
    fakes: FakeUpstreams, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    fake = await fakes.start("azure")
    proxy = await start_proxy([azure_upstream(fake.url.removesuffix("/v1"))], environ=ENV)
    for model, segment in [
        ("../x/chat?api-version=1#", "..%2Fx%2Fchat%3Fapi-version%3D1%23"),
        ("..", "%2E%2E"),
    ]:
        body = {"model": model, "messages": HELLO}
        async with session.post(
            proxy.url + "/v1/chat/completions", json=body, headers=proxy.auth()
        ) as resp:
            assert resp.status == 200
        assert fake.last.raw_path == (
            f"/openai/deployments/{segment}/chat/completions?api-version={API_VERSION}"
        )


async def test_a_zero_retention_request_asking_azure_to_store_is_refused(
    azure: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy([azure_upstream(azure.url)], environ=ENV)
    body = {"model": "gpt-4o", "messages": HELLO, "store": True}
    async with session.post(
        proxy.url + "/v1/chat/completions", json=body, headers=proxy.auth()
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "zero_retention_conflict"
    assert azure.stats.started == 0
