"""Header allowlists through the real proxy, against fakes that answer with the header
names the real providers send (OpenAI's organisation, project and rate-limit headers,
Anthropic's organisation id and rate-limit headers, Cloudflare's cookies and banner).

Tenants must not see the operator's account; providers must not see the tenant's headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.conftest import StartProxy
from tests.fakes import FakeUpstream, FakeUpstreams
from zrproxy.headers import REQUEST_ALLOWLIST, RESPONSE_ALLOWLIST

UPSTREAM_KEY = "sk-operator-key-0123456789"

# What api.openai.com answers with (names as sent; values made up).
OPENAI_HEADERS = {
    "openai-organization": "operator-org-7f3a",
    "openai-project": "proj_operator_7f3a",
    "openai-processing-ms": "321",
    "openai-version": "2020-10-01",
    "x-request-id": "req_openai_abc123",
    "x-ratelimit-limit-requests": "10000",
    "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "29999000",
    "x-ratelimit-reset-requests": "6ms",
    "x-ratelimit-reset-tokens": "2ms",
    "x-envoy-upstream-service-time": "330",
    "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
    "cf-cache-status": "DYNAMIC",
    "set-cookie": "__cf_bm=operator-cookie; path=/; HttpOnly; Secure",
    "x-content-type-options": "nosniff",
    "server": "cloudflare",
    "cf-ray": "8f00000000000000-FRA",
    "alt-svc": 'h3=":443"; ma=86400',
    "access-control-expose-headers": "X-Request-ID",
}
# What api.anthropic.com answers with.
ANTHROPIC_HEADERS = {
    "request-id": "req_011CAnthropic",
    "anthropic-organization-id": "operator-org-uuid-0000",
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-requests-reset": "2026-12-01T09:00:00Z",
    "anthropic-ratelimit-tokens-limit": "400000",
    "anthropic-ratelimit-tokens-remaining": "399000",
    "anthropic-ratelimit-tokens-reset": "2026-12-01T09:00:00Z",
    "anthropic-ratelimit-input-tokens-remaining": "199000",
    "anthropic-ratelimit-output-tokens-remaining": "79000",
    "via": "1.1 google",
    "cf-ray": "8f00000000000001-FRA",
    "server": "cloudflare",
    "x-robots-tag": "none",
    "set-cookie": "_cfuvid=operator-cookie; path=/",
}
OPERATOR_VALUES = {
    *(v for k, v in OPENAI_HEADERS.items() if k not in RESPONSE_ALLOWLIST),
    *(v for k, v in ANTHROPIC_HEADERS.items() if k not in RESPONSE_ALLOWLIST),
} - {"req_openai_abc123", "req_011CAnthropic"}

OPENAI_JSON = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
    b'"total_tokens":2}}'
)
ANTHROPIC_JSON = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-x",'
    b'"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn",'
    b'"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}'
)
OPENAI_SSE = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b"data: [DONE]\n\n"
)


@dataclass
class Provider:
    """A fake provider (tests/fakes.py): records requests, answers like the real one."""

    kind: str
    fake: FakeUpstream = field(init=False)
    status: int = 200
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.fake.url

    @property
    def seen(self) -> list[CIMultiDict[str]]:
        """The headers of each request, in order."""
        return [seen.headers for seen in self.fake.seen]

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        names = OPENAI_HEADERS if self.kind == "openai" else ANTHROPIC_HEADERS
        headers = {**names, **self.extra}
        if self.status != 200:
            return web.json_response(
                {"error": {"message": "Rate limited", "type": "rate_limit_error"}},
                status=self.status,
                headers=headers,
            )
        if body.get("stream"):
            response = web.StreamResponse(
                headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"}
            )
            await response.prepare(request)
            await response.write(OPENAI_SSE)
            await response.write_eof()
            return response
        payload = OPENAI_JSON if self.kind == "openai" else ANTHROPIC_JSON
        return web.Response(body=payload, content_type="application/json", headers=headers)


async def start_provider(fakes: FakeUpstreams, kind: str) -> Provider:
    provider = Provider(kind)
    provider.fake = await fakes.start(kind, handler=provider.answer)
    return provider


@pytest.fixture
async def openai_up(fakes: FakeUpstreams) -> Provider:
    return await start_provider(fakes, "openai")


@pytest.fixture
async def anthropic_up(fakes: FakeUpstreams) -> Provider:
    return await start_provider(fakes, "anthropic")


def upstreams(openai_up: Provider, anthropic_up: Provider) -> list[dict[str, object]]:
    return [
        {"name": "oai", "kind": "openai", "base_url": openai_up.url, "api_key_env": "OAI_KEY"},
        {"name": "ant", "kind": "anthropic", "base_url": anthropic_up.url, "api_key_env": "ANT"},
    ]


ROUTES = [
    {"model": "gpt-*", "upstreams": ["oai"]},
    {"model": "claude-*", "upstreams": ["ant"]},
]
ENV = {"OAI_KEY": UPSTREAM_KEY, "ANT": UPSTREAM_KEY}

# Everything a tenant's client might send that must stay with us.
TENANT_HEADERS = {
    "OpenAI-Organization": "org-tenant",
    "OpenAI-Project": "proj_tenant",
    "X-Forwarded-For": "203.0.113.7",
    "X-Real-IP": "203.0.113.7",
    "Cookie": "tenant=1",
    "X-Stainless-Lang": "python",
    "X-Stainless-Package-Version": "tenant-sdk-9.9.9",
    "Idempotency-Key": "tenant-idem-1",
    "X-Tenant-Secret": "tenant-secret-5d1e",
    "Origin": "https://tenant.example",
    "Referer": "https://tenant.example/chat",
}
# What every request to an upstream carries besides the allowlist: aiohttp's framing,
# our Accept-Encoding and request id, and the upstream's own credential.
ADDED = {"host", "content-length", "accept-encoding", "x-request-id"}


def assert_no_operator_state(headers: CIMultiDict[str] | aiohttp.typedefs.LooseHeaders) -> None:
    names = {name.lower() for name in headers}  # type: ignore[union-attr]
    leaked = {
        n for n in names if re.match(r"(openai-(organization|project)|x-ratelimit-|anthropic-)", n)
    }
    assert not leaked, leaked
    assert not names & {"set-cookie", "server", "cf-ray", "via", "strict-transport-security"}
    values = " ".join(headers.values())  # type: ignore[union-attr]
    assert not [v for v in OPERATOR_VALUES if v in values]


async def test_openai_response_headers_pass_only_the_allowlist(
    openai_up: Provider, anthropic_up: Provider, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(upstreams(openai_up, anthropic_up), routes=ROUTES, environ=ENV)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            async with s.post(
                proxy.url + "/v1/chat/completions",
                json={**body, "stream": stream},
                headers={**proxy.auth(), **TENANT_HEADERS, "X-Request-Id": "tenant-rid"},
            ) as resp:
                assert resp.status == 200
                await resp.read()
                assert_no_operator_state(resp.headers)
                assert resp.headers["openai-processing-ms"] == "321"
                assert resp.headers["X-Upstream-Request-Id"] == "req_openai_abc123"
                assert resp.headers.getall("X-Request-Id") == ["tenant-rid"]
                if stream:
                    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                    assert resp.headers["Cache-Control"] == "no-cache"
                    assert resp.headers["X-Accel-Buffering"] == "no"
                    assert resp.headers["Transfer-Encoding"] == "chunked"
                else:
                    assert resp.headers["Content-Type"] == "application/json"
                    assert resp.headers["Content-Length"] == str(len(OPENAI_JSON))


async def test_anthropic_response_headers_pass_only_the_allowlist(
    openai_up: Provider, anthropic_up: Provider, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(upstreams(openai_up, anthropic_up), routes=ROUTES, environ=ENV)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/messages",
            json={
                "model": "claude-x",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
            headers={"x-api-key": proxy.key, "anthropic-version": "2023-06-01"},
        ) as resp:
            assert resp.status == 200
            await resp.read()
    assert_no_operator_state(resp.headers)
    assert resp.headers["X-Upstream-Request-Id"] == "req_011CAnthropic"


async def test_a_429_keeps_what_clients_retry_on(
    openai_up: Provider, anthropic_up: Provider, start_proxy: StartProxy
) -> None:
    openai_up.status = 429
    openai_up.extra = {"retry-after": "7", "retry-after-ms": "6500", "x-should-retry": "true"}
    proxy = await start_proxy(upstreams(openai_up, anthropic_up), routes=ROUTES, environ=ENV)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            headers=proxy.auth(),
        ) as resp:
            assert resp.status == 429
            await resp.read()
    assert (resp.headers["Retry-After"], resp.headers["retry-after-ms"]) == ("7", "6500")
    assert resp.headers["x-should-retry"] == "true"
    assert_no_operator_state(resp.headers)


async def test_request_headers_pass_only_the_allowlist(
    openai_up: Provider, anthropic_up: Provider, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(upstreams(openai_up, anthropic_up), routes=ROUTES, environ=ENV)
    allowed = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "OpenAI/Python 1.50.0",
        "OpenAI-Beta": "assistants=v2",
        "anthropic-beta": "tools-2024-04-04",
        "anthropic-version": "2023-06-01",
    }
    assert {n.lower() for n in allowed} == REQUEST_ALLOWLIST
    data = b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}]}'
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions",
            data=data,
            headers={**proxy.auth(), **TENANT_HEADERS, **allowed},
            skip_auto_headers=("User-Agent",),
        ) as resp:
            assert resp.status == 200
    seen = openai_up.seen[-1]
    assert {n.lower() for n in seen} == REQUEST_ALLOWLIST | ADDED | {"authorization"}
    for name, value in allowed.items():
        assert seen.getall(name) == [value], name
    assert seen.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert seen["Accept-Encoding"] == "identity"
    values = " ".join(seen.values())
    assert not [v for v in TENANT_HEADERS.values() if v in values]
    assert proxy.key not in values


async def test_the_sdks_send_only_allowlisted_headers(
    openai_up: Provider, anthropic_up: Provider, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(upstreams(openai_up, anthropic_up), routes=ROUTES, environ=ENV)
    tenant = {"OpenAI-Organization": "org-tenant", "X-Tenant-Secret": "tenant-secret-5d1e"}
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0, default_headers=tenant
    ) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
        assert raw.parse().choices[0].message.content == "hi"
        assert_no_operator_state(CIMultiDict(raw.headers.items()))
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key=proxy.key, max_retries=0, default_headers=tenant
    ) as aclient:
        araw = await aclient.messages.with_raw_response.create(
            model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
        assert (await araw.parse()).content[0].text == "hi"  # type: ignore[union-attr]
        assert_no_operator_state(CIMultiDict(araw.headers.items()))
    for seen in (openai_up.seen[-1], anthropic_up.seen[-1]):
        names = {n.lower() for n in seen}
        assert names <= REQUEST_ALLOWLIST | ADDED | {"authorization", "x-api-key"}, names
        assert not any(n.startswith("x-stainless") for n in names)
        assert "tenant-secret-5d1e" not in " ".join(seen.values())
    assert anthropic_up.seen[-1]["x-api-key"] == UPSTREAM_KEY


def test_readme_lists_both_allowlists() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Headers", 1)[1].split("\n## ", 1)[0]
    rows = dict(
        re.findall(r"^\| (client to upstream|upstream to client) \| (.+) \|$", section, re.M)
    )
    listed = {
        direction: set(re.findall(r"`([A-Za-z-]+)`", cell)) for direction, cell in rows.items()
    }
    assert {n.lower() for n in listed["client to upstream"]} == REQUEST_ALLOWLIST
    assert {n.lower() for n in listed["upstream to client"]} == RESPONSE_ALLOWLIST
