"""The memory budget for request bodies and the body deadlines: 503 before reading more,
and a slow body is the client's fault (408, zrproxy_client_errors_total), never the
upstream's."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tests.conftest import Mock, RunningProxy, StartProxy, metric

CHAT = "/v1/chat/completions"


def _upstreams(mock: Mock) -> list[dict[str, Any]]:
    return [{"name": "mock", "kind": "openai", "base_url": mock.url}]


def _body(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes (padding in the prompt)."""
    empty = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": ""}]})
    return orjson.dumps(
        {"model": "mock", "messages": [{"role": "user", "content": "x" * (size - len(empty))}]}
    )


async def _connect(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = proxy.service.api_address
    assert address is not None
    return await asyncio.open_connection(address.host, address.port)


def _head(proxy: RunningProxy, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:-2])}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return status, headers, body


async def test_over_the_body_budget_answers_503_before_reading(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), max_buffered_body_bytes=1000)
    # A holds 800 bytes of the budget: it declared them and sends only part.
    reader_a, writer_a = await _connect(proxy)
    writer_a.write(_head(proxy, 800) + b"{")
    await writer_a.drain()
    await asyncio.sleep(0.2)
    # B declares 500: over the budget, answered before it sent a byte of its body.
    reader_b, writer_b = await _connect(proxy)
    writer_b.write(_head(proxy, 500))
    status, headers, body = await _response(reader_b)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    writer_b.close()
    # A chunked body is counted as it arrives: past the budget, 503 too.
    reader_c, writer_c = await _connect(proxy)
    writer_c.write(_head(proxy, None) + b"190\r\n" + b"x" * 400 + b"\r\n")
    status, headers, _ = await _response(reader_c)
    assert status == 503
    assert headers["retry-after"] == "1"
    writer_c.close()
    # ... and so is a whole chunked body that arrived with its head, in one read.
    reader_e, writer_e = await _connect(proxy)
    writer_e.write(_head(proxy, None) + b"190\r\n" + b"x" * 400 + b"\r\n0\r\n\r\n")
    status, headers, _ = await _response(reader_e)
    assert status == 503
    writer_e.close()
    assert mock.stats.started == 0
    # A completes: its share comes back and the same request as B is served.
    writer_a.write(_body(800)[1:])
    status, _, _ = await _response(reader_a)
    assert status == 200
    writer_a.close()
    reader_d, writer_d = await _connect(proxy)
    writer_d.write(_head(proxy, 500) + _body(500))
    status, _, _ = await _response(reader_d)
    assert status == 200
    writer_d.close()
    assert await metric(proxy, "zrproxy_rejections_total", reason="overloaded") == 3


async def _no_upstream_blame(proxy: RunningProxy) -> None:
    assert await metric(proxy, "zrproxy_upstream_errors_total") == 0


async def test_a_body_slower_than_body_timeout_is_the_clients_fault(
    mock: Mock, start_proxy: StartProxy
) -> None:
    # Each gap (0.2 s) is well inside idle_timeout_s; the whole body is not in time.
    proxy = await start_proxy(_upstreams(mock), body_timeout_s=1.0, idle_timeout_s=30.0)
    reader, writer = await _connect(proxy)
    body = _body(200)
    writer.write(_head(proxy, len(body)))

    async def dribble() -> None:
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    dribbler = asyncio.create_task(dribble())
    status, _, payload = await _response(reader)
    dribbler.cancel()
    writer.close()
    assert status == 408
    error = orjson.loads(payload)["error"]
    assert error["code"] == "request_timeout"
    assert "upstream" not in error["message"]
    assert await metric(proxy, "zrproxy_client_errors_total", kind="body_timeout") == 1
    assert await metric(proxy, "zrproxy_client_errors_total", kind="slow_body") == 0
    await _no_upstream_blame(proxy)
    assert mock.stats.started == 0


async def test_a_stalled_body_is_slow_body(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock), idle_timeout_s=0.5, body_timeout_s=60.0)
    reader, writer = await _connect(proxy)
    writer.write(_head(proxy, 200) + b'{"model": "mock",')
    status, _, payload = await _response(reader)
    writer.close()
    assert status == 408
    assert orjson.loads(payload)["error"]["type"] == "invalid_request_error"
    assert await metric(proxy, "zrproxy_client_errors_total", kind="slow_body") == 1
    await _no_upstream_blame(proxy)


async def test_the_total_deadline_while_the_body_arrives_is_not_an_upstream_timeout(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        _upstreams(mock), total_timeout_s=0.5, idle_timeout_s=30.0, body_timeout_s=30.0
    )
    reader, writer = await _connect(proxy)
    writer.write(_head(proxy, 200) + b"{")
    status, _, payload = await _response(reader)
    writer.close()
    assert status == 408
    assert "upstream" not in orjson.loads(payload)["error"]["message"]
    assert await metric(proxy, "zrproxy_client_errors_total", kind="body_timeout") == 1
    await _no_upstream_blame(proxy)
