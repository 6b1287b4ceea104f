"""Failover: the next upstream before the first byte, never after it.

The failing upstreams are fakes (tests/fakes.py) on port 0, or a closed port, so what
each one was asked, and in which order, is recorded in the test.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mock, StartProxy, kind_for, metric, post, raw_post
from tests.fakes import RETRY_BODY, closed_port
from tests.fakes import FakeUpstream as Fake
from tests.fakes import FakeUpstreams as Fakes


def upstream(name: str, url: str, kind: str = "openai") -> dict[str, Any]:
    return {"name": name, "kind": kind, "base_url": url}


def chat(model: str = "mock", *, stream: bool = False, text: str = "hello") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    return json.dumps(body).encode()


def anthropic(model: str = "mock", *, stream: bool = False, text: str = "hello") -> bytes:
    body = {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    return json.dumps(body).encode()


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


def sse_data(event: bytes) -> Any:
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    payload = b"\n".join(lines)
    return payload if payload == b"[DONE]" else json.loads(payload)


async def failing(fakes: Fakes, name: str, behaviour: str) -> tuple[str, Fake | None]:
    """(base_url, fake or None) of an upstream that fails in the given way."""
    if behaviour == "connect":
        return f"http://127.0.0.1:{closed_port()}/v1", None
    fake = await fakes.start(name, behaviour)
    return fake.url, fake


# --- failover before the first byte --------------------------------------------------------

KINDS = {"503": "status_5xx", "500": "status_5xx", "429": "status_429", "hang": "timeout"}
KINDS |= {"connect": "connect", "reset": "connect"}  # a reset before any byte: like connect


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("behaviour", ["503", "500", "429", "hang", "connect", "reset"])
async def test_fails_over_to_the_next_upstream(
    mock: Mock,
    start_proxy: StartProxy,
    fakes: Fakes,
    session: aiohttp.ClientSession,
    behaviour: str,
    stream: bool,
) -> None:
    url, fake = await failing(fakes, "bad", behaviour)
    proxy = await start_proxy(
        [upstream("bad", url), upstream("mock", mock.url)],
        routes=[{"model": "mock*", "upstreams": ["bad", "mock"], "name": "main"}],
        first_byte_timeout_s=0.5,
    )
    marker = uuid.uuid4().hex
    rid = f"fo-{marker}"
    async with session.post(
        proxy.url + "/v1/chat/completions",
        data=chat(stream=stream, text=marker),
        headers={**proxy.auth(), "X-Request-Id": rid},
    ) as resp:
        body = await resp.read()
    assert resp.status == 200
    assert "X-Upstream-Request-Id" not in resp.headers
    if stream:
        events = sse_events(body)
        assert sse_data(events[-1]) == b"[DONE]"
        assert marker in body.decode()
    else:
        assert json.loads(body)["choices"][0]["message"]["content"].startswith(marker)
    if fake is not None:
        assert fake.hits == 1
        assert fakes.order == ["bad"]
    assert mock.stats.requests[rid].end == "completed"
    assert mock.stats.started == 1
    errors = "zrproxy_upstream_errors_total"
    if behaviour == "reset":
        assert await metric(proxy, errors, upstream="bad") == 1
        assert await metric(proxy, errors, upstream="bad", kind="status_5xx") == 0
    else:
        assert await metric(proxy, errors, upstream="bad", kind=KINDS[behaviour]) == 1
    assert await metric(proxy, errors, upstream="mock") == 0
    assert await metric(proxy, "zrproxy_failovers_total", route="main") == 1
    assert (
        await metric(
            proxy, "zrproxy_requests_total", route="main", upstream="mock", status_class="2xx"
        )
        == 1
    )


async def test_three_upstreams_tried_in_order(
    mock: Mock, start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession
) -> None:
    a = await fakes.start("a", "503")
    b = await fakes.start("b", "429")
    proxy = await start_proxy(
        [upstream("mock", mock.url), upstream("a", a.url), upstream("b", b.url)],
        routes=[{"model": "*", "upstreams": ["a", "b", "mock"], "name": "three"}],
    )
    for n in range(1, 3):
        async with session.post(
            proxy.url + "/v1/chat/completions", data=chat(), headers=proxy.auth()
        ) as resp:
            assert resp.status == 200
            assert "Retry-After" not in resp.headers
            await resp.read()
        assert fakes.order == ["a", "b"] * n
        assert mock.stats.started == n
    errors = "zrproxy_upstream_errors_total"
    assert await metric(proxy, errors, upstream="a", kind="status_5xx") == 2
    assert await metric(proxy, errors, upstream="b", kind="status_429") == 2
    assert await metric(proxy, errors, upstream="mock") == 0
    assert await metric(proxy, "zrproxy_failovers_total", route="three") == 2


async def test_first_upstream_success_means_no_failover(
    mock: Mock, start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession
) -> None:
    spare = await fakes.start("spare", "ok")
    proxy = await start_proxy(
        [upstream("mock", mock.url), upstream("spare", spare.url)],
        routes=[{"model": "*", "upstreams": ["mock", "spare"], "name": "r"}],
    )
    async with session.post(
        proxy.url + "/v1/chat/completions", data=chat(), headers=proxy.auth()
    ) as resp:
        assert resp.status == 200
        await resp.read()
    assert spare.hits == 0
    assert await metric(proxy, "zrproxy_failovers_total", route="r") == 0


# --- when every upstream fails ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_all_failing_relays_the_last_upstreams_429(
    start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession, path: str
) -> None:
    a = await fakes.start("a", "503")
    b = await fakes.start("b", "429")
    proxy = await start_proxy(
        [upstream("a", a.url, kind_for(path)), upstream("b", b.url, kind_for(path))],
        routes=[{"model": "*", "upstreams": ["a", "b"], "name": "r"}],
    )
    async with session.post(proxy.url + path, data=chat(), headers=proxy.auth()) as resp:
        body = await resp.read()
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "7"
    assert resp.headers["X-Upstream-Request-Id"] == "b"
    assert body == RETRY_BODY
    assert fakes.order == ["a", "b"]
    assert (
        await metric(proxy, "zrproxy_upstream_errors_total", upstream="a", kind="status_5xx") == 1
    )
    assert (
        await metric(proxy, "zrproxy_upstream_errors_total", upstream="b", kind="status_429") == 1
    )
    # Nobody served it: relaying b's 429 is no failover.
    assert await metric(proxy, "zrproxy_failovers_total") == 0
    assert (
        await metric(proxy, "zrproxy_requests_total", route="r", upstream="b", status_class="4xx")
        == 1
    )


async def test_all_failing_relays_the_last_upstreams_5xx(
    start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession
) -> None:
    a = await fakes.start("a", "429")
    b = await fakes.start("b", "502")
    proxy = await start_proxy(
        [upstream("a", a.url), upstream("b", b.url)],
        routes=[{"model": "*", "upstreams": ["a", "b"]}],
    )
    async with session.post(
        proxy.url + "/v1/chat/completions", data=chat(), headers=proxy.auth()
    ) as resp:
        body = await resp.read()
    assert resp.status == 502
    assert resp.headers["X-Upstream-Request-Id"] == "b"
    assert "Retry-After" not in resp.headers
    assert json.loads(body)["error"]["message"] == "b is down"


async def test_all_failing_mock_status_is_relayed(
    mock: Mock, start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession
) -> None:
    a = await fakes.start("a", "503")
    proxy = await start_proxy(
        [upstream("a", a.url), upstream("mock", mock.url)],
        routes=[{"model": "*", "upstreams": ["a", "mock"]}],
    )
    async with session.post(
        proxy.url + "/v1/chat/completions", data=chat("mock-e429"), headers=proxy.auth()
    ) as resp:
        body = await resp.read()
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize(
    ("behaviours", "status"),
    [
        (("connect", "connect"), 502),
        (("connect", "connect", "connect"), 502),
        (("hang", "connect"), 502),
        (("connect", "hang"), 504),
        (("hang", "hang"), 504),
    ],
    ids=["connect2", "connect3", "hang-connect", "connect-hang", "hang2"],
)
async def test_all_failing_without_a_response(
    start_proxy: StartProxy,
    fakes: Fakes,
    session: aiohttp.ClientSession,
    behaviours: tuple[str, ...],
    status: int,
    path: str,
) -> None:
    names = [f"u{i}" for i in range(len(behaviours))]
    urls = [(await failing(fakes, n, b))[0] for n, b in zip(names, behaviours, strict=True)]
    proxy = await start_proxy(
        [upstream(n, u, kind_for(path)) for n, u in zip(names, urls, strict=True)],
        routes=[{"model": "*", "upstreams": names}],
        first_byte_timeout_s=0.5,
    )
    async with session.post(proxy.url + path, data=chat(), headers=proxy.auth()) as resp:
        body = await resp.read()
    assert resp.status == status
    doc = json.loads(body)
    error_type = "timeout_error" if status == 504 else "api_error"
    if path == "/v1/messages":
        assert doc == {
            "type": "error",
            "error": {"type": error_type, "message": doc["error"]["message"]},
        }
    else:
        assert doc["error"]["type"] == error_type
        assert doc["error"]["code"] == (
            "upstream_timeout" if status == 504 else "upstream_unavailable"
        )
    assert fakes.order == [n for n, b in zip(names, behaviours, strict=True) if b == "hang"]
    for name, behaviour in zip(names, behaviours, strict=True):
        kind = KINDS[behaviour]
        assert await metric(proxy, "zrproxy_upstream_errors_total", upstream=name, kind=kind) == 1


# --- never after the first byte ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_no_retry_after_first_byte_stream_gets_in_band_error(
    mock: Mock, start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession, path: str
) -> None:
    spare = await fakes.start("spare", "ok")
    kind = "anthropic" if path == "/v1/messages" else "openai"
    proxy = await start_proxy(
        [upstream("mock", mock.url_for(kind), kind), upstream("spare", spare.url, kind)],
        routes=[{"model": "*", "upstreams": ["mock", "spare"], "name": "r"}],
    )
    make = anthropic if kind == "anthropic" else chat
    resp = await raw_post(proxy.url, path, make("mock-n10-r3", stream=True), proxy.auth())
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    # The error event, then the connection is cut without the terminating chunk.
    assert not resp.complete
    raw = resp.body
    events = sse_events(raw)
    *content, last = events
    if kind == "openai":
        texts = [
            sse_data(e)["choices"][0]["delta"].get("content")
            for e in content
            if sse_data(e)["choices"]
        ]
        assert len([t for t in texts if t]) == 3
        assert last.startswith(b"data: ")
        doc = sse_data(last)
        assert set(doc) == {"error"}
        assert set(doc["error"]) == {"message", "type", "param", "code"}
        assert doc["error"]["code"] == "upstream_stream_error"
    else:
        deltas = [e for e in content if e.startswith(b"event: content_block_delta")]
        assert len(deltas) == 3
        assert last.split(b"\n")[0] == b"event: error"
        doc = sse_data(last)
        assert doc["type"] == "error"
        assert set(doc["error"]) == {"type", "message"}
        assert doc["error"]["type"] == "api_error"
    assert b"[DONE]" not in raw
    assert b"message_stop" not in raw
    assert spare.hits == 0
    assert mock.stats.reset == 1
    assert await metric(proxy, "zrproxy_upstream_errors_total", upstream="mock", kind="reset") == 1
    assert await metric(proxy, "zrproxy_upstream_errors_total", upstream="spare") == 0
    assert await metric(proxy, "zrproxy_failovers_total", route="r") == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_stream_idle_timeout_gets_in_band_504_error(
    mock: Mock, start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession, path: str
) -> None:
    spare = await fakes.start("spare", "ok")
    proxy = await start_proxy(
        [
            upstream("mock", mock.url_for(kind_for(path)), kind_for(path)),
            upstream("spare", spare.url, kind_for(path)),
        ],
        routes=[{"model": "*", "upstreams": ["mock", "spare"]}],
        idle_timeout_s=0.5,
    )
    make = anthropic if path == "/v1/messages" else chat
    resp = await raw_post(proxy.url, path, make("mock-hangbody", stream=True), proxy.auth())
    assert resp.status == 200
    assert not resp.complete
    last = sse_events(resp.body)[-1]
    doc = sse_data(last)
    if path == "/v1/messages":
        assert last.startswith(b"event: error\n")
        assert doc["error"]["type"] == "timeout_error"
    else:
        assert doc["error"]["code"] == "upstream_timeout"
    assert spare.hits == 0
    assert (
        await metric(proxy, "zrproxy_upstream_errors_total", upstream="mock", kind="timeout") == 1
    )


async def _read_all(
    session: aiohttp.ClientSession, url: str, data: bytes, auth: dict[str, str]
) -> tuple[int, bytes]:
    resp, body = await post(session, url, data, auth)
    return resp.status, body


@pytest.mark.parametrize("model", ["mock-r1", "mock-hangbody"])
async def test_non_stream_mid_body_failure_is_not_a_complete_response(
    mock: Mock, start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession, model: str
) -> None:
    # The mock sends half of a Content-Length body, then resets (r1) or goes silent.
    spare = await fakes.start("spare", "ok")
    proxy = await start_proxy(
        [upstream("mock", mock.url), upstream("spare", spare.url)],
        routes=[{"model": "*", "upstreams": ["mock", "spare"]}],
        idle_timeout_s=0.5,
    )
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await _read_all(session, proxy.url + "/v1/chat/completions", chat(model), proxy.auth())
    assert spare.hits == 0
    kind = "reset" if model == "mock-r1" else "timeout"
    assert await metric(proxy, "zrproxy_upstream_errors_total", upstream="mock", kind=kind) == 1


async def test_non_stream_chunked_mid_body_reset_is_not_a_complete_response(
    start_proxy: StartProxy, fakes: Fakes, session: aiohttp.ClientSession
) -> None:
    # Same, with a chunked upstream body: the proxy must not end its own chunked body.
    chunky = await fakes.start("chunky", "chunked-reset")
    proxy = await start_proxy([upstream("chunky", chunky.url)])
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await _read_all(session, proxy.url + "/v1/chat/completions", chat(), proxy.auth())
    assert (
        await metric(proxy, "zrproxy_upstream_errors_total", upstream="chunky", kind="reset") == 1
    )
