"""Upstream faults as the official SDKs see them (`max_retries=0`): always an exception,
never a silently short answer; the upstream error counted with its kind; neither the
prompt nor the upstream's broken bytes in what the SDK raises.

Before the first byte the SDK gets an HTTP error status. After it (the stream has
begun), the proxy sends the dialect's error event and closes without the last chunk: the
SDK raises on the event (`openai.APIError`, `anthropic.APIStatusError`).
"""

from __future__ import annotations

import asyncio
import ssl

import anthropic
import openai
import pytest
import trustme

from tests.conftest import RunningProxy, StartProxy, metric
from tests.fakes import closed_port
from tests.rawupstream import RawUpstream, Script, Step, chunked
from zrproxy.errors import UpstreamFailedMidStream, UpstreamTimeout, UpstreamUnavailable

PROMPT = "zz-client-prompt-19c2"
MARK = b"zz-upstream-bytes-7f3a"  # only the broken part of the upstream's answer has it
MAX_EVENT = 4096

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _openai_chunk(text: bytes, finish: bytes = b"null") -> bytes:
    return (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"%b"},"finish_reason":%b}]}\n\n' % (text, finish)
    )


OPENAI_FIRST = _openai_chunk(b"hello")
OPENAI_END = _openai_chunk(b"", b'"stop"') + b"data: [DONE]\n\n"

ANTHROPIC_FIRST = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
    b'"type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,'
    b'"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hello"}}\n\n'
)
ANTHROPIC_END = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
    b'"stop_sequence":null},"usage":{"output_tokens":1}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
FIRST = {"openai": OPENAI_FIRST, "anthropic": ANTHROPIC_FIRST}
CUT = {  # an event cut short inside its data
    "openai": b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"' + MARK,
    "anthropic": b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"' + MARK,
}
WHOLE_LINES = {  # an event whose lines are whole, without the blank line that ends it
    "openai": _openai_chunk(MARK)[:-1],
    "anthropic": CUT["anthropic"] + b'"}}\n',
}
END = {"openai": OPENAI_END, "anthropic": ANTHROPIC_END}

# What breaks an event stream, each sent after the first event has reached the SDK.
# The SDKs' own decoders would skip the first and the third silently.
BROKEN_SSE: dict[str, bytes] = {
    "garbage_line": b"<html>" + MARK + b"</html>\n\n",
    "data_not_json": b"data: " + MARK + b"\n\n",
    "event_without_data": b"event: content_block_delta\nid: " + MARK + b"\n\n",
    "oversize_event": b'data: {"pad":"' + MARK * (MAX_EVENT // len(MARK)) + b'"}\n\n',
}


async def _stream(
    sdk: str, proxy: RunningProxy, got_first: asyncio.Event | None = None
) -> tuple[list[str], BaseException | None]:
    """Stream one chat through `sdk`; the texts it yielded and what it raised."""
    texts: list[str] = []
    messages = [{"role": "user", "content": PROMPT}]
    try:
        if sdk == "openai":
            async with openai.AsyncOpenAI(
                base_url=proxy.url + "/v1", api_key=proxy.key, max_retries=0
            ) as client:
                stream = await client.chat.completions.create(
                    model="m",
                    messages=messages,  # type: ignore[arg-type]
                    stream=True,
                )
                async for chunk in stream:
                    texts.extend(c.delta.content for c in chunk.choices if c.delta.content)
                    if texts and got_first is not None:
                        got_first.set()
        else:
            async with anthropic.AsyncAnthropic(
                base_url=proxy.url, api_key=proxy.key, max_retries=0
            ) as aclient:
                astream = await aclient.messages.create(
                    model="m",
                    max_tokens=8,
                    messages=messages,  # type: ignore[arg-type]
                    stream=True,
                )
                async for event in astream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        texts.append(event.delta.text)
                        if got_first is not None:
                            got_first.set()
    except Exception as exc:
        return texts, exc
    return texts, None


def _echoes_nothing(exc: BaseException) -> None:
    seen = f"{exc!s} {exc!r} {getattr(exc, 'body', None)!r}"
    assert PROMPT not in seen
    assert MARK.decode() not in seen


async def _errors(proxy: RunningProxy, kind: str) -> float:
    return await metric(proxy, "zrproxy_upstream_errors_total", upstream="raw", kind=kind)


async def _run(
    start_proxy: StartProxy, sdk: str, script: Script, **server: object
) -> tuple[RunningProxy, RawUpstream, list[str], BaseException | None]:
    upstream = await RawUpstream(script).start()
    try:
        proxy = await start_proxy(
            [{"name": "raw", "kind": sdk, "base_url": upstream.url}], **server
        )
        texts, exc = await _stream(sdk, proxy)
    finally:
        await upstream.stop()
    return proxy, upstream, texts, exc


async def _after_first(
    start_proxy: StartProxy, sdk: str, rest: list[Step], **server: object
) -> tuple[RunningProxy, list[str], BaseException | None]:
    """Stream through `sdk` from an upstream that sends the first event, waits until the
    SDK has yielded it, then plays `rest`."""
    got_first = asyncio.Event()
    steps: list[Step] = [SSE_HEAD + chunked(FIRST[sdk])[:-5], got_first, *rest]
    upstream = await RawUpstream(lambda i, h: steps).start()
    try:
        proxy = await start_proxy(
            [{"name": "raw", "kind": sdk, "base_url": upstream.url}], **server
        )
        texts, exc = await _stream(sdk, proxy, got_first)
    finally:
        await upstream.stop()
    return proxy, texts, exc


# --- after the first byte -----------------------------------------------------------------


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", sorted(BROKEN_SSE))
async def test_a_broken_event_stream_raises_in_the_sdk(
    start_proxy: StartProxy, sdk: str, fault: str
) -> None:
    rest: list[Step] = [
        b"%x\r\n%b\r\n" % (len(BROKEN_SSE[fault]), BROKEN_SSE[fault]),
        b"%x\r\n%b\r\n" % (len(END[sdk]), END[sdk]),  # as if the stream went on well
        b"0\r\n\r\n",
        "hold",
    ]
    proxy, texts, exc = await _after_first(start_proxy, sdk, rest, max_event_bytes=MAX_EVENT)
    assert texts == ["hello"]  # the events before the fault, and nothing after it
    assert isinstance(exc, openai.APIError if sdk == "openai" else anthropic.APIStatusError)
    assert UpstreamFailedMidStream.message in str(exc)
    _echoes_nothing(exc)
    assert await _errors(proxy, "protocol") == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_an_event_under_max_event_bytes_passes(start_proxy: StartProxy, sdk: str) -> None:
    # The oversize event's own size, with a bound just above it: served whole. So the
    # failure above is the bound, not the event's content.
    pad = b"x" * (MAX_EVENT - 200)
    big = (
        _openai_chunk(pad)
        if sdk == "openai"
        else b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"%b"}}\n\n' % pad
    )
    body = FIRST[sdk] + big + END[sdk]
    proxy, _, texts, exc = await _run(
        start_proxy, sdk, lambda i, h: [SSE_HEAD + chunked(body)], max_event_bytes=MAX_EVENT
    )
    assert exc is None
    assert texts == ["hello", pad.decode()]
    assert await _errors(proxy, "protocol") == 0


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("where", ["inside-a-line", "before-the-blank-line"])
async def test_a_stream_that_ends_inside_an_event_raises(
    start_proxy: StartProxy, sdk: str, where: str
) -> None:
    # The upstream ends its body properly (the last chunk) but in the middle of an event,
    # which the SDKs would drop without a word. That event's start has reached the SDK;
    # the blank line before our error event ends it alone, so the SDK never reads the two
    # as one (Anthropic's SDK would put such a mix, with the upstream's text, in its
    # message). Cut inside a line, the SDK fails on the broken event (a JSON error);
    # with the event's lines whole, it takes the event, then raises on ours.
    cut = CUT[sdk] if where == "inside-a-line" else WHOLE_LINES[sdk]
    proxy, texts, exc = await _after_first(start_proxy, sdk, [chunked(cut), "hold"])
    assert exc is not None
    _echoes_nothing(exc)
    if where == "before-the-blank-line":
        assert texts == ["hello", MARK.decode()]
        assert isinstance(exc, openai.APIError if sdk == "openai" else anthropic.APIStatusError)
        assert UpstreamFailedMidStream.message in str(exc)
    else:
        assert texts == ["hello"]
    assert await _errors(proxy, "protocol") == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_stream_that_stops_between_events_raises(start_proxy: StartProxy, sdk: str) -> None:
    # The upstream ends its body properly, at an event's end, before the API's last event
    # (`[DONE]`, `message_stop`): the SDKs would end the answer there as if it were
    # whole. The proxy makes it the upstream's protocol error, after the events it sent.
    last = _openai_chunk(MARK) if sdk == "openai" else CUT["anthropic"] + b'"}}\n\n'
    proxy, texts, exc = await _after_first(start_proxy, sdk, [chunked(last), "hold"])
    assert texts == ["hello", MARK.decode()]
    assert isinstance(exc, openai.APIError if sdk == "openai" else anthropic.APIStatusError)
    assert UpstreamFailedMidStream.message in str(exc)
    _echoes_nothing(exc)
    assert await _errors(proxy, "protocol") == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", ["reset", "stall"])
async def test_an_upstream_failing_mid_stream_raises_in_the_sdk(
    start_proxy: StartProxy, sdk: str, fault: str
) -> None:
    rest: list[Step] = ["reset" if fault == "reset" else "hold"]
    proxy, texts, exc = await _after_first(start_proxy, sdk, rest, idle_timeout_s=0.5)
    assert texts == ["hello"]
    assert isinstance(exc, openai.APIError if sdk == "openai" else anthropic.APIStatusError)
    expected = UpstreamFailedMidStream if fault == "reset" else UpstreamTimeout
    assert expected.message in str(exc)
    _echoes_nothing(exc)
    assert await _errors(proxy, "reset" if fault == "reset" else "timeout") == 1


# --- before the first byte ----------------------------------------------------------------

_NO_RESPONSE: dict[str, tuple[list[Step], str, int]] = {
    # fault: (script, kind counted, status the SDK gets)
    "reset_before_headers": (["reset"], "reset", 502),
    "stall_before_headers": (["hold"], "timeout", 504),
    "broken_first_event": ([SSE_HEAD + chunked(b"data: " + MARK + b"\n\n")], "protocol", 502),
}


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", sorted(_NO_RESPONSE))
async def test_a_fault_before_the_first_byte_is_an_error_status_in_the_sdk(
    start_proxy: StartProxy, sdk: str, fault: str
) -> None:
    steps, kind, status = _NO_RESPONSE[fault]
    proxy, upstream, _, exc = await _run(
        start_proxy, sdk, lambda i, h: steps, first_byte_timeout_s=0.5
    )
    assert isinstance(exc, openai.APIStatusError | anthropic.APIStatusError)
    assert exc.status_code == status
    expected = UpstreamTimeout if status == 504 else UpstreamUnavailable
    assert expected.message in str(exc)
    _echoes_nothing(exc)
    assert await _errors(proxy, kind) == 1
    assert len(upstream.requests) == 1  # sent once: never resent on the same upstream


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_a_refused_connection_is_502_in_the_sdk(start_proxy: StartProxy, sdk: str) -> None:
    proxy = await start_proxy(
        [{"name": "raw", "kind": sdk, "base_url": f"http://127.0.0.1:{closed_port()}/v1"}]
    )
    _, exc = await _stream(sdk, proxy)
    assert isinstance(exc, openai.InternalServerError | anthropic.InternalServerError)
    assert exc.status_code == 502
    _echoes_nothing(exc)
    assert await _errors(proxy, "connect") == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [429, 503])
async def test_the_upstreams_429_and_5xx_reach_the_sdk_typed(
    start_proxy: StartProxy, sdk: str, status: int
) -> None:
    body = b'{"error":{"message":"busy","type":"server_error"}}'
    head = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nRetry-After: 7\r\n" % status
    answer = head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    proxy, upstream, _, exc = await _run(start_proxy, sdk, lambda i, h: [answer])
    if status == 429:
        assert isinstance(exc, openai.RateLimitError | anthropic.RateLimitError)
        assert exc.response.headers["retry-after"] == "7"  # the client knows when to retry
    else:
        assert isinstance(exc, openai.InternalServerError | anthropic.InternalServerError)
    assert exc.status_code == status
    _echoes_nothing(exc)
    assert await _errors(proxy, "status_429" if status == 429 else "status_5xx") == 1
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_an_untrusted_upstream_certificate_is_502_in_the_sdk(
    start_proxy: StartProxy, sdk: str
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(server)  # a CA the proxy lacks
    upstream = await RawUpstream(
        lambda i, h: [SSE_HEAD + chunked(FIRST[sdk] + END[sdk])], tls=server
    ).start()
    try:
        proxy = await start_proxy([{"name": "raw", "kind": sdk, "base_url": upstream.url}])
        _, exc = await _stream(sdk, proxy)
    finally:
        await upstream.stop()
    assert isinstance(exc, openai.InternalServerError | anthropic.InternalServerError)
    assert exc.status_code == 502
    _echoes_nothing(exc)
    assert await _errors(proxy, "tls") == 1
    assert upstream.requests == []  # nothing sent over a connection we could not verify
