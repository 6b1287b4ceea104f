"""HTTP input limits on raw sockets: 414 and 431 with the connection closed, the head
deadline apart from keep-alive, 401 closes, and no header value outlives its request on
an idle keep-alive connection."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson

from tests.conftest import Mock, RunningProxy, StartProxy
from tests.retention import live_holders

CHAT = "/v1/chat/completions"
BODY = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})


def _upstreams(mock: Mock) -> list[dict[str, Any]]:
    return [{"name": "mock", "kind": "openai", "base_url": mock.url}]


async def _connect(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = proxy.service.api_address
    assert address is not None
    return await asyncio.open_connection(address.host, address.port)


def _request(proxy: RunningProxy, *, target: str = CHAT, extra: str = "", key: str = "") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key or proxy.key}\r\n"
        f"Content-Type: application/json\r\n{extra}Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:-2])}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return int(lines[0].split()[1]), headers, body


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True when the proxy closed the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(1), 30) == b""
    except ConnectionError:
        return True


async def _refused_with(proxy: RunningProxy, raw: bytes) -> tuple[int, str]:
    reader, writer = await _connect(proxy)
    writer.write(raw)
    status, _, body = await _response(reader)
    assert await _closed(reader)
    writer.close()
    return status, orjson.loads(body)["error"]["code"]


async def test_a_long_request_line_is_414_and_closes(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock), max_request_line_bytes=1000)
    target = CHAT + "?q=" + "a" * 1000
    assert await _refused_with(proxy, _request(proxy, target=target)) == (414, "uri_too_long")
    assert mock.stats.started == 0


async def test_a_large_header_field_is_431_and_closes(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock), max_header_field_bytes=2000)
    raw = _request(proxy, extra=f"X-Big: {'b' * 3000}\r\n")
    assert await _refused_with(proxy, raw) == (431, "request_header_fields_too_large")
    assert mock.stats.started == 0


async def test_too_many_header_fields_is_431(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock), max_header_fields=20)
    extra = "".join(f"X-F{i}: v\r\n" for i in range(30))
    assert (await _refused_with(proxy, _request(proxy, extra=extra)))[0] == 431
    assert mock.stats.started == 0


async def test_the_total_header_budget(mock: Mock, start_proxy: StartProxy) -> None:
    extra = "".join(f"X-F{i}: {'v' * 4000}\r\n" for i in range(10))  # 40 KB in 10 fields
    proxy = await start_proxy(_upstreams(mock))  # max_header_bytes = 32 KiB by default
    assert (await _refused_with(proxy, _request(proxy, extra=extra)))[0] == 431
    assert mock.stats.started == 0
    roomy = await start_proxy(_upstreams(mock), max_header_bytes=64 * 1024)
    reader, writer = await _connect(roomy)
    writer.write(_request(roomy, extra=extra))
    assert (await _response(reader))[0] == 200
    writer.close()


async def test_an_idle_new_connection_is_closed_after_header_timeout(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), header_timeout_s=0.3, keepalive_timeout_s=60.0)
    reader, writer = await _connect(proxy)
    assert await _closed(reader)  # closed, without a response
    writer.close()


async def test_a_slow_head_gets_408_after_header_timeout(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), header_timeout_s=0.3, keepalive_timeout_s=60.0)
    reader, writer = await _connect(proxy)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    status, _, body = await _response(reader)
    assert status == 408
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert await _closed(reader)
    writer.close()
    assert mock.stats.started == 0


async def test_header_timeout_is_not_the_keepalive_timeout(
    mock: Mock, start_proxy: StartProxy
) -> None:
    # A short keep-alive does not cut a head still arriving within header_timeout_s...
    proxy = await start_proxy(_upstreams(mock), header_timeout_s=30.0, keepalive_timeout_s=0.2)
    reader, writer = await _connect(proxy)
    raw = _request(proxy)
    for i in range(0, 60, 10):
        writer.write(raw[i : i + 10])
        await asyncio.sleep(0.1)
    writer.write(raw[60:])
    assert (await _response(reader))[0] == 200
    writer.close()
    # ...and a short head deadline does not cut an idle keep-alive connection.
    proxy = await start_proxy(_upstreams(mock), header_timeout_s=0.2, keepalive_timeout_s=30.0)
    reader, writer = await _connect(proxy)
    writer.write(_request(proxy))
    assert (await _response(reader))[0] == 200
    await asyncio.sleep(0.6)
    writer.write(_request(proxy))
    assert (await _response(reader))[0] == 200
    writer.close()


async def test_refused_credentials_close_the_connection(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    status, code = await _refused_with(proxy, _request(proxy, key="zr-wrong"))
    assert (status, code) == (401, "invalid_api_key")


async def test_no_header_value_stays_alive_on_an_idle_keepalive_connection(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), keepalive_timeout_s=60.0)
    marker = ("zrHDR", secrets.token_hex(12))
    reader, writer = await _connect(proxy)
    # In a header the proxy reads but never forwards (the bundled mock, an aiohttp server
    # in this process, would keep what it receives).
    writer.write(_request(proxy, extra=f"Cookie: note={''.join(marker)}\r\n"))
    assert (await _response(reader))[0] == 200
    await asyncio.sleep(0.1)  # the handler has finished; the connection is idle, open
    assert live_holders(marker, collect=False) == []
    # A refused key in the Authorization header: gone with its (closed) connection.
    key_marker = ("zr-", "KEY", secrets.token_hex(12))
    reader2, writer2 = await _connect(proxy)
    writer2.write(_request(proxy, key="".join(key_marker)))
    assert (await _response(reader2))[0] == 401
    assert await _closed(reader2)
    await asyncio.sleep(0.1)
    assert live_holders(key_marker, collect=False) == []
    # The idle connection still works.
    writer.write(_request(proxy))
    assert (await _response(reader))[0] == 200
    writer.close()
    writer2.close()


async def test_a_slow_pipelined_head_waits_for_the_response_before_it(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), header_timeout_s=0.3, keepalive_timeout_s=60.0)
    stream = orjson.dumps(
        {"model": "mock-n10-d100", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    first = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Length: {len(stream)}\r\n\r\n"
    ).encode() + stream
    reader, writer = await _connect(proxy)
    writer.write(first)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half a head
    body = b""
    while True:  # the whole stream (1 s, longer than header_timeout_s), intact
        size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            break
        body += (await reader.readexactly(size + 2))[:-2]
    assert body.endswith(b"data: [DONE]\n\n")
    assert b"408" not in body
    status, _, _ = await _response(reader)  # then the slow head's own deadline
    assert status == 408
    writer.close()
