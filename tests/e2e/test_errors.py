"""Errors: always in the API's own format and status, counted, and never echoing input.

Every request carries a fresh marker (in its body, a header, the path or the query); no
response body, response header or log line may contain it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mock, RunningProxy, StartProxy, kind_for, metric, raw_post
from tests.fakes import FakeUpstreams, closed_port
from zrproxy.auth import new_key

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
BAD_HTTP_BODY = {
    "error": {
        "message": "Malformed HTTP request.",
        "type": "invalid_request_error",
        "param": None,
        "code": "bad_http_request",
    }
}


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


async def rejections(proxy: RunningProxy, reason: str) -> float:
    return await metric(proxy, "zrproxy_rejections_total", reason=reason)


def assert_clean(resp: aiohttp.ClientResponse, body: bytes, marker: str) -> None:
    assert marker.encode() not in body
    for name, value in resp.raw_headers:
        assert marker.encode() not in name.lower()
        assert marker.encode() not in value.lower()


def assert_openai_error(body: bytes, code: str | None = None) -> dict[str, Any]:
    doc = json.loads(body)
    assert set(doc) == {"error"}
    error: dict[str, Any] = doc["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


def assert_anthropic_error(body: bytes, error_type: str | None = None) -> dict[str, Any]:
    doc = json.loads(body)
    assert set(doc) == {"type", "error"}
    assert doc["type"] == "error"
    error: dict[str, Any] = doc["error"]
    assert set(error) == {"type", "message"}
    assert isinstance(error["message"], str) and error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    return error


def assert_error(path: str, body: bytes, status: int) -> dict[str, Any]:
    """The error document for `path`'s dialect; its type agrees with the status."""
    expected_type = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        405: "invalid_request_error",
        413: "request_too_large",
        502: "api_error",
        504: "timeout_error",
    }.get(status)
    if path.startswith("/v1/messages"):
        return assert_anthropic_error(body, expected_type)
    error = assert_openai_error(body)
    if expected_type is not None:
        assert error["type"] == expected_type
    return error


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    marker: str,
    *,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, bytes]:
    all_headers = {"X-Marker": f"m-{marker}", **(headers or {})}
    async with session.request(method, url, data=data, headers=all_headers) as resp:
        try:
            return resp, await resp.read()
        except aiohttp.ClientPayloadError:
            return resp, b""  # a stream the proxy cut after its in-band error event


# --- 400: bodies we cannot use ---------------------------------------------------------------


def bad_bodies(marker: str) -> dict[str, bytes]:
    m = marker.encode()
    return {
        "truncated": b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + m,
        "not_json": b"model=" + m,
        "array": b'[{"model": "gpt-4o"}, "' + m + b'"]',
        "string": b'"' + m + b'"',
        "nan": b'{"model": "gpt-4o", "temperature": NaN, "note": "' + m + b'"}',
        "infinity": b'{"model": "gpt-4o", "x": -Infinity, "note": "' + m + b'"}',
        "invalid_utf8": b'{"model": "gpt-4o", "note": "\xff\xfe' + m + b'"}',
        "empty": b"",
        "deep": b"[" * 100_000 + m,
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "not_json",
        "array",
        "string",
        "nan",
        "infinity",
        "invalid_utf8",
        "empty",
        "deep",
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_malformed_json_is_400(
    proxy: RunningProxy, session: aiohttp.ClientSession, marker: str, path: str, case: str
) -> None:
    before = await rejections(proxy, "malformed")
    resp, body = await send(
        session,
        "POST",
        proxy.url + path,
        marker,
        data=bad_bodies(marker)[case],
        headers={**proxy.auth(), "Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert resp.content_type == "application/json"
    error = assert_error(path, body, 400)
    if not path.startswith("/v1/messages"):
        assert error["code"] == "invalid_json"
    assert_clean(resp, body, marker)
    assert await rejections(proxy, "malformed") == before + 1


@pytest.mark.parametrize(
    "payload",
    [
        {"messages": "{m}"},
        {"model": None, "messages": "{m}"},
        {"model": 5, "messages": "{m}"},
        {"model": ["{m}"]},
        {"model": {"name": "{m}"}},
        {"model": ""},
        {"model": "{m}" * 20},  # longer than any model id
    ],
    ids=["missing", "null", "int", "list", "object", "empty", "too_long"],
)
@pytest.mark.parametrize("path", [*OPENAI_PATHS, "/v1/messages"])
async def test_missing_or_bad_model_is_400(
    proxy: RunningProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    payload: dict[str, Any],
) -> None:
    data = json.dumps(payload).replace("{m}", marker).encode()
    before = await rejections(proxy, "malformed")
    resp, body = await send(
        session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
    )
    assert resp.status == 400
    error = assert_error(path, body, 400)
    if not path.startswith("/v1/messages"):
        assert error["code"] == "missing_model"
    assert_clean(resp, body, marker)
    assert await rejections(proxy, "malformed") == before + 1


# --- 401 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"Authorization": "Bearer zr-{m}"},
        {"Authorization": "Basic {m}"},
        {"Authorization": "{m}"},
        {"Authorization": "Bearer "},
        {"x-api-key": "zr-{m}"},
        {"Authorization": "Token {key}"},
    ],
    ids=["none", "wrong_key", "basic", "no_scheme", "empty_bearer", "wrong_x_api_key", "token"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/models"])
async def test_bad_credentials_are_401(
    proxy: RunningProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    auth: dict[str, str],
) -> None:
    headers = {k: v.replace("{m}", marker).replace("{key}", proxy.key) for k, v in auth.items()}
    method = "GET" if path == "/v1/models" else "POST"
    data = json.dumps({"model": "mock", "messages": [{"role": "user", "content": marker}]})
    before = await rejections(proxy, "auth")
    resp, body = await send(
        session,
        method,
        proxy.url + path,
        marker,
        data=None if method == "GET" else data,
        headers=headers,
    )
    assert resp.status == 401
    error = assert_error(path, body, 401)
    if not path.startswith("/v1/messages"):
        assert error["code"] == "invalid_api_key"
    assert_clean(resp, body, marker)
    assert proxy.key.encode() not in body
    assert await rejections(proxy, "auth") == before + 1


async def test_x_api_key_is_accepted(
    proxy: RunningProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    # The control for the 401 cases: the Anthropic SDK's header style works.
    data = json.dumps({"model": "mock", "messages": [{"role": "user", "content": marker}]})
    resp, _ = await send(
        session,
        "POST",
        proxy.url + "/v1/messages",
        marker,
        data=data,
        headers={"x-api-key": proxy.key},
    )
    assert resp.status == 200


# --- 403 and 404 for models ------------------------------------------------------------------


async def test_model_not_allowed_for_project_is_403(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    key, digest = new_key()
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}],
        projects=[{"name": "acme", "key_sha256": [digest], "models": ["mock*", "gpt-4o"]}],
    )
    auth = {"Authorization": f"Bearer {key}"}
    for path in ("/v1/chat/completions", "/v1/messages"):
        before = await rejections(proxy, "model")
        data = json.dumps({"model": f"claude-{marker}", "messages": []})
        resp, body = await send(session, "POST", proxy.url + path, marker, data=data, headers=auth)
        assert resp.status == 403
        error = assert_error(path, body, 403)
        if path != "/v1/messages":
            assert error["code"] == "model_not_allowed"
        assert_clean(resp, body, marker)
        assert await rejections(proxy, "model") == before + 1
    assert mock.stats.started == 0
    # The control: an allowed model goes through.
    data = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
    resp, _ = await send(
        session, "POST", proxy.url + "/v1/chat/completions", marker, data=data, headers=auth
    )
    assert resp.status == 200


async def test_model_without_route_is_404(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}],
        routes=[{"model": "mock*", "upstreams": ["mock"]}],
    )
    for path in ("/v1/chat/completions", "/v1/messages"):
        before = await rejections(proxy, "not_found")
        data = json.dumps({"model": f"gpt-{marker}", "messages": []})
        resp, body = await send(
            session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
        )
        assert resp.status == 404
        assert_error(path, body, 404)
        assert_clean(resp, body, marker)
        assert await rejections(proxy, "not_found") == before + 1
    assert mock.stats.started == 0


# --- 404 and 405 for paths -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/{m}",
        "/v1/chat/completions/extra",
        "/v1/chat/completions/",
        "/v1/messages/{m}",
        "/v2/chat/completions",
        "/V1/chat/completions",
        "/{m}?q={m}",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_path_is_404(
    proxy: RunningProxy, session: aiohttp.ClientSession, marker: str, path: str, method: str
) -> None:
    url = proxy.url + path.replace("{m}", marker)
    data = json.dumps({"model": "mock", "note": marker}) if method == "POST" else None
    before = await rejections(proxy, "not_found")
    resp, body = await send(session, method, url, marker, data=data, headers=proxy.auth())
    assert resp.status == 404
    assert resp.content_type == "application/json"
    if path.startswith("/v1/messages/"):
        # Not an endpoint of ours: either format is fine (Anthropic's would be kinder).
        doc = json.loads(body)
        (assert_anthropic_error if "type" in doc else assert_openai_error)(body)
    else:
        assert_error(path, body, 404)
    assert_clean(resp, body, marker)
    assert await rejections(proxy, "not_found") == before + 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/chat/completions"),
        ("DELETE", "/v1/embeddings"),
        ("GET", "/v1/messages"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models"),
    ],
)
async def test_wrong_method_is_405(
    proxy: RunningProxy, session: aiohttp.ClientSession, marker: str, method: str, path: str
) -> None:
    before = await rejections(proxy, "method")
    resp, body = await send(
        session,
        method,
        f"{proxy.url}{path}?q={marker}",
        marker,
        data=json.dumps({"model": marker}) if method != "GET" else None,
        headers=proxy.auth(),
    )
    assert resp.status == 405
    error = assert_error(path, body, 405)
    if path != "/v1/messages":
        assert error["code"] == "method_not_allowed"
    assert_clean(resp, body, marker)
    assert await rejections(proxy, "method") == before + 1


# --- 413 -----------------------------------------------------------------------------------

MAX_BODY = 4096


def big_body(marker: str) -> bytes:
    text = (marker + " ") * (2 * MAX_BODY // len(marker))
    return json.dumps({"model": "mock", "messages": [{"role": "user", "content": text}]}).encode()


@pytest.mark.parametrize("framing", ["content_length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_body_too_large_is_413(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    framing: str,
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": kind_for(path), "base_url": mock.url_for(kind_for(path))}],
        max_body_bytes=MAX_BODY,
    )
    payload = big_body(marker)
    assert len(payload) > MAX_BODY

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    data: Any = payload if framing == "content_length" else chunks()
    before = await rejections(proxy, "size")
    resp, body = await send(
        session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
    )
    if framing == "chunked":
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert resp.status == 413
    assert_error(path, body, 413)
    assert_clean(resp, body, marker)
    assert await rejections(proxy, "size") == before + 1
    assert mock.stats.started == 0


async def test_expect_continue_refused_when_too_large(
    mock: Mock, start_proxy: StartProxy, marker: str
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}], max_body_bytes=MAX_BODY
    )
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {proxy.key}\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: {n}\r\n\r\n"
    )
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    # Too large: 413 at once, no 100 Continue, and the body is never needed. (The
    # server may linger reading a body that never comes, so read one response only.)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("{n}", str(10 * MAX_BODY)).encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:40]
    assert b"Connection: close" in raw
    assert mock.stats.started == 0
    # Small enough: 100 Continue, then the body, then the answer.
    body = json.dumps({"model": "mock", "messages": [{"role": "user", "content": marker}]})
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("{n}", str(len(body))).encode())
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()


async def test_body_at_the_limit_is_accepted(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}], max_body_bytes=MAX_BODY
    )
    head = json.dumps({"model": "mock", "messages": [{"role": "user", "content": ""}]}).encode()
    payload = head[:-4] + b"x" * (MAX_BODY - len(head)) + head[-4:]  # pad inside "content"
    assert len(payload) == MAX_BODY and json.loads(payload)

    async def chunks() -> AsyncIterator[bytes]:
        yield payload[:1000]
        yield payload[1000:]

    for data in (payload, chunks()):
        resp, _ = await send(
            session,
            "POST",
            proxy.url + "/v1/chat/completions",
            marker,
            data=data,
            headers=proxy.auth(),
        )
        assert resp.status == 200


# --- upstream failures ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/messages"])
async def test_all_upstreams_refusing_is_502(
    start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str, path: str
) -> None:
    proxy = await start_proxy(
        [
            {
                "name": "a",
                "kind": kind_for(path),
                "base_url": f"http://127.0.0.1:{closed_port()}/v1",
            },
            {
                "name": "b",
                "kind": kind_for(path),
                "base_url": f"http://127.0.0.1:{closed_port()}/v1",
            },
        ]
    )
    data = json.dumps(
        {"model": "mock", "input": marker, "messages": [{"role": "user", "content": marker}]}
    )
    resp, body = await send(
        session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
    )
    assert resp.status == 502
    error = assert_error(path, body, 502)
    if path != "/v1/messages":
        assert error["code"] == "upstream_unavailable"
    assert_clean(resp, body, marker)
    for name in ("a", "b"):
        assert (
            await metric(proxy, "zrproxy_upstream_errors_total", upstream=name, kind="connect") == 1
        )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_upstream_without_headers_is_504(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    stream: bool,
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": kind_for(path), "base_url": mock.url_for(kind_for(path))}],
        first_byte_timeout_s=0.5,
    )
    data = json.dumps(
        {"model": "mock-hang", "stream": stream, "messages": [{"role": "user", "content": marker}]}
    )
    resp, body = await send(
        session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
    )
    assert resp.status == 504
    error = assert_error(path, body, 504)
    if path != "/v1/messages":
        assert error["code"] == "upstream_timeout"
    assert_clean(resp, body, marker)
    assert (
        await metric(proxy, "zrproxy_upstream_errors_total", upstream="mock", kind="timeout") == 1
    )


@pytest.mark.parametrize(
    ("model", "stream"),
    [("mock-f3000", False), ("mock-f3000", True), ("mock-n100-d50", False)],
    ids=["slow_headers", "slow_headers_stream", "slow_non_stream"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_total_timeout_before_headers_is_504(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    model: str,
    stream: bool,
) -> None:
    # first_byte_timeout_s is long: it is the request's total deadline that expires.
    proxy = await start_proxy(
        [{"name": "mock", "kind": kind_for(path), "base_url": mock.url_for(kind_for(path))}],
        total_timeout_s=1,
    )
    data = json.dumps({"model": model, "stream": stream, "messages": [], "note": marker})
    resp, body = await send(
        session,
        "POST",
        proxy.url + path,
        marker,
        data=data,
        headers={**proxy.auth(), "X-Request-Id": "deadline"},
    )
    assert resp.status == 504
    error = assert_error(path, body, 504)
    if path != "/v1/messages":
        assert error["code"] == "upstream_timeout"
    assert resp.headers["X-Request-Id"] == "deadline"
    assert_clean(resp, body, marker)
    assert (
        await metric(proxy, "zrproxy_requests_total", upstream="none", status_class="5xx")
        + await metric(proxy, "zrproxy_requests_total", upstream="mock", status_class="5xx")
        == 1
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_total_timeout_mid_stream_is_in_band(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession, path: str
) -> None:
    proxy = await start_proxy(
        [{"name": "mock", "kind": kind_for(path), "base_url": mock.url_for(kind_for(path))}],
        total_timeout_s=1,
    )
    data = json.dumps({"model": "mock-n100-d50", "stream": True, "messages": []})
    resp = await raw_post(proxy.url, path, data.encode(), proxy.auth())
    assert resp.status == 200
    assert not resp.complete  # cut after the error event: no terminating chunk
    body = resp.body
    last = body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    doc = json.loads(last.split(b"data: ", 1)[1])
    if path == "/v1/messages":
        assert last.startswith(b"event: error\n")
        assert_anthropic_error(json.dumps(doc).encode(), "timeout_error")
    else:
        assert assert_openai_error(json.dumps(doc).encode())["code"] == "upstream_timeout"


def _first_and_second(mock: Mock, path: str) -> list[dict[str, Any]]:
    """Upstreams "first" and "second": the mock of the kind that serves `path`."""
    kind = kind_for(path)
    return [{"name": n, "kind": kind, "base_url": mock.url_for(kind)} for n in ("first", "second")]


@pytest.mark.parametrize("status", [400, 404, 413, 422])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_upstream_4xx_passes_through_without_failover(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    status: int,
) -> None:
    proxy = await start_proxy(_first_and_second(mock, path))
    data = json.dumps({"model": f"mock-e{status}", "messages": [{"role": "user", "content": "x"}]})
    async with session.post(mock.url_for(kind_for(path))[:-3] + path, data=data) as direct:
        expected = await direct.read()
        assert direct.status == status
    started = mock.stats.started
    resp, body = await send(
        session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
    )
    assert resp.status == status
    assert body == expected  # the upstream's own error document, byte for byte
    assert resp.content_type == "application/json"
    assert mock.stats.started == started + 1  # no failover to "second"
    assert await metric(proxy, "zrproxy_failovers_total") == 0
    assert await metric(proxy, "zrproxy_upstream_errors_total") == 0


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_upstream_refusing_our_key_is_502_and_fails_over(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    marker: str,
    path: str,
    status: int,
) -> None:
    # Our provider key expired or was revoked: not the client's fault (so not its 401),
    # never the provider's body (it names the operator's masked key), and like a 5xx the
    # next upstream is tried.
    proxy = await start_proxy(
        _first_and_second(mock, path),
        routes=[
            {"name": "refused", "model": "mock-e*", "upstreams": ["first"]},
            {"name": "spare", "model": "*", "upstreams": ["first", "second"]},
        ],
    )
    data = json.dumps({"model": f"mock-e{status}", "messages": [{"role": "user", "content": "x"}]})
    resp, body = await send(
        session, "POST", proxy.url + path, marker, data=data, headers=proxy.auth()
    )
    assert resp.status == 502
    error = assert_error(path, body, 502)
    if path != "/v1/messages":
        assert error["code"] == "upstream_auth_failed"
    assert b"mock" not in body.lower()  # nothing of the provider's own error document
    assert_clean(resp, body, marker)
    assert await metric(proxy, "zrproxy_upstream_errors_total", upstream="first", kind="auth") == 1
    assert await metric(proxy, "zrproxy_rejections_total") == 0  # not a client rejection


async def test_a_refused_key_fails_over_to_the_next_upstream(
    mock: Mock, start_proxy: StartProxy, fakes: FakeUpstreams, session: aiohttp.ClientSession
) -> None:
    revoked = await fakes.start("revoked")
    revoked.status = 401
    revoked.body = b'{"error":{"message":"Incorrect API key provided: sk-proj-****abcd"}}'
    proxy = await start_proxy(
        [
            {"name": "revoked", "kind": "openai", "base_url": revoked.url},
            {"name": "mock", "kind": "openai", "base_url": mock.url},
        ]
    )
    data = json.dumps({"model": "mock", "messages": [{"role": "user", "content": "x"}]})
    url = proxy.url + "/v1/chat/completions"
    resp, body = await send(session, "POST", url, "m", data=data, headers=proxy.auth())
    assert resp.status == 200 and revoked.hits == 1
    assert b"abcd" not in body
    assert (
        await metric(proxy, "zrproxy_upstream_errors_total", upstream="revoked", kind="auth") == 1
    )
    assert await metric(proxy, "zrproxy_failovers_total") == 1


async def test_models_lists_ids_the_project_can_pick(
    mock: Mock, start_proxy: StartProxy, session: aiohttp.ClientSession, marker: str
) -> None:
    key, digest = new_key()
    other_key, other_digest = new_key()
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}],
        routes=[
            {"model": "gpt-4o", "upstreams": ["mock"]},
            {"model": "claude-*", "upstreams": ["mock"], "models": ["claude-sonnet-4"]},
            {"model": "mock*", "upstreams": ["mock"]},
        ],
        projects=[
            {"name": "acme", "key_sha256": [digest], "models": ["gpt-*", "mock*", "mock-n3"]},
            {"name": "other", "key_sha256": [other_digest]},
        ],
    )

    async def get(path: str, api_key: str, **headers: str) -> tuple[aiohttp.ClientResponse, bytes]:
        resp, body = await send(
            session,
            "GET",
            f"{proxy.url}{path}?q={marker}",
            marker,
            headers={"Authorization": f"Bearer {api_key}", **headers},
        )
        assert resp.content_type == "application/json"
        assert_clean(resp, body, marker)
        return resp, body

    async def ids(api_key: str) -> list[str]:
        resp, body = await get("/v1/models", api_key)
        assert resp.status == 200
        doc = json.loads(body)
        assert doc["object"] == "list"
        assert all(m["object"] == "model" for m in doc["data"])
        return [m["id"] for m in doc["data"]]

    # Globs are never listed; concrete ids are, inside each project's allowlist.
    assert await ids(key) == ["gpt-4o", "mock-n3"]
    assert await ids(other_key) == ["gpt-4o", "claude-sonnet-4"]
    # The Anthropic SDK's list format, chosen by its anthropic-version header.
    resp, body = await get("/v1/models", other_key, **{"anthropic-version": "2023-06-01"})
    doc = json.loads(body)
    assert [m["id"] for m in doc["data"]] == ["gpt-4o", "claude-sonnet-4"]
    assert {m["type"] for m in doc["data"]} == {"model"}
    assert (doc["has_more"], doc["first_id"], doc["last_id"]) == (
        False,
        "gpt-4o",
        "claude-sonnet-4",
    )
    # One model: a listed id answers, anything else is 404 model_not_found (not echoed).
    resp, body = await get("/v1/models/claude-sonnet-4", other_key)
    assert resp.status == 200
    assert json.loads(body) == {
        "id": "claude-sonnet-4",
        "object": "model",
        "created": 0,
        "owned_by": "zrproxy",
    }
    for path, api_key in [
        ("/v1/models/claude-sonnet-4", key),  # not in acme's allowlist
        (f"/v1/models/{marker}", key),
        ("/v1/models/claude-x", other_key),  # routed, but not a listed id
    ]:
        resp, body = await get(path, api_key)
        assert resp.status == 404
        assert assert_error(path, body, 404)["code"] == "model_not_found"
    assert mock.stats.started == 0  # answered by the proxy itself
    # /v1/models is answered, not proxied: it is not a proxied request in the metrics.
    assert await metric(proxy, "zrproxy_requests_total") == 0


async def test_models_head_and_allow(proxy: RunningProxy, session: aiohttp.ClientSession) -> None:
    async with session.get(proxy.url + "/v1/models", headers=proxy.auth()) as resp:
        length = len(await resp.read())
    async with session.head(proxy.url + "/v1/models", headers=proxy.auth()) as resp:
        assert resp.status == 200
        assert resp.content_length == length  # the GET's headers, without its body
        assert await resp.read() == b""
    for method, path, allow in [
        ("POST", "/v1/models", "GET, HEAD"),
        ("PUT", "/v1/models/mock", "GET, HEAD"),
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/messages", "POST"),
    ]:
        async with session.request(method, proxy.url + path, headers=proxy.auth()) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == allow


# --- malformed HTTP ------------------------------------------------------------------------


def raw_requests(marker: str) -> dict[str, bytes]:
    m = marker.encode()
    return {
        "nul_in_target": b"GET /\x00bad" + m + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "space_in_header_name": (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nBad Header" + m + b": v\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        ),
        "no_colon": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + m + b"\r\n\r\n",
        "ctl_in_value": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: \x01" + m + b"\r\n\r\n",
        "bad_version": b"GET /v1/models HTTP/9." + m + b"\r\nHost: x\r\n\r\n",
        "bad_method": b"G(E)T" + m + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad_content_length": (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1" + m + b"\r\n\r\n"
        ),
        "two_content_lengths": (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\n{}" + m
        ),
        "bad_chunk_size": (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\nzz" + m + b"\r\n" + m + b"\r\n0\r\n\r\n"
        ),
    }


async def raw_exchange(proxy: RunningProxy, data: bytes) -> bytes:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # until the proxy closes
    finally:
        writer.close()


RAW_CASES = [
    "nul_in_target",
    "space_in_header_name",
    "no_colon",
    "ctl_in_value",
    "bad_version",
    "bad_method",
    "bad_content_length",
    "two_content_lengths",
    "bad_chunk_size",
]


def debug_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)


def assert_not_logged(caplog: pytest.LogCaptureFixture, marker: str) -> None:
    for record in caplog.records:
        assert marker not in record.getMessage()
        assert marker not in repr(record.args)
    assert marker not in caplog.text  # includes formatted tracebacks


@pytest.mark.parametrize("case", RAW_CASES)
async def test_malformed_http_gets_fixed_400(
    proxy: RunningProxy, marker: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    debug_everywhere(caplog)
    raw = await raw_exchange(proxy, raw_requests(marker)[case])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400", head
    assert marker.encode() not in raw
    assert json.loads(body) == BAD_HTTP_BODY
    assert_not_logged(caplog, marker)


@pytest.mark.parametrize("case", RAW_CASES)
async def test_malformed_http_is_counted_as_rejection(
    proxy: RunningProxy, marker: str, case: str
) -> None:
    # A request we could not even parse is still refused by the proxy itself.
    before = await rejections(proxy, "malformed")
    await raw_exchange(proxy, raw_requests(marker)[case])
    assert await rejections(proxy, "malformed") == before + 1


async def test_broken_chunked_framing_mid_body_is_answered(
    mock: Mock, start_proxy: StartProxy, marker: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bad framing after the handler started reading must end in an error, not a hang."""
    debug_everywhere(caplog)
    proxy = await start_proxy(
        [{"name": "mock", "kind": "openai", "base_url": mock.url}], idle_timeout_s=1
    )
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {proxy.key}\r\n".encode()
            + b'Transfer-Encoding: chunked\r\n\r\n6\r\n{"a":1\r\n'
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is now waiting in the body
        writer.write(b"zz" + marker.encode() + b"\r\n" + marker.encode() + b"\r\n0\r\n\r\n")
        await writer.drain()
        try:
            raw = await asyncio.wait_for(reader.read(), 10)
        except TimeoutError:
            pytest.fail("no answer 10 s after a chunked framing error")
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] in (b"400", b"408"), head
    assert marker.encode() not in raw
    assert_openai_error(body)
    assert_not_logged(caplog, marker)
    assert mock.stats.started == 0


async def test_nothing_logged_contains_the_marker(
    mock: Mock,
    start_proxy: StartProxy,
    session: aiohttp.ClientSession,
    marker: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tour of the error paths with DEBUG logging everywhere."""
    debug_everywhere(caplog)
    proxy = await start_proxy(
        [
            {"name": "dead", "kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
            {"name": "mock", "kind": "openai", "base_url": mock.url},
        ],
        first_byte_timeout_s=0.5,
        max_body_bytes=MAX_BODY,
    )
    auth = proxy.auth()
    url = proxy.url + "/v1/chat/completions"
    for data, headers, target in [
        (b"{" + marker.encode(), auth, url),
        (json.dumps({"model": marker}), {"Authorization": f"Bearer {marker}"}, url),
        (big_body(marker), auth, url),
        (json.dumps({"model": "mock-hang", "note": marker}), auth, url),
        (json.dumps({"model": "mock-e400", "note": marker}), auth, url),
        (json.dumps({"model": "mock-n3-r1", "stream": True, "note": marker}), auth, url),
        (json.dumps({"model": "mock", "note": marker}), auth, f"{proxy.url}/{marker}?{marker}"),
    ]:
        resp, body = await send(session, "POST", target, marker, data=data, headers=headers)
        assert_clean(resp, body, marker)
    await raw_exchange(proxy, raw_requests(marker)["space_in_header_name"])
    assert any("zrproxy ready" in r.getMessage() for r in caplog.records)  # capture works
    assert_not_logged(caplog, marker)
