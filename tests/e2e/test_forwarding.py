"""What crosses the proxy: credentials, headers, request ids, body rewrites, and what the
official SDKs see.

A recording upstream (a fake from tests/fakes.py) shows the exact request the proxy sent;
the bundled mock covers the wire formats the SDKs parse.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
import zlib
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from multidict import CIMultiDict

from tests.conftest import Mock, RunningProxy, StartProxy, metric, post
from tests.fakes import FakeUpstream as Recorder
from tests.fakes import FakeUpstreams

UPSTREAM_KEY = "sk-upstream-test"
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
async def recorder(fakes: FakeUpstreams) -> Recorder:
    """An upstream that records every request and answers with a canned response."""
    return await fakes.start("recorder")


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


def chat(model: str = "mock", text: str = "hello", **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return json.dumps(body).encode()


# --- upstream credentials --------------------------------------------------------------------


@pytest.mark.parametrize("client_auth", ["bearer", "x-api-key"])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_upstream_key_is_injected(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    kind: str,
    client_auth: str,
) -> None:
    proxy = await start_proxy(
        [
            {
                "name": "up",
                "kind": kind,
                "base_url": mock.url_for(kind),
                "api_key_env": "UPSTREAM_KEY",
            }
        ],
        environ={"UPSTREAM_KEY": UPSTREAM_KEY},
    )
    auth = proxy.auth() if client_auth == "bearer" else {"x-api-key": proxy.key}
    path = "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"
    for rid_n in range(2):
        rid = f"key-{kind}-{rid_n}"
        resp, _ = await post(session, proxy.url + path, chat(), {**auth, "X-Request-Id": rid})
        assert resp.status == 200
        record = mock.stats.requests[rid]
        if kind == "openai":
            assert record.authorization == f"Bearer {UPSTREAM_KEY}"
            assert record.x_api_key is None
        else:
            assert record.x_api_key == UPSTREAM_KEY
            assert record.authorization is None
        assert proxy.key not in (record.authorization or "")
        assert proxy.key not in (record.x_api_key or "")


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_without_upstream_key_no_credentials_are_forwarded(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession, kind: str
) -> None:
    proxy = await start_proxy([{"name": "up", "kind": kind, "base_url": recorder.url}])
    headers = {**proxy.auth(), "x-api-key": proxy.key}
    path = "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"
    resp, _ = await post(session, proxy.url + path, chat(), headers)
    assert resp.status == 200
    seen = recorder.last.headers
    assert "Authorization" not in seen
    assert "x-api-key" not in seen
    assert all(proxy.key not in v for v in seen.values())


# --- request headers ---------------------------------------------------------------------------


async def test_hop_by_hop_and_cookie_headers_are_not_forwarded(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    headers = CIMultiDict(
        {
            **proxy.auth(),
            "Connection": "keep-alive, X-Foo",
            "X-Foo": "named-in-connection",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Proxy-Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "Trailer": "X-Checksum",
            "Cookie": "session=abc123",
            "OpenAI-Beta": "yes",
        }
    )
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), headers)
    assert resp.status == 200
    seen = recorder.last.headers
    assert seen.get("OpenAI-Beta") == "yes"  # the control
    for name in (
        "TE",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Keep-Alive",
        "Trailer",
        "Cookie",
    ):
        assert name not in seen, name
    assert "x-foo" not in (seen.get("Connection") or "").lower()


async def test_headers_named_in_connection_are_not_forwarded(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    # RFC 9110 7.6.1: a header the client lists in Connection is hop-by-hop too.
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    headers = {
        **proxy.auth(),
        "Connection": "keep-alive, OpenAI-Beta",
        "OpenAI-Beta": "hop",
        "anthropic-beta": "e2e",
    }
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), headers)
    assert resp.status == 200
    seen = recorder.last.headers
    assert seen.get("anthropic-beta") == "e2e"
    assert "OpenAI-Beta" not in seen


async def test_response_headers_named_in_connection_are_not_relayed(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    recorder.headers = {
        "Connection": "keep-alive, Retry-After",
        "Retry-After": "1",
        "openai-processing-ms": "2",
    }
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), proxy.auth())
    assert resp.status == 200
    assert resp.headers["openai-processing-ms"] == "2"
    assert "Retry-After" not in resp.headers


async def test_upstreams_are_asked_for_identity_encoding(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    # The usage tap must see plain bytes: the client's offer is replaced by identity.
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    headers = {**proxy.auth(), "Accept-Encoding": "gzip, deflate, br, zstd"}
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), headers)
    assert resp.status == 200
    assert recorder.last.headers.getall("Accept-Encoding") == ["identity"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_request_body_reaches_the_upstream_consistently(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession, encoding: str
) -> None:
    # The proxy decodes the body to parse it; what it forwards must match the
    # Content-Encoding it forwards (plain bytes and no header, or the encoded bytes).
    # (Without zero retention, which adds `store: false` to chat bodies.)
    proxy = await start_proxy(
        [{"name": "up", "kind": "openai", "base_url": recorder.url}], zero_retention=False
    )
    plain = chat()
    encoded = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    headers = {**proxy.auth(), "Content-Encoding": encoding, "Content-Type": "application/json"}
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", encoded, headers)
    assert resp.status == 200
    seen = recorder.last
    forwarded_encoding = seen.headers.get("Content-Encoding")
    if forwarded_encoding is None:
        assert seen.body == plain
    else:
        assert forwarded_encoding == encoding
        assert seen.body == encoded


async def test_end_to_end_headers_are_forwarded(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    proxy = await start_proxy([{"name": "up", "kind": "anthropic", "base_url": recorder.url}])
    sent = {
        "anthropic-version": "2023-01-01",
        "anthropic-beta": "tools-2024-04-04",
        "OpenAI-Beta": "assistants=v2",
        "User-Agent": f"test-agent/{marker}",
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    resp, _ = await post(
        session,
        proxy.url + "/v1/messages",
        chat(),
        {**proxy.auth(), **sent, "X-Stainless-Lang": "python"},
    )
    assert resp.status == 200
    seen = recorder.last.headers
    for name, value in sent.items():
        assert seen.get(name) == value, name
    assert "X-Stainless-Lang" not in seen  # not on the allowlist
    assert seen["Content-Length"] == str(len(recorder.last.body))


@pytest.mark.parametrize(
    ("kind", "path", "expected"),
    [
        ("anthropic", "/v1/messages", "2023-06-01"),
        ("anthropic", "/v1/messages/count_tokens", "2023-06-01"),
        ("openai", "/v1/embeddings", None),
        ("openai", "/v1/chat/completions", None),
    ],
)
async def test_anthropic_version_added_for_anthropic_upstreams(
    recorder: Recorder,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    kind: str,
    path: str,
    expected: str | None,
) -> None:
    proxy = await start_proxy([{"name": "up", "kind": kind, "base_url": recorder.url}])
    resp, _ = await post(session, proxy.url + path, chat(), proxy.auth())
    assert resp.status == 200
    assert recorder.last.headers.get("anthropic-version") == expected


# --- request ids -------------------------------------------------------------------------------


async def test_well_formed_request_id_is_kept_and_forwarded(
    mock: Mock, proxy: RunningProxy, session: aiohttp.ClientSession
) -> None:
    for rid in ("abc", "req_01HX.9:Z-z", "x" * 128):
        headers = {**proxy.auth(), "X-Request-Id": rid}
        resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), headers)
        assert resp.status == 200
        assert resp.headers.getall("X-Request-Id") == [rid]
        assert rid in mock.stats.requests


@pytest.mark.parametrize(
    "bad",
    ["has space {m}", "{m}" * 5, "semi;colon{m}", "{m}\u00e9", "a/b{m}", "<{m}>"],
    ids=["space", "too_long", "semicolon", "non_ascii", "slash", "angle"],
)
async def test_malformed_request_id_is_replaced(
    mock: Mock, proxy: RunningProxy, session: aiohttp.ClientSession, marker: str, bad: str
) -> None:
    bad = bad.replace("{m}", marker)
    assert len(bad) <= 128 or bad.count(marker) == 5
    headers = CIMultiDict({**proxy.auth()})
    headers["X-Request-Id"] = bad
    async with session.post(
        proxy.url + "/v1/chat/completions", data=chat(), headers=headers, skip_auto_headers=()
    ) as resp:
        await resp.read()
        assert resp.status == 200
        rid = resp.headers["X-Request-Id"]
        raw_headers = b"\n".join(k + b":" + v for k, v in resp.raw_headers)
    assert HEX32.fullmatch(rid)
    assert marker.encode() not in raw_headers
    assert list(mock.stats.requests) == [rid]  # the upstream got the replacement


async def test_request_id_is_generated_when_missing(
    mock: Mock, proxy: RunningProxy, session: aiohttp.ClientSession
) -> None:
    ids = []
    for _ in range(3):
        resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), proxy.auth())
        assert resp.status == 200
        ids.append(resp.headers["X-Request-Id"])
    assert all(HEX32.fullmatch(rid) for rid in ids)
    assert len(set(ids)) == 3
    assert list(mock.stats.requests) == ids


async def test_request_id_on_errors_and_models(
    proxy: RunningProxy, session: aiohttp.ClientSession
) -> None:
    resp, _ = await post(
        session, proxy.url + "/v1/chat/completions", chat(), {"X-Request-Id": "err-1"}
    )
    assert resp.status == 401
    assert resp.headers["X-Request-Id"] == "err-1"
    async with session.get(proxy.url + "/v1/models", headers=proxy.auth()) as resp:
        assert resp.status == 200
        assert HEX32.fullmatch(resp.headers["X-Request-Id"])


async def test_upstream_request_id_is_renamed(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    recorder.headers = {"X-Request-Id": "upstream-own-id"}
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    headers = {**proxy.auth(), "X-Request-Id": "mine"}
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), headers)
    assert resp.headers.getall("X-Request-Id") == ["mine"]
    assert resp.headers["X-Upstream-Request-Id"] == "upstream-own-id"
    assert recorder.last.headers.getall("X-Request-Id") == ["mine"]


# --- request bodies ----------------------------------------------------------------------------


async def test_body_is_forwarded_byte_for_byte(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    # Without zero retention, which adds `store: false` to chat bodies.
    proxy = await start_proxy(
        [{"name": "up", "kind": "openai", "base_url": recorder.url}], zero_retention=False
    )
    body = (
        b'{ "z": 1,\n  "model" : "gpt-x", "messages":[{"role":"user","content":"'
        + marker.encode()
        + b'\\u00e9 \xc3\xa9"}],  "temperature": 1.50 }'
    )
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", body, proxy.auth())
    assert resp.status == 200
    assert recorder.last.body == body
    assert recorder.last.method == "POST"


async def test_request_overrides_reach_the_upstream(
    mock: Mock, recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        [
            {
                "name": "rec",
                "kind": "openai",
                "base_url": recorder.url,
                "request_overrides": {"store": False, "metadata": {"zr": "1"}},
            },
            {
                "name": "mock",
                "kind": "openai",
                "base_url": mock.url,
                "request_overrides": {"store": False},
            },
        ],
        routes=[
            {"model": "rec", "upstreams": ["rec"]},
            {"model": "mock*", "upstreams": ["mock"]},
        ],
        zero_retention=False,  # a zero-retention project may not send store: true at all
    )
    sent = {
        "model": "rec",
        "messages": [{"role": "user", "content": "hi"}],
        "store": True,
        "temperature": 0.5,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    resp, _ = await post(
        session, proxy.url + "/v1/responses", json.dumps(sent).encode(), proxy.auth()
    )
    assert resp.status == 200
    assert json.loads(recorder.last.body) == {**sent, "store": False, "metadata": {"zr": "1"}}
    assert recorder.last.headers["Content-Length"] == str(len(recorder.last.body))

    headers = {**proxy.auth(), "X-Request-Id": "ovr"}
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(store=True), headers)
    assert resp.status == 200
    assert mock.stats.requests["ovr"].store is False


async def test_upstream_model_renames_the_model(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        [
            {"name": "mock", "kind": "openai", "base_url": mock.url},
            {"name": "mock-anthropic", "kind": "anthropic", "base_url": mock.anthropic_url},
        ],
        routes=[
            {
                "model": "alias-*",
                "upstreams": ["mock", "mock-anthropic"],
                "upstream_model": "mock-n2",
            }
        ],
    )
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings"):
        rid = f"rename{path.replace('/', '-')}"
        body = json.dumps({"model": "alias-big", "input": "x", "messages": []}).encode()
        resp, _ = await post(session, proxy.url + path, body, {**proxy.auth(), "X-Request-Id": rid})
        assert resp.status == 200
        assert mock.stats.requests[rid].model == "mock-n2"


async def test_query_string_is_not_forwarded(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    proxy = await start_proxy(
        [
            {"name": "up", "kind": "openai", "base_url": recorder.url},
            {"name": "up-anthropic", "kind": "anthropic", "base_url": recorder.url},
        ]
    )
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings"):
        url = f"{proxy.url}{path}?api-version=2024-01-01&q={marker}"
        resp, _ = await post(session, url, chat(), proxy.auth())
        assert resp.status == 200
        assert recorder.last.raw_path == path


async def test_base_url_path_prefix_is_kept(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(
        [{"name": "up", "kind": "openai", "base_url": recorder.url.replace("/v1", "/openai/v1")}]
    )
    resp, _ = await post(session, proxy.url + "/v1/chat/completions", chat(), proxy.auth())
    assert resp.status == 200
    assert recorder.last.raw_path == "/openai/v1/chat/completions"


# --- response headers --------------------------------------------------------------------------


async def test_streamed_response_headers(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    recorder.content_type = "text/event-stream; charset=utf-8"
    recorder.headers = {
        "Cache-Control": "public, max-age=600",
        "Set-Cookie": "__cf_bm=abc; path=/; HttpOnly",
        "openai-processing-ms": "12",
    }
    recorder.chunks = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b"data: [DONE]\n\n")
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    async with session.post(
        proxy.url + "/v1/chat/completions", data=chat(stream=True), headers=proxy.auth()
    ) as resp:
        body = await resp.read()
    assert resp.status == 200
    assert body == b"".join(recorder.chunks)
    assert resp.headers.getall("Cache-Control") == ["no-cache"]
    assert resp.headers.getall("X-Accel-Buffering") == ["no"]
    assert "Set-Cookie" not in resp.headers
    assert resp.cookies == {}
    assert resp.headers["openai-processing-ms"] == "12"
    assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"


async def test_mock_stream_headers(proxy: RunningProxy, session: aiohttp.ClientSession) -> None:
    async with session.post(
        proxy.url + "/v1/chat/completions", data=chat(stream=True), headers=proxy.auth()
    ) as resp:
        await resp.read()
    assert resp.content_type == "text/event-stream"
    assert resp.headers.getall("Cache-Control") == ["no-cache"]
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in resp.headers


async def test_non_stream_response_keeps_type_and_length(
    proxy: RunningProxy, session: aiohttp.ClientSession
) -> None:
    resp, body = await post(session, proxy.url + "/v1/chat/completions", chat(), proxy.auth())
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in resp.headers
    assert "X-Accel-Buffering" not in resp.headers
    json.loads(body)


async def test_non_stream_response_drops_set_cookie(
    recorder: Recorder, start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    recorder.headers = {"Set-Cookie": "sid=1", "X-Ratelimit-Remaining-Requests": "99"}
    proxy = await start_proxy([{"name": "up", "kind": "openai", "base_url": recorder.url}])
    resp, body = await post(session, proxy.url + "/v1/chat/completions", chat(), proxy.auth())
    assert body == recorder.body
    assert "Set-Cookie" not in resp.headers
    assert "X-Ratelimit-Remaining-Requests" not in resp.headers  # the operator's quota
    assert resp.headers["Content-Length"] == str(len(recorder.body))


# --- usage -------------------------------------------------------------------------------------


def sse_json(raw: bytes) -> list[Any]:
    out = []
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_usage_only_when_asked(
    mock: Mock,
    proxy: RunningProxy,
    session: aiohttp.ClientSession,
    path: str,
    include_usage: bool,
) -> None:
    extra: dict[str, Any] = {"stream": True, "prompt": "hello"}
    if include_usage:
        extra["stream_options"] = {"include_usage": True}
    tokens = await metric(proxy, "zrproxy_tokens_total", type="completion", project="acme")
    headers = {**proxy.auth(), "X-Request-Id": "usage"}
    resp, raw = await post(session, proxy.url + path, chat("mock-n5", **extra), headers)
    assert resp.status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = sse_json(raw)
    with_usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(with_usage) == 1
        assert with_usage[0]["usage"]["completion_tokens"] == 5
        assert chunks[-1] is with_usage[0]
    else:
        assert with_usage == []
        assert all(c["choices"] for c in chunks)
    # Either way the proxy asked the upstream for usage, and counted it.
    assert mock.stats.requests["usage"].stream_options == {"include_usage": True}
    after = await metric(proxy, "zrproxy_tokens_total", type="completion", project="acme")
    assert after == tokens + 5
    # The mock: prompt strings' characters // 4 + 1 ("user", "hello", "hello": 14).
    assert await metric(proxy, "zrproxy_tokens_total", type="prompt") == 4


# --- the official SDKs -------------------------------------------------------------------------


def openai_client(proxy: RunningProxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0)


def anthropic_client(proxy: RunningProxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=proxy.key, max_retries=0)


async def completion_tokens(proxy: RunningProxy) -> float:
    return await metric(proxy, "zrproxy_tokens_total", type="completion")


async def test_openai_sdk_chat(proxy: RunningProxy, marker: str) -> None:
    before = await completion_tokens(proxy)
    async with openai_client(proxy) as client:
        result = await client.chat.completions.create(
            model="mock-n3", messages=[{"role": "user", "content": f"{marker} hi"}]
        )
    assert result.choices[0].message.content is not None
    assert result.choices[0].message.content.startswith(f"{marker} hi")
    assert result.usage is not None and result.usage.completion_tokens == 3
    assert await completion_tokens(proxy) == before + 3


@pytest.mark.parametrize("include_usage", [False, True])
async def test_openai_sdk_chat_stream(
    proxy: RunningProxy, marker: str, include_usage: bool
) -> None:
    before = await completion_tokens(proxy)
    options: Any = {"include_usage": True} if include_usage else openai.omit
    async with openai_client(proxy) as client:
        stream = await client.chat.completions.create(
            model="mock-n4",
            messages=[{"role": "user", "content": f"{marker} hi"}],
            stream=True,
            stream_options=options,
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(f"{marker} hi")
    usages = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usages) == 1 and usages[0].completion_tokens == 4
        assert chunks[-1].choices == []
    else:
        assert usages == []
        assert all(c.choices for c in chunks)
    assert await completion_tokens(proxy) == before + 4


async def test_openai_sdk_completions(proxy: RunningProxy, marker: str) -> None:
    async with openai_client(proxy) as client:
        result = await client.completions.create(model="mock", prompt=f"{marker} once")
        stream = await client.completions.create(
            model="mock-n2", prompt=f"{marker} twice", stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert result.choices[0].text.startswith(f"{marker} once")
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(f"{marker} twice")
    assert all(c.usage is None for c in chunks)


async def test_openai_sdk_embeddings(proxy: RunningProxy, marker: str) -> None:
    async with openai_client(proxy) as client:
        result = await client.embeddings.create(model="mock", input=[marker, "two"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8
    assert result.data[0].embedding[0] == pytest.approx(0.0125)
    assert result.usage.prompt_tokens == (32 + 3) // 4 + 1  # the mock: characters // 4 + 1


async def test_openai_sdk_responses(proxy: RunningProxy, marker: str) -> None:
    before = await completion_tokens(proxy)
    async with openai_client(proxy) as client:
        result = await client.responses.create(model="mock-n3", input=f"{marker} resp")
        stream = await client.responses.create(
            model="mock-n3", input=f"{marker} stream", stream=True
        )
        events = [event async for event in stream]
    assert result.output_text.startswith(f"{marker} resp")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas.startswith(f"{marker} stream")
    assert events[-1].type == "response.completed"
    assert await completion_tokens(proxy) == before + 6


async def test_anthropic_sdk_messages(mock: Mock, start_proxy: StartProxy, marker: str) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "anthropic", "base_url": mock.anthropic_url}]
    )
    before = await completion_tokens(proxy)
    async with anthropic_client(proxy) as client:
        message = await client.messages.create(
            model="mock-n3",
            max_tokens=64,
            messages=[{"role": "user", "content": f"{marker} plain"}],
        )
        stream = await client.messages.create(
            model="mock-n5",
            max_tokens=64,
            messages=[{"role": "user", "content": f"{marker} streamed"}],
            stream=True,
        )
        events = [event async for event in stream]
        async with client.messages.stream(
            model="mock-n2",
            max_tokens=64,
            messages=[{"role": "user", "content": f"{marker} helper"}],
        ) as helper:
            final = await helper.get_final_message()
    block = message.content[0]
    assert block.type == "text" and block.text.startswith(f"{marker} plain")
    assert message.usage.output_tokens == 3
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text.startswith(f"{marker} streamed")
    assert events[-1].type == "message_stop"
    assert final.content[0].type == "text" and final.content[0].text.startswith(f"{marker} helper")
    assert await completion_tokens(proxy) == before + 3 + 5 + 2


async def test_sdk_errors_are_typed(proxy: RunningProxy, mock: Mock) -> None:
    async with openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="zr-wrong", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="mock", messages=[])
    assert info.value.code == "invalid_api_key"
    async with anthropic.AsyncAnthropic(
        base_url=proxy.url, api_key="zr-wrong", max_retries=0
    ) as aclient:
        with pytest.raises(anthropic.AuthenticationError) as ainfo:
            await aclient.messages.create(model="mock", max_tokens=8, messages=[])
    assert isinstance(ainfo.value.body, dict)
    assert ainfo.value.body["type"] == "error"
    assert mock.stats.started == 0
