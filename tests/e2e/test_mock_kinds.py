"""The bundled mock started as one provider kind answers only that provider's paths, with
the provider's own 404 elsewhere, so a proxy that sent a request to a path its upstream
lacks would be caught. Without a kind it answers every kind's paths (the `mock` fixture
stands behind upstreams of each kind); `make run`'s embedded mock plays kind openai
(`test_cli.py::test_serve_embedded_default_streams_and_stops_on_sigterm`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from tests.processes import mock_process
from zrproxy.mock_upstream import MockKind, start_mock

CHAT = {"model": "mock-n2", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {**CHAT, "max_tokens": 5}
AZURE_CHAT = "/openai/deployments/d1/chat/completions"


@pytest.fixture
async def started() -> AsyncIterator[Any]:
    runners = []

    async def start(kind: MockKind | None) -> str:
        runner, url = await start_mock(kind=kind)
        runners.append(runner)
        return url.removesuffix("/v1")

    yield start
    for runner in runners:
        await runner.cleanup()


async def _post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


@pytest.mark.parametrize(
    ("kind", "served", "foreign"),
    [
        ("openai", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings"], "/v1/messages"),
        ("anthropic", ["/v1/messages", "/v1/messages/count_tokens"], "/v1/chat/completions"),
    ],
)
async def test_a_kind_answers_its_paths_and_404s_the_others_in_its_format(
    started: Any, kind: MockKind, served: list[str], foreign: str
) -> None:
    base = await started(kind)
    for path in served:
        body = {"model": "mock-n2", "input": "hi", **MESSAGES}
        status, _ = await _post(base + path, body)
        assert status == 200, path
    status, error = await _post(base + foreign, MESSAGES)
    assert status == 404
    if kind == "openai":
        assert error == {
            "error": {
                "message": f"Invalid URL (POST {foreign})",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    else:
        assert error == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "Not Found"},
        }
    status, _ = await _post(base + AZURE_CHAT + "?api-version=2024-10-21", CHAT, {"api-key": "k"})
    assert status == 404  # no Azure paths either


async def test_azure_answers_deployment_paths_with_api_key_and_api_version_only(
    started: Any,
) -> None:
    base = await started("azure_openai")
    good = base + AZURE_CHAT + "?api-version=2024-10-21"
    assert (await _post(good, CHAT, {"api-key": "k"}))[0] == 200
    status, error = await _post(good, CHAT)  # no api-key
    assert status == 401 and error["error"]["code"] == "401"
    status, error = await _post(base + AZURE_CHAT, CHAT, {"api-key": "k"})  # no api-version
    assert (status, error) == (404, {"error": {"code": "404", "message": "Resource not found"}})
    status, _ = await _post(base + AZURE_CHAT + "?api-version=latest", CHAT, {"api-key": "k"})
    assert status == 400
    status, error = await _post(base + "/v1/chat/completions", CHAT, {"api-key": "k"})
    assert (status, error["error"]["code"]) == (404, "404")
    status, error = await _post(
        base + "/openai/deployments/d1/chat/completions?api-version=2024-10-21",
        {**CHAT, "model": "mock-e404"},
        {"api-key": "k"},
    )
    assert (status, error["error"]["code"]) == (404, "DeploymentNotFound")


async def test_without_a_kind_every_path_answers(started: Any) -> None:
    base = await started(None)
    assert (await _post(base + "/v1/chat/completions", CHAT))[0] == 200
    assert (await _post(base + "/v1/messages", MESSAGES))[0] == 200
    azure = base + AZURE_CHAT + "?api-version=2024-10-21"
    assert (await _post(azure, CHAT, {"api-key": "k"}))[0] == 200
    status, error = await _post(base + "/v1/nothing-here", CHAT)
    assert status == 404 and error["error"]["message"] == "Invalid URL (POST /v1/nothing-here)"


async def test_the_sdks_see_each_providers_own_model_404(started: Any) -> None:
    openai_base, anthropic_base = await started("openai"), await started("anthropic")
    async with openai.AsyncOpenAI(
        base_url=openai_base + "/v1", api_key="k", max_retries=0
    ) as client:
        with pytest.raises(openai.NotFoundError) as oa:
            await client.chat.completions.create(model="mock-e404", messages=CHAT["messages"])
    assert oa.value.code == "model_not_found"
    async with anthropic.AsyncAnthropic(
        base_url=anthropic_base, api_key="k", max_retries=0
    ) as client:
        with pytest.raises(anthropic.NotFoundError) as an:
            await client.messages.create(
                model="mock-e404", max_tokens=5, messages=MESSAGES["messages"]
            )
    assert an.value.body["error"]["message"].startswith("model:")


async def test_the_mock_command_takes_its_kind() -> None:
    with mock_process("--kind", "anthropic") as mock:
        base = mock.url.removesuffix("/v1")
        assert (await _post(base + "/v1/messages", MESSAGES))[0] == 200
        status, error = await _post(base + "/v1/chat/completions", CHAT)
    assert status == 404 and error["error"]["type"] == "not_found_error"
