"""Zero-retention projects fail closed: only ZDR upstreams, store: false, refused state
fields, and storing endpoints proxied for no one. Real proxy, bundled mocks, loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import metric
from tests.fakes import closed_port
from tests.policy_fixtures import call, chat, mocks, proxy
from tests.processes import to_toml
from zrproxy.cli import main
from zrproxy.retention_rules import RULES, STORING_ENDPOINTS

MARKER = "zr-marker-8c1f"


def _data(upstreams: list[dict[str, Any]], **route: Any) -> dict[str, Any]:
    # Each upstream also as an Anthropic-kind twin at the same URL, so /v1/messages has
    # an upstream that speaks it (the proxy never sends an endpoint to the other kind).
    upstreams = [
        twin
        for u in upstreams
        for twin in (u, {**u, "name": u["name"] + "-anthropic", "kind": "anthropic"})
    ]
    return {
        "upstreams": upstreams,
        "routes": [{"model": "*", "upstreams": [u["name"] for u in upstreams], **route}],
        "projects": [{"name": "zr"}, {"name": "open", "zero_retention": False}],
    }


def _up(name: str, url: str, zdr: bool, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "openai", "base_url": url, "zero_data_retention": zdr, **extra}


# --- routing ---------------------------------------------------------------------------


async def test_zero_retention_project_goes_only_to_zdr_upstreams() -> None:
    async with mocks("keeps", "zdr") as m:
        data = _data([_up("keeps", m.urls["keeps"], False), _up("zdr", m.urls["zdr"], True)])
        async with proxy(data) as p:
            for _ in range(3):
                status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
                assert status == 200
            assert (m.started("keeps"), m.started("zdr")) == (0, 3)
            # The same route serves a project without zero retention from its first upstream.
            status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("open"))
            assert status == 200
            assert m.started("keeps") == 1


async def test_failover_never_leaves_the_zdr_set() -> None:
    async with mocks("keeps") as m:
        dead = f"http://127.0.0.1:{closed_port()}/v1"
        data = _data([_up("dead-zdr", dead, True), _up("keeps", m.urls["keeps"], False)])
        async with proxy(data) as p:
            status, doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("zr"))
            assert status == 502
            assert doc["error"]["code"] == "upstream_unavailable"
            assert m.started("keeps") == 0
            # Control: failover reaches it for a project without zero retention.
            status, _doc, _ = await call(p.url + "/v1/chat/completions", chat(), p.auth("open"))
            assert status == 200
            assert m.started("keeps") == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_nothing_qualifies_is_403_and_nothing_is_sent(path: str) -> None:
    async with mocks("keeps") as m:
        async with proxy(_data([_up("keeps", m.urls["keeps"], False)])) as p:
            body = chat(note=MARKER)
            status, doc, raw = await call(p.url + path, body, p.auth("zr"))
            assert status == 403
            assert MARKER.encode() not in raw
            if path == "/v1/messages":
                assert doc["type"] == "error"
                assert doc["error"]["type"] == "permission_error"
                assert "zero_data_retention = true" in doc["error"]["message"]
            else:
                assert doc["error"]["code"] == "zero_retention_unavailable"
                assert doc["error"]["type"] == "permission_error"
                assert "zero_data_retention = true" in doc["error"]["message"]
            assert m.started("keeps") == 0
            status, _doc, _ = await call(p.url + path, body, p.auth("open"))
            assert status == 200
            assert m.started("keeps") == 1


# --- store: false ----------------------------------------------------------------------


def _last(stats: Any) -> Any:
    return list(stats.requests.values())[-1]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("sent", [{}, {"store": False}, {"store": None}])
@pytest.mark.parametrize("stream", [False, True])
async def test_store_false_reaches_the_upstream(
    path: str, sent: dict[str, Any], stream: bool
) -> None:
    async with mocks("zdr") as m:
        async with proxy(_data([_up("zdr", m.urls["zdr"], True)])) as p:
            body = chat(stream=stream, **sent)
            status, _doc, _ = await call(p.url + path, body, p.auth("zr"))
            assert status == 200
            record = _last(m.stats["zdr"])
            assert record.store is False
            assert record.body_keys.count("store") == 1
            # Without zero retention the client's body goes as sent.
            status, _doc, _ = await call(p.url + path, body, p.auth("open"))
            assert status == 200
            record = _last(m.stats["zdr"])
            assert ("store" in record.body_keys) == ("store" in sent)
            assert record.store is sent.get("store")


async def test_store_false_is_not_added_where_it_means_nothing() -> None:
    async with mocks("zdr") as m:
        async with proxy(_data([_up("zdr", m.urls["zdr"], True)])) as p:
            for path in ("/v1/completions", "/v1/embeddings", "/v1/messages"):
                body = {"model": "mock", "input": "x", "prompt": "x", **chat()}
                status, _doc, _ = await call(p.url + path, body, p.auth("zr"))
                assert status == 200, path
                assert "store" not in _last(m.stats["zdr"]).body_keys


# --- requests that need provider-side state ---------------------------------------------

# An example request body breaking each rule of the table (keyed by the rule's param).
_BREAKS: dict[str, tuple[str, dict[str, Any]]] = {
    "store": ("/v1/chat/completions", {"store": True}),
    "previous_response_id": ("/v1/responses", {"previous_response_id": "resp_1"}),
    "conversation": ("/v1/responses", {"conversation": "conv_1"}),
    "background": ("/v1/responses", {"background": True}),
    "prompt": ("/v1/responses", {"prompt": {"id": "pmpt_1", "version": "2"}}),
    "prompt_cache_retention": ("/v1/chat/completions", {"prompt_cache_retention": "24h"}),
    "tools.code_interpreter": (
        "/v1/responses",
        {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]},
    ),
    "tools.shell": (
        "/v1/responses",
        {"tools": [{"type": "shell", "environment": {"type": "container_auto"}}]},
    ),
    "tools.mcp": (
        "/v1/responses",
        {"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x.example"}]},
    ),
    "file_id": (
        "/v1/responses",
        {
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_file", "file_id": "file-1"}],
                }
            ]
        },
    ),
    "mcp_servers": (
        "/v1/messages",
        {"mcp_servers": [{"type": "url", "url": "https://x.example", "name": "x"}]},
    ),
    "tools.code_execution": (
        "/v1/messages",
        {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
    ),
    "container": ("/v1/messages", {"container": "container_1"}),
    "source.type": (
        "/v1/messages",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}],
                }
            ]
        },
    ),
}


def test_every_rule_has_an_example_here() -> None:
    assert sorted(_BREAKS) == sorted(r.param for r in RULES)
    for rule in RULES:
        path, _ = _BREAKS[rule.param]
        assert path in rule.paths


@pytest.mark.parametrize("param", sorted(_BREAKS))
async def test_state_fields_are_refused_before_any_upstream(param: str) -> None:
    path, fields = _BREAKS[param]
    async with mocks("zdr") as m:
        async with proxy(_data([_up("zdr", m.urls["zdr"], True)])) as p:
            body = {**chat(note=MARKER), **fields}
            status, doc, raw = await call(p.url + path, body, p.auth("zr"))
            assert status == 400
            assert MARKER.encode() not in raw
            if path == "/v1/messages":
                assert doc["type"] == "error"
                assert doc["error"]["type"] == "invalid_request_error"
                assert doc["error"]["message"].endswith(f"Field: {param}")
            else:
                assert doc["error"]["code"] == "zero_retention_conflict"
                assert doc["error"]["param"] == param
            assert m.started("zdr") == 0
            refusals = "zrproxy_zero_retention_refusals_total"
            assert await metric(p.admin_url, refusals, field=param) == 1
            # Without zero retention, the same body reaches the upstream with the field.
            status, _doc, _ = await call(p.url + path, body, p.auth("open"))
            assert status == 200
            record = _last(m.stats["zdr"])
            assert set(fields) <= set(record.body_keys)


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/responses", {"store": False, "background": False, "previous_response_id": None}),
        ("/v1/responses", {"prompt_cache_retention": "in_memory"}),
        ("/v1/responses", {"tools": [{"type": "shell"}, {"type": "function", "name": "f"}]}),
        ("/v1/completions", {"prompt": "a text prompt is no stored template"}),
        ("/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
        (
            "/v1/messages",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "data": "AA=="}}
                        ],
                    }
                ]
            },
        ),
    ],
)
async def test_look_alikes_are_not_refused(path: str, fields: dict[str, Any]) -> None:
    async with mocks("zdr") as m:
        async with proxy(_data([_up("zdr", m.urls["zdr"], True)])) as p:
            status, _doc, _ = await call(p.url + path, {**chat(), **fields}, p.auth("zr"))
            assert status == 200
            assert m.started("zdr") == 1


# --- endpoints that exist to store --------------------------------------------------------


@pytest.mark.parametrize("endpoint", STORING_ENDPOINTS, ids=lambda e: e.example)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_storing_endpoints_are_not_proxied_for_anyone(endpoint: Any, method: str) -> None:
    async with mocks("zdr") as m:
        async with proxy(_data([_up("zdr", m.urls["zdr"], True)])) as p:
            for project in ("zr", "open"):
                body = None if method == "GET" else chat()
                status, doc, _ = await call(p.url + endpoint.example, body, p.auth(project), method)
                assert status == 404
                error = doc["error"]
                if "code" in error:
                    assert error["code"] == "storing_endpoint_not_proxied"
                else:
                    assert error["type"] == "not_found_error"
            assert m.started("zdr") == 0


@pytest.mark.parametrize(
    "raw",
    [
        b' \r\n\t{"model": "mock-n2", "messages": [{"role": "user", "content": "hi"}]}',
        '{"model": "mock-n2", "messages": []}'.encode("utf-16"),  # no "{" first: re-encoded
    ],
)
async def test_store_false_for_any_json_the_proxy_accepts(raw: bytes) -> None:
    async with mocks("zdr") as m:
        async with proxy(_data([_up("zdr", m.urls["zdr"], True)])) as p:
            async with (
                aiohttp.ClientSession() as session,
                session.post(p.url + "/v1/chat/completions", data=raw, headers=p.auth("zr")) as r,
            ):
                assert r.status == 200
            assert _last(m.stats["zdr"]).store is False


def test_check_config_names_the_key_for_a_route_a_project_can_never_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _data([_up("keeps", "https://keeps.example/v1", False)])
    data["projects"] = [
        {"name": "zr", "key_sha256": ["0" * 64]},
        {"name": "open", "key_sha256": ["1" * 64], "zero_retention": False},
    ]
    path = tmp_path / "zrproxy.toml"
    path.write_text(to_toml(data))
    assert main(["check-config", str(path)]) == 0
    warnings = [w for w in capsys.readouterr().err.splitlines() if "can never be served" in w]
    assert len(warnings) == 1
    (warning,) = warnings
    assert warning.startswith("warning: project 'zr' can never be served by route '*'")
    # Every upstream of the route that could fix it is named (here the Anthropic twin too).
    assert "set upstreams[0].zero_data_retention or upstreams[1].zero_data_retention" in warning
    assert "projects[0].zero_retention = false" in warning
