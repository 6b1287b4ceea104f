"""Response-side framing corpus: every ambiguous or broken upstream reply closes the
upstream connection and ends the client's response as failed, and the next request
never sees a byte of it.

Each case is exact bytes from a raw upstream (tests/rawupstream.py) for request A; the
upstream then answers request B properly. A framing bug would show as B's answer
carrying A's leftovers ("EVIL"), or as A's broken answer passing for a whole one.
"""

from __future__ import annotations

import asyncio
import io

import aiohttp
import orjson
import pytest

from tests.conftest import RunningProxy, StartProxy, metric
from tests.rawupstream import RawUpstream, Step, chunked, json_response

A_BODY = b'{"id":"A","marker":"AAAA"}'
B_BODY = b'{"id":"B","marker":"BBBB"}'
EVIL = json_response(b'{"id":"EVIL"}')
_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
_CHUNKED = _JSON + b"Transfer-Encoding: chunked\r\n\r\n"

# name -> the steps answering request A. Each one is refused (see zrproxy/http1.py).
BROKEN: dict[str, list[Step]] = {
    "content-length and transfer-encoding": [
        _JSON + b"Content-Length: 26\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(A_BODY)
    ],
    "duplicate content-length, same value": [
        _JSON + b"Content-Length: 26\r\nContent-Length: 26\r\n\r\n" + A_BODY
    ],
    "duplicate content-length, other value": [
        _JSON + b"Content-Length: 26\r\nContent-Length: 13\r\n\r\n" + A_BODY
    ],
    "content-length list": [_JSON + b"Content-Length: 26, 26\r\n\r\n" + A_BODY],
    "negative content-length": [_JSON + b"Content-Length: -26\r\n\r\n" + A_BODY],
    "content-length not a number": [_JSON + b"Content-Length: 2a\r\n\r\n" + A_BODY],
    "chunk size 0x": [_CHUNKED + b"0x1a\r\n" + A_BODY + b"\r\n0\r\n\r\n"],
    "chunk size with a space": [_CHUNKED + b"1a \r\n" + A_BODY + b"\r\n0\r\n\r\n"],
    "chunk size with a sign": [_CHUNKED + b"+1a\r\n" + A_BODY + b"\r\n0\r\n\r\n"],
    "chunk size too short": [_CHUNKED + b"10\r\n" + A_BODY + b"\r\n0\r\n\r\n"],
    "chunk size bare LF": [_CHUNKED + b"1a\n" + A_BODY + b"\r\n0\r\n\r\n"],
    "chunk overflow": [_CHUNKED + b"fffffffffffffffffff\r\n" + A_BODY],
    "transfer-encoding gzip, chunked": [
        _JSON + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked(A_BODY)
    ],
    "transfer-encoding twice": [
        _JSON
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(A_BODY)
    ],
    "transfer-encoding identity": [_JSON + b"Transfer-Encoding: identity\r\n\r\n" + A_BODY],
    "a second response after the end": [json_response(A_BODY) + EVIL],
    "a second response after the last chunk": [_CHUNKED + chunked(A_BODY) + EVIL],
    "CRLF after the end": [json_response(A_BODY) + b"\r\n"],
    "CRLF after the last chunk": [_CHUNKED + chunked(A_BODY) + b"\r\n"],
    "body bytes on a 204": [b"HTTP/1.1 204 No Content\r\nContent-Length: 26\r\n\r\n" + A_BODY],
    "close-delimited HTTP/1.0 body": [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + A_BODY,
        "close",
    ],
    "close-delimited HTTP/1.1 body": [_JSON + b"\r\n" + A_BODY, "close"],
    "reset mid-chunk": [_CHUNKED + b"1a\r\n" + A_BODY[:10], 0.05, "reset"],
    "EOF mid-chunk": [_CHUNKED + b"1a\r\n" + A_BODY[:10], 0.05, "close"],
    "EOF mid content-length body": [json_response(A_BODY)[:-5], 0.05, "close"],
    "reset before the head": ["reset"],
    "101 switching protocols": [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n" + A_BODY
    ],
    "bare LF in the head": [
        b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 26\n\n" + A_BODY
    ],
    "obs-fold in the head": [_JSON + b"X-A: 1\r\n 2\r\nContent-Length: 26\r\n\r\n" + A_BODY],
    "a head over the limit": [_JSON + b"X-Big: " + b"x" * 70_000 + b"\r\n"],
}


def _script(first: list[Step]) -> RawUpstream:
    def script(index: int, _head: bytes) -> list[Step]:
        return first if index == 0 else [json_response(B_BODY)]

    return RawUpstream(script)


async def _post(client: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[int, bytes | None]:
    """(status, body), body None when the response was cut before its end."""
    async with client.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers=proxy.auth(),
        allow_redirects=False,
    ) as resp:
        try:
            return resp.status, await resp.read()
        except aiohttp.ClientPayloadError:
            return resp.status, None


async def _exchange_pair(
    start_proxy: StartProxy, upstream: RawUpstream, pause_s: float = 0.0
) -> tuple[RunningProxy, tuple[int, bytes | None], tuple[int, bytes | None]]:
    await upstream.start()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": "openai", "base_url": upstream.url}])
        async with aiohttp.ClientSession() as client:
            first = await _post(client, proxy)
        await asyncio.sleep(pause_s)
        async with aiohttp.ClientSession() as client:
            second = await _post(client, proxy)
    finally:
        await upstream.stop()
    return proxy, first, second


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_framing_closes_and_fails(case: str, start_proxy: StartProxy) -> None:
    upstream = _script(BROKEN[case])
    proxy, first, second = await _exchange_pair(start_proxy, upstream)
    status, body = first
    assert status == 502 or body is None, (status, body)  # failed, never passed as whole
    assert second == (200, B_BODY)  # B's own bytes, nothing of A's answer
    assert len(upstream.requests) == 2
    assert upstream.requests[1][0] != upstream.requests[0][0]  # A's connection was closed
    kind = "reset" if "reset" in case or "EOF" in case else "protocol"
    assert await metric(proxy, "zrproxy_upstream_errors_total", upstream="raw", kind=kind) >= 1


# Bytes that arrive after A's answer was complete, while the connection sits idle: A was
# whole and is relayed as such; the connection is closed, never handed to B. (Bytes
# that arrive late on a connection already carrying B's request can't be told from B's
# answer, in any HTTP/1.1 client; B is sent after they arrived.)
LATE: dict[str, list[Step]] = {
    "CRLF after the end, in its own write": [json_response(A_BODY), 0.1, b"\r\n", 0.1],
    "a second response after the end, in its own write": [json_response(A_BODY), 0.1, EVIL, 0.1],
    "body bytes after a 204, in their own write": [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        0.1,
        A_BODY,
        0.1,
    ],
}


@pytest.mark.parametrize("case", sorted(LATE))
async def test_bytes_on_an_idle_connection_close_it(case: str, start_proxy: StartProxy) -> None:
    upstream = _script(LATE[case])
    _, first, second = await _exchange_pair(start_proxy, upstream, pause_s=0.3)
    assert first[0] in (200, 204)
    assert second == (200, B_BODY)
    assert upstream.requests[1][0] != upstream.requests[0][0]


VALID: dict[str, list[Step]] = {
    "content-length": [json_response(A_BODY)],
    "content-length, body ending in CRLF": [json_response(A_BODY + b"\r\n\r\n")],
    "content-length, body all CRLF": [json_response(b"\r\n" * 8)],
    "chunked": [_CHUNKED + chunked(A_BODY[:5], A_BODY[5:])],
    "chunked with trailers": [_CHUNKED + chunked(A_BODY, trailers=b"X-T: 1\r\n")],
    "chunked with an extension": [_CHUNKED + b"1a;x=y\r\n" + A_BODY + b"\r\n0\r\n\r\n"],
    "chunked, split in every write": [
        step for byte in (_CHUNKED + chunked(A_BODY)) for step in (bytes([byte]), 0.0)
    ],
}
# Valid, relayed whole, but the connection is not reused (see zrproxy/http1.py).
VALID_NOT_REUSED: dict[str, list[Step]] = {
    "100 then 200": [b"HTTP/1.1 100 Continue\r\n\r\n" + json_response(A_BODY)],
    "103 then 200, in two writes": [
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
        0.02,
        json_response(A_BODY),
    ],
    "connection: close": [json_response(A_BODY, b"Connection: close\r\n")],
    "HTTP/1.0 with content-length": [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 26\r\n\r\n" + A_BODY
    ],
}


def _body_for(case: str) -> bytes:
    if "all CRLF" in case:
        return b"\r\n" * 8
    if "ending in CRLF" in case:
        return A_BODY + b"\r\n\r\n"
    return A_BODY


@pytest.mark.parametrize("case", sorted(VALID))
async def test_valid_framing_is_relayed_and_reused(case: str, start_proxy: StartProxy) -> None:
    upstream = _script(VALID[case])
    _, first, second = await _exchange_pair(start_proxy, upstream)
    assert first == (200, _body_for(case))
    assert second == (200, B_BODY)
    assert upstream.requests[1][0] == upstream.requests[0][0]  # the control: reuse is seen


@pytest.mark.parametrize("case", sorted(VALID_NOT_REUSED))
async def test_valid_but_not_reusable(case: str, start_proxy: StartProxy) -> None:
    upstream = _script(VALID_NOT_REUSED[case])
    _, first, second = await _exchange_pair(start_proxy, upstream)
    assert first == (200, A_BODY)
    assert second == (200, B_BODY)
    assert upstream.requests[1][0] != upstream.requests[0][0]


async def test_an_answer_before_the_request_was_sent_is_refused(start_proxy: StartProxy) -> None:
    """The upstream answers after reading only the head of a large body: whatever it
    answers, it did not read our request, so the answer is not relayed as its answer."""

    def script(index: int, _head: bytes) -> list[Step]:
        if index == 0:
            return ["read-head-only", json_response(A_BODY), "hold"]
        return [json_response(B_BODY)]

    upstream = await RawUpstream(script, rcvbuf=4096).start()
    try:
        proxy = await start_proxy(
            [{"name": "raw", "kind": "openai", "base_url": upstream.url}],
            max_body_bytes=64 * 1024 * 1024,
        )
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 8_000_000}]}
        headers = {**proxy.auth(), "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as client:
            async with client.post(
                proxy.url + "/v1/chat/completions",
                data=io.BytesIO(orjson.dumps(big)),
                headers=headers,
            ) as resp:
                status = resp.status
                body = await resp.read()
        assert status == 502, body
        kinds = await metric(
            proxy, "zrproxy_upstream_errors_total", upstream="raw", kind="protocol"
        )
        assert kinds == 1
    finally:
        await upstream.stop()


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (b"HTTP/1.1 301 Moved\r\nLocation: http://elsewhere/\r\nContent-Length: 2\r\n\r\nno",
         502, b"upstream_redirect"),
        (b"HTTP/1.1 307 Temporary\r\nLocation: /v1/other\r\nContent-Length: 0\r\n\r\n",
         502, b"upstream_redirect"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        (b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n", 304, b""),
    ],
)  # fmt: skip
async def test_redirects_are_refused_never_followed_and_bodiless_answers_end_at_the_head(
    answer: bytes, status: int, body: bytes, start_proxy: StartProxy
) -> None:
    # A redirect is answered 502 upstream_redirect (its Location is no subprocessor of
    # ours); 204 and 304 are relayed and end at their head.
    upstream = _script([answer])
    _, first, second = await _exchange_pair(start_proxy, upstream)
    assert first[0] == status and (body in first[1] if status == 502 else first[1] == body)
    assert second == (200, B_BODY)
    assert len(upstream.requests) == 2  # the Location was not requested
    assert upstream.requests[1][0] == upstream.requests[0][0]  # and the connection reused
