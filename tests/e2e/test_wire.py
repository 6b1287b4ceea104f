"""The API surface as the providers speak it: endpoints, which upstream kind serves which
API, and the 4xx a refusal gets (permanent refusals are never 503, which SDKs retry)."""

from __future__ import annotations

import json
import logging

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import Mock, RunningProxy, StartProxy, metric
from tests.fakes import closed_port
from zrproxy.auth import new_key


async def test_count_tokens_through_the_anthropic_sdk(mock: Mock, proxy: RunningProxy) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key=proxy.key, max_retries=0
    ) as client:
        count = await client.messages.count_tokens(
            model="mock", messages=[{"role": "user", "content": "hello"}]
        )
    assert count.input_tokens > 0
    (record,) = mock.stats.requests.values()
    assert record.path == "/v1/messages/count_tokens"
    assert await metric(proxy, "zrproxy_requests_total", upstream="mock-anthropic") == 1


async def test_moderations_through_the_openai_sdk(mock: Mock, proxy: RunningProxy) -> None:
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        # No model in the body: routed on the API's own default, as OpenAI does.
        result = await client.moderations.create(input="hello")
    assert result.results[0].flagged is False
    (record,) = mock.stats.requests.values()
    assert record.path == "/v1/moderations"
    assert await metric(proxy, "zrproxy_requests_total", upstream="mock") == 1


async def test_models_list_through_both_sdks(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}],
        routes=[{"model": "mock*", "upstreams": ["mock"], "models": ["mock", "mock-n2"]}],
    )
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
    ) as client:
        assert [m.id async for m in client.models.list()] == ["mock", "mock-n2"]
        assert (await client.models.retrieve("mock-n2")).id == "mock-n2"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("mock-n3")
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key=proxy.key, max_retries=0
    ) as aclient:
        assert [m.id async for m in aclient.models.list()] == ["mock", "mock-n2"]
        assert (await aclient.models.retrieve("mock")).id == "mock"


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("openai", "/v1/messages"),
        ("openai", "/v1/messages/count_tokens"),
        ("anthropic", "/v1/chat/completions"),
        ("anthropic", "/v1/responses"),
        ("anthropic", "/v1/embeddings"),
    ],
)
async def test_endpoint_the_models_upstreams_lack_is_400(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession, kind: str, path: str
) -> None:
    proxy = await start_proxy([{"name": "up", "kind": kind, "base_url": mock.url_for(kind)}])
    body = {"model": "mock", "input": "x", "messages": [{"role": "user", "content": "x"}]}
    async with session.post(proxy.url + path, json=body, headers=proxy.auth()) as resp:
        assert resp.status == 400
        doc = await resp.json()
    error = doc["error"]
    assert error["type"] == "invalid_request_error"
    if "code" in error:
        assert error["code"] == "unsupported_endpoint_for_model"
    assert mock.stats.started == 0  # never sent to a path the upstream doesn't have
    # Routed before it was refused: the rejection carries the project and the route.
    assert (
        await metric(
            proxy, "zrproxy_rejections_total", reason="endpoint", project="acme", route="*"
        )
        == 1
    )


async def test_failover_skips_upstreams_of_the_other_kind(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        [
            {"name": "oa", "kind": "openai", "base_url": mock.url},
            {"name": "an", "kind": "anthropic", "base_url": mock.anthropic_url},
        ],
        routes=[{"model": "*", "upstreams": ["oa", "an"]}],
    )
    body = {"model": "mock", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    async with session.post(proxy.url + "/v1/messages", json=body, headers=proxy.auth()) as resp:
        assert resp.status == 200
    assert await metric(proxy, "zrproxy_requests_total", upstream="an") == 1
    assert await metric(proxy, "zrproxy_failovers_total") == 0  # "oa" was never a candidate


async def test_unknown_api_path_authenticates_before_its_404(
    proxy: RunningProxy, session: aiohttp.ClientSession
) -> None:
    # Without a key nobody learns which paths exist; with one, 404 says what it was.
    async with session.post(proxy.url + "/v1/nothing-here", data=b"{}") as resp:
        assert resp.status == 401
    async with session.post(
        proxy.url + "/v1/nothing-here", data=b"{}", headers=proxy.auth()
    ) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_path"
    async with session.get(proxy.url + "/", headers=proxy.auth()) as resp:
        assert resp.status == 404  # outside /v1/ there is nothing to protect
        assert (await resp.json())["error"]["code"] == "unknown_path"


async def test_model_without_a_route_is_404_model_not_found(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}],
        routes=[{"model": "gpt-*", "upstreams": ["mock"]}],
    )
    body = {"model": "claude-x", "messages": []}
    async with session.post(
        proxy.url + "/v1/chat/completions", json=body, headers=proxy.auth()
    ) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_region_refusal_is_403_and_the_sdk_does_not_retry(
    mock: Mock, start_proxy: StartProxy
) -> None:
    key, digest = new_key()
    proxy = await start_proxy(
        [
            {"name": "us", "kind": "anthropic", "base_url": mock.anthropic_url, "region": "us"},
            {"name": "eu", "kind": "anthropic", "base_url": mock.anthropic_url, "region": "eu"},
        ],
        routes=[{"model": "*", "upstreams": ["us"]}],
        projects=[{"name": "acme", "key_sha256": [digest], "regions": ["eu"]}],
    )
    async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=2) as client:
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            await client.messages.create(
                model="mock", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.status_code == 403
    assert json.loads(info.value.response.text)["type"] == "error"
    # One refusal counted: the SDK did not retry a permanent refusal (it retries 503s).
    assert await metric(proxy, "zrproxy_rejections_total", reason="region") == 1
    # The refusal names the project it refused (its key was good), not "none".
    assert await metric(proxy, "zrproxy_rejections_total", reason="region", project="acme") == 1
    assert mock.stats.started == 0


async def test_upstream_failing_and_recovering_is_logged_without_content(
    mock: Mock, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = await start_proxy(
        [
            {"name": "dead", "kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
            {"name": "mock", "kind": "openai", "base_url": mock.url},
        ],
        routes=[
            {"name": "broken", "model": "x-*", "upstreams": ["dead"]},
            {"name": "fine", "model": "*", "upstreams": ["mock"]},
        ],
    )
    marker = "zrHEALTH" + new_key()[0]
    async with aiohttp.ClientSession() as session:
        for model in ("x-1", "x-2", "mock"):
            body = {"model": model, "messages": [{"role": "user", "content": marker}]}
            async with session.post(
                proxy.url + "/v1/chat/completions", json=body, headers=proxy.auth()
            ) as resp:
                await resp.read()
    health = [r.getMessage() for r in caplog.records if r.name == "zrproxy.upstreams"]
    assert health == ["upstream dead is failing (connect)"]
    assert all(marker not in r.getMessage() for r in caplog.records)
