"""Our HTTP/1.1 server (zrproxy/server.py) on raw sockets: pipelined requests answered
in order, HTTP/1.0 and 1.1 keep-alive and close, HEAD without a body, no Server field,
100-continue only after the checks, a client that leaves cancels its upstream request,
a refused body read no further, and compressed bodies decoded within the body limit."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
import pytest

from tests.conftest import Mock, RunningProxy, StartProxy, metric

CHAT = "/v1/chat/completions"


def _upstreams(mock: Mock) -> list[dict[str, Any]]:
    return [{"name": "mock", "kind": "openai", "base_url": mock.url}]


def _chat(
    proxy: RunningProxy, model: str = "mock", *, version: str = "1.1", extra: str = ""
) -> bytes:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return (
        f"POST {CHAT} HTTP/{version}\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connect(proxy: RunningProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = proxy.service.api_address
    assert address is not None
    return await asyncio.open_connection(address.host, address.port)


async def _response(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> tuple[bytes, dict[str, str], bytes]:
    """(status line, fields with lower-cased names, body) of one Content-Length response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:-2])}
    body = b""
    if not head_only:
        body = await asyncio.wait_for(reader.readexactly(int(fields["content-length"])), 30)
    return lines[0].encode(), fields, body


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 30) == b""
    except ConnectionError:
        return True


async def test_pipelined_requests_are_answered_in_order(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    reader, writer = await _connect(proxy)
    # A slow one first: the quick ones behind it must wait for it, not overtake it.
    models = ["mock-f300", "mock", "mock-e400", "mock"]
    writer.write(b"".join(_chat(proxy, m) for m in models))
    statuses = []
    for _ in models:
        line, fields, _body = await _response(reader)
        statuses.append(int(line.split()[1]))
        assert "x-request-id" in fields
    assert statuses == [200, 200, 400, 200]
    # ...and the connection still serves what comes next.
    writer.write(_chat(proxy))
    assert (await _response(reader))[0].startswith(b"HTTP/1.1 200")
    writer.close()


async def test_no_server_field_and_a_date(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock))
    reader, writer = await _connect(proxy)
    writer.write(_chat(proxy))
    line, fields, _ = await _response(reader)
    writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    line404, fields404, _ = await _response(reader)
    writer.close()
    assert line.startswith(b"HTTP/1.1 200") and line404.startswith(b"HTTP/1.1 404")
    for f in (fields, fields404):
        assert "server" not in f
        assert f["date"].endswith(" GMT")


async def test_http10_closes_unless_asked_to_keep_alive(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    reader, writer = await _connect(proxy)
    writer.write(_chat(proxy, version="1.0"))
    line, fields, _ = await _response(reader)
    assert line.startswith(b"HTTP/1.0 200")
    assert fields["connection"].lower() == "close"
    assert await _closed(reader)
    writer.close()

    reader, writer = await _connect(proxy)
    writer.write(_chat(proxy, version="1.0", extra="Connection: keep-alive\r\n"))
    line, fields, _ = await _response(reader)
    assert fields["connection"].lower() == "keep-alive"
    writer.write(_chat(proxy, version="1.0", extra="Connection: keep-alive\r\n"))
    assert (await _response(reader))[0].startswith(b"HTTP/1.0 200")
    writer.close()


async def test_http11_connection_close_is_honoured(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock))
    reader, writer = await _connect(proxy)
    writer.write(_chat(proxy, extra="Connection: close\r\n"))
    _, fields, _ = await _response(reader)
    assert fields["connection"].lower() == "close"
    assert await _closed(reader)
    writer.close()


async def test_a_stream_to_an_http10_client_ends_with_the_connection(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    body = orjson.dumps(
        {"model": "mock-n3", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    reader, writer = await _connect(proxy)
    writer.write(
        (
            f"POST {CHAT} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    raw = await asyncio.wait_for(reader.read(), 30)  # until the proxy closes
    writer.close()
    head, _, events = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    assert events.endswith(b"data: [DONE]\n\n")  # not chunk-framed


async def test_head_answers_without_a_body(mock: Mock, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(_upstreams(mock))
    reader, writer = await _connect(proxy)
    auth = f"Authorization: Bearer {proxy.key}\r\n"
    writer.write(f"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    line, fields, _ = await _response(reader, head_only=True)
    assert line.startswith(b"HTTP/1.1 200") and int(fields["content-length"]) > 0
    # The next response starts right after the head: no body came in between.
    writer.write(f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    line, _fields2, body = await _response(reader)
    assert line.startswith(b"HTTP/1.1 200") and len(body) == int(fields["content-length"])
    writer.close()


async def test_100_continue_only_after_the_key_is_checked(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    body = _chat(proxy).partition(b"\r\n\r\n")[2]
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    # A refused key: the final answer, never an invitation to send the body.
    reader, writer = await _connect(proxy)
    writer.write((head + "Authorization: Bearer zr-wrong\r\n\r\n").encode())
    line, _, _ = await _response(reader)
    assert line.startswith(b"HTTP/1.1 401")
    writer.close()
    # A good key: 100 Continue, then, once the body is sent, the answer.
    reader, writer = await _connect(proxy)
    writer.write((head + f"Authorization: Bearer {proxy.key}\r\n\r\n").encode())
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    assert (await _response(reader))[0].startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_client_that_leaves_cancels_its_upstream_request(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    _reader, writer = await _connect(proxy)
    writer.write(_chat(proxy, "mock-hang"))  # the mock never answers this one
    while mock.stats.started < 1:
        await asyncio.sleep(0.02)
    writer.close()
    for _ in range(500):
        if mock.stats.disconnected >= 1:
            break
        await asyncio.sleep(0.02)
    assert mock.stats.disconnected == 1
    assert await metric(proxy, "zrproxy_client_aborts_total") == 1


async def test_a_refused_body_is_not_read_as_a_next_request(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), max_body_bytes=1000)
    reader, writer = await _connect(proxy)
    # The body declared too large is refused before it is read; its bytes (a request
    # of their own, were they parsed as one) must never reach the upstream.
    smuggled = _chat(proxy)
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Length: 5000\r\n\r\n".encode()
        + smuggled
        + b" " * (5000 - len(smuggled))
    )
    line, fields, _ = await _response(reader)
    assert line.startswith(b"HTTP/1.1 413")
    assert fields["connection"].lower() == "close"
    assert await _closed(reader)
    writer.close()
    assert mock.stats.started == 0


async def _post_encoded(proxy: RunningProxy, body: bytes, encoding: str) -> bytes:
    reader, writer = await _connect(proxy)
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    line, _, payload = await _response(reader)
    writer.close()
    return line.split()[1] + b" " + orjson.loads(payload)["error"]["code"].encode()


async def test_a_compressed_body_is_bounded_by_max_body_bytes_once_decoded(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), max_body_bytes=100_000)
    bomb = gzip.compress(b" " * 20_000_000)  # ~20 KB that inflate to 20 MB
    assert len(bomb) < 100_000
    assert await _post_encoded(proxy, bomb, "gzip") == b"413 request_too_large"
    assert mock.stats.started == 0


async def test_broken_or_unknown_content_encodings_are_400(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    body = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
    whole = gzip.compress(body)
    assert await _post_encoded(proxy, whole[:-8], "gzip") == b"400 invalid_request"  # cut
    assert await _post_encoded(proxy, body, "gzip") == b"400 invalid_request"  # not gzip
    assert await _post_encoded(proxy, whole, "br") == b"400 invalid_request"  # not decoded
    assert await _post_encoded(proxy, whole + b"x", "gzip") == b"400 invalid_request"
    assert mock.stats.started == 0
    reader, writer = await _connect(proxy)  # and a good one is served
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(whole)}\r\n\r\n".encode()
        + whole
    )
    assert (await _response(reader))[0].startswith(b"HTTP/1.1 200")
    writer.close()


async def test_an_idle_keepalive_connection_closes_after_keepalive_timeout(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock), keepalive_timeout_s=2.0, header_timeout_s=60.0)
    # Requests 0.5 s apart for longer than the timeout: each idle gap is short, so the
    # connection stays (its timer measures from the last response, not the first).
    reader, writer = await _connect(proxy)
    for _ in range(6):
        writer.write(_chat(proxy))
        assert (await _response(reader))[0].startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.5)
    # Then idle: closed by the proxy, without a response.
    assert await _closed(reader)
    writer.close()


async def test_a_request_target_is_matched_as_sent(mock: Mock, start_proxy: StartProxy) -> None:
    # No percent-decoding before routing: what is not exactly an endpoint's path is not
    # that endpoint (aiohttp decoded `%63hat` to `chat` first).
    proxy = await start_proxy(_upstreams(mock))
    for target in ("/v1/%63hat/completions", "http://x/v1/chat/completions"):
        reader, writer = await _connect(proxy)
        writer.write(_chat(proxy).replace(CHAT.encode(), target.encode(), 1))
        line, _, body = await _response(reader)
        writer.close()
        assert line.startswith(b"HTTP/1.1 404"), target
        assert orjson.loads(body)["error"]["code"] == "unknown_path"
    assert mock.stats.started == 0


async def test_upgrade_and_connect_requests_are_refused(
    mock: Mock, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    upgrade = _chat(proxy, extra="Connection: Upgrade\r\nUpgrade: h2c\r\n")
    connect = f"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nAuthorization: Bearer {proxy.key}\r\n\r\n"
    for raw in (upgrade, connect.encode()):
        reader, writer = await _connect(proxy)
        writer.write(raw + _chat(proxy))  # and a request behind it, never read
        line, _, body = await _response(reader)
        assert line.startswith(b"HTTP/1.1 400")
        assert orjson.loads(body)["error"]["code"] == "bad_http_request"
        assert await _closed(reader)
        writer.close()
    assert mock.stats.started == 0


@pytest.mark.parametrize(
    ("codings", "status"),
    [
        (["gzip, chunked"], 501),  # a coding we do not decode: RFC 9112 6.1
        (["deflate", "chunked"], 501),  # the same list in two fields
        (["chunked;ext=1"], 501),  # chunked with a parameter
        (["chunked, gzip"], 400),  # chunked not last: RFC 9112 6.3
        (["chunked", "chunked"], 400),  # chunked twice
        (["gzip"], 400),  # no chunked at all: no framing
        (["chunked,"], 400),  # an empty element: no list of codings
        (["gzip, chunked", "Content-Length: 5"], 400),  # both framings
    ],
)
async def test_transfer_codings_but_plain_chunked_are_refused(
    mock: Mock, start_proxy: StartProxy, codings: list[str], status: int
) -> None:
    proxy = await start_proxy(_upstreams(mock))
    fields = "".join(
        f"{c}\r\n" if c.startswith("Content-Length") else f"Transfer-Encoding: {c}\r\n"
        for c in codings
    )
    reader, writer = await _connect(proxy)
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.key}\r\n"
        f"Content-Type: application/json\r\n{fields}\r\n5\r\nhello\r\n0\r\n\r\n".encode()
    )
    line, _fields, body = await _response(reader)
    assert int(line.split()[1]) == status
    code = "unsupported_transfer_coding" if status == 501 else "bad_http_request"
    assert orjson.loads(body)["error"]["code"] == code
    assert b"hello" not in body and b"gzip" not in body
    assert await _closed(reader)
    writer.close()
    assert mock.stats.started == 0
