"""Upstreams are told not to keep or train: request_overrides and header_overrides win
over the client at every depth, checked at a recording upstream on loopback."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import kind_for
from tests.policy_fixtures import call, chat, proxy, recorder
from zrproxy.config import parse_config
from zrproxy.errors import ConfigError

OPENROUTER = {"provider": {"data_collection": "deny", "zdr": True}}


def _data(url: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": [
            {
                "name": "router",
                "kind": "openai",
                "base_url": url,
                "zero_data_retention": True,
                **upstream,
            }
        ],
        "routes": [{"model": "*", "upstreams": ["router"]}],
        "projects": [{"name": "zr"}, {"name": "open", "zero_retention": False}],
    }


@pytest.mark.parametrize("project", ["zr", "open"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_request_overrides_win_nested_keys_included(project: str, path: str) -> None:
    async with recorder() as rec:
        async with proxy(_data(rec.url, kind=kind_for(path), request_overrides=OPENROUTER)) as p:
            body = chat(
                provider={"data_collection": "allow", "order": ["a", "b"], "zdr": False},
                temperature=0.25,
            )
            status, _doc, _ = await call(p.url + path, body, p.auth(project))
            assert status == 200
            seen = rec.json()
            assert seen["provider"] == {"data_collection": "deny", "zdr": True, "order": ["a", "b"]}
            assert seen["temperature"] == 0.25
            assert seen["messages"] == body["messages"]


async def test_override_replaces_a_client_value_of_another_type() -> None:
    async with recorder() as rec:
        async with proxy(_data(rec.url, request_overrides=OPENROUTER)) as p:
            status, _doc, _ = await call(
                p.url + "/v1/chat/completions", chat(provider="anything"), p.auth("open")
            )
            assert status == 200
            assert rec.json()["provider"] == OPENROUTER["provider"]


async def test_store_override_wins_over_a_client_without_zero_retention() -> None:
    async with recorder() as rec:
        async with proxy(_data(rec.url, request_overrides={"store": False})) as p:
            status, _doc, _ = await call(p.url + "/v1/responses", chat(store=True), p.auth("open"))
            assert status == 200
            assert rec.json()["store"] is False


@pytest.mark.parametrize("sent", [{}, {"store": False}])
async def test_zero_retention_store_false_wins_over_an_operator_override(
    sent: dict[str, Any],
) -> None:
    # store: false for zero-retention projects does not depend on the operator.
    async with recorder() as rec:
        async with proxy(_data(rec.url, request_overrides={"store": True})) as p:
            status, _doc, _ = await call(p.url + "/v1/responses", chat(**sent), p.auth("zr"))
            assert status == 200
            assert rec.json()["store"] is False
            status, _doc, _ = await call(p.url + "/v1/responses", chat(), p.auth("open"))
            assert rec.json()["store"] is True


@pytest.mark.parametrize("project", ["zr", "open"])
async def test_header_overrides_win_over_the_client(project: str) -> None:
    overrides = {"X-Title": "zrproxy", "OpenAI-Beta": "none"}
    async with recorder() as rec:
        async with proxy(_data(rec.url, header_overrides=overrides)) as p:
            headers = {**p.auth(project), "x-title": "client title", "User-Agent": "kept"}
            status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), headers)
            assert status == 200
            seen = rec.seen[-1].headers
            assert seen.getall("X-Title") == ["zrproxy"]
            assert seen.getall("OpenAI-Beta") == ["none"]
            assert seen["User-Agent"] == "kept"  # an allowlisted client header still goes


@pytest.mark.parametrize(
    "name", ["Authorization", "x-api-key", "Content-Length", "Host", "Accept-Encoding", "Te"]
)
def test_header_overrides_may_not_touch_what_the_proxy_sets(name: str) -> None:
    data = {
        **_data("http://127.0.0.1:1/v1", header_overrides={name: "x"}),
        "projects": [{"name": "p", "key_sha256": ["0" * 64]}],
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {})
    assert caught.value.key_path == f"upstreams[0].header_overrides.{name}"


async def test_overrides_reach_only_the_endpoints_that_take_them() -> None:
    # OpenAI rejects `store` on embeddings and moderations: by default overrides go only
    # into chat completions and responses; `override_endpoints` names others.
    async with recorder() as rec:
        async with proxy(_data(rec.url, request_overrides={"store": False})) as p:
            for path, body in [
                ("/v1/chat/completions", chat()),
                ("/v1/embeddings", {"model": "mock", "input": "hi"}),
                ("/v1/moderations", {"input": "hi"}),
            ]:
                status, _doc, _ = await call(p.url + path, body, p.auth("open"))
                assert status == 200
            assert [(s.path, "store" in orjson.loads(s.body)) for s in rec.seen] == [
                ("/v1/chat/completions", True),
                ("/v1/embeddings", False),
                ("/v1/moderations", False),
            ]
        upstream = {"request_overrides": {"user": "u1"}, "override_endpoints": ["/v1/embeddings"]}
        async with proxy(_data(rec.url, **upstream)) as p:
            for path, body in [
                ("/v1/chat/completions", chat()),
                ("/v1/embeddings", {"model": "mock", "input": "hi"}),
            ]:
                status, _doc, _ = await call(p.url + path, body, p.auth("open"))
                assert status == 200
            assert orjson.loads(rec.seen[-1].body)["user"] == "u1"
            assert "user" not in orjson.loads(rec.seen[-2].body)
