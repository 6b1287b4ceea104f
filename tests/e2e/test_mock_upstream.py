"""Tests for zrproxy.mock_upstream: wire formats (checked by the official SDKs), the model-string
grammar, failure modes, stats, and that the mock itself keeps no prompt or completion content."""

from __future__ import annotations

import ast
import asyncio
import gc
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from tests.processes import LoggedProcess
from zrproxy import mock_upstream, mock_wire
from zrproxy.mock_upstream import (
    MOCK_STATS,
    MockBehaviour,
    MockStats,
    RequestRecord,
    main,
    start_mock,
)

REPO = Path(__file__).resolve().parents[2]
USER = "the quick brown fox"
# A conversation whose last user turn is USER: the echo must come from that turn only.
HISTORY = [
    {"role": "user", "content": "an earlier turn"},
    {"role": "assistant", "content": "a reply"},
    {"role": "user", "content": USER},
]


@dataclass
class Mock:
    runner: web.AppRunner
    url: str  # http://127.0.0.1:PORT/v1

    @property
    def stats(self) -> MockStats:
        return self.runner.app[MOCK_STATS]

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    async def ended(self, request_id: str, timeout_s: float = 10.0) -> RequestRecord:
        """The record once the mock has decided how the request ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.stats.requests.get(request_id)
            if record is not None and record.end is not None:
                return record
            await asyncio.sleep(0.01)
        raise AssertionError(
            f"request {request_id} never ended: {self.stats.requests.get(request_id)}"
        )


@pytest.fixture(autouse=True)
def quiet_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Failure modes are part of the mock's job: none of them may log a warning or error."""
    caplog.set_level(logging.DEBUG)
    yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    """Overrides conftest's ``mock`` to expose the runner (its app) and helpers."""
    runner, url = await start_mock()
    try:
        yield Mock(runner, url)
    finally:
        await runner.cleanup()


@pytest.fixture
def http(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    return session  # conftest's client, by the name these tests use


def chat_body(model: str, text: str = USER, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def sse_events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event; asserts the framing is exactly what the APIs send."""
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw[:-2].split(b"\n\n"):
        lines = block.split(b"\n")
        name = None
        if lines[0].startswith(b"event: "):
            name = lines.pop(0)[7:].decode()
        assert len(lines) == 1 and lines[0].startswith(b"data: "), block
        events.append((name, lines[0][6:]))
    return events


def openai_client(mock: Mock) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mock.url, api_key="sk-client", max_retries=0)


def anthropic_client(mock: Mock) -> anthropic.AsyncAnthropic:
    # The Anthropic SDK appends /v1/messages itself.
    return anthropic.AsyncAnthropic(base_url=mock.root, api_key="sk-ant-client", max_retries=0)


# --- the model-string grammar -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("mock", MockBehaviour()),
        ("gpt-4o-mini", MockBehaviour()),
        ("mockery-n3", MockBehaviour()),
        (
            "mock-n3-d5-f7-s100",
            MockBehaviour(chunks=3, delay_ms=5, first_byte_ms=7, chunk_bytes=100),
        ),
        ("mock-n2000-s16384", MockBehaviour(chunks=2000, chunk_bytes=16384)),
        ("vendor-mock-e429", MockBehaviour(error_status=429)),
        ("mock-e500-r3", MockBehaviour(error_status=500, reset_after=3)),
        ("mock-r0", MockBehaviour(reset_after=0)),
        ("mock-hang", MockBehaviour(hang=True)),
        ("mock-hangbody-n4", MockBehaviour(hang_body=True, chunks=4)),
        ("mock-n0", MockBehaviour(chunks=1)),
        ("mock-n5-n7", MockBehaviour(chunks=7)),
        ("mock-e200-e600-x-n-nabc-n-5-n\u0661\u0662-d", MockBehaviour()),
        ("mock-n9999999999", MockBehaviour()),
        ("mock-n999999999-d999999999", MockBehaviour(chunks=1_000_000, delay_ms=600_000)),
    ],
)
def test_parse_examples(model: str, expected: MockBehaviour) -> None:
    assert MockBehaviour.parse(model) == expected


_TOKEN = st.one_of(
    st.tuples(st.sampled_from("ndfsr"), st.integers(0, 10**9 - 1)).map(lambda t: f"{t[0]}{t[1]}"),
    st.integers(0, 999).map(lambda n: f"e{n}"),
    st.sampled_from(["hang", "hangbody", "x", "n", "n1a", "q7", "", "HANG", "N5"]),
)


def _expected(tokens: list[str]) -> MockBehaviour:
    """Reference fold of the grammar, written independently of the parser."""
    fields: dict[str, Any] = {}
    names = {"n": "chunks", "d": "delay_ms", "f": "first_byte_ms", "s": "chunk_bytes"}
    limits = {"n": (1, 10**6), "d": (0, 600_000), "f": (0, 600_000), "s": (0, 1 << 20)}
    for token in tokens:
        match = re.fullmatch(r"([ndfsre])([0-9]+)", token)
        if token in ("hang", "hangbody"):
            fields["hang" if token == "hang" else "hang_body"] = True
        elif match and match[1] == "e":
            if 400 <= int(match[2]) <= 599:
                fields["error_status"] = int(match[2])
        elif match and match[1] == "r":
            fields["reset_after"] = min(int(match[2]), 10**6)
        elif match:
            low, high = limits[match[1]]
            fields[names[match[1]]] = min(max(int(match[2]), low), high)
    return MockBehaviour(**fields)


@given(st.lists(_TOKEN, max_size=8), st.sampled_from(["", "gpt-", "a-b-"]))
def test_parse_matches_reference_fold(tokens: list[str], prefix: str) -> None:
    model = prefix + "-".join(["mock", *tokens])
    assert MockBehaviour.parse(model) == _expected(tokens)


@given(st.text(max_size=60))
def test_parse_never_raises_and_stays_in_bounds(model: str) -> None:
    behaviour = MockBehaviour.parse(model)
    assert behaviour == MockBehaviour.parse(model)
    assert 1 <= behaviour.chunks <= 10**6
    assert 0 <= behaviour.delay_ms <= 600_000 and 0 <= behaviour.first_byte_ms <= 600_000
    assert 0 <= behaviour.chunk_bytes <= 1 << 20
    assert behaviour.error_status is None or 400 <= behaviour.error_status <= 599
    if "mock" not in model.split("-"):
        assert behaviour == MockBehaviour()


# --- OpenAI wire format, via the official SDK and raw -------------------------------------


async def test_openai_sdk_chat(mock: Mock) -> None:
    client = openai_client(mock)
    done = await client.chat.completions.create(
        model="mock-n4",
        messages=[{"role": "system", "content": "sys"}, *HISTORY],
    )
    assert done.choices[0].message.content == USER + " lorem" * 3
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == 4
    assert done.usage.total_tokens == done.usage.prompt_tokens + 4

    parts = [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]
    stream = await client.chat.completions.create(
        model="mock-n3",
        messages=[{"role": "user", "content": parts}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "part one, part two lorem lorem"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])

    async with client.chat.completions.stream(**chat_body("mock-n2")) as helper:
        final = await helper.get_final_completion()
    assert final.choices[0].message.content == USER + " lorem"
    await client.close()


async def test_openai_chat_stream_raw_framing(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = chat_body("mock-n5", stream=True, stream_options={"include_usage": True})
    async with http.post(f"{mock.url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await resp.read()
    events = sse_events(raw)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == b"[DONE]"
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    for (_, data), chunk in zip(events, chunks, strict=False):
        assert orjson.dumps(chunk) == data  # compact JSON, as OpenAI sends it
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * len(chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert contents == [USER] + [" lorem"] * 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] == len(USER + "user") // 4 + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5

    async with http.post(f"{mock.url}/chat/completions", json=chat_body("mock", stream=True)) as r:
        plain = sse_events(await r.read())
    assert all(b'"usage"' not in data for _, data in plain)
    assert len(plain) == 1 + 8 + 1 + 1  # role, default 8 chunks, finish, [DONE]


async def test_openai_non_stream_is_pretty_json(mock: Mock, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{mock.url}/chat/completions", json=chat_body("mock-n1")) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        raw = await resp.read()
    assert b'"object": "chat.completion"' in raw
    assert int(resp.headers["Content-Length"]) == len(raw)
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == USER


async def test_openai_sdk_completions_embeddings_models(mock: Mock) -> None:
    client = openai_client(mock)
    done = await client.completions.create(model="mock-n2", prompt=["first", "legacy prompt"])
    assert done.choices[0].text == "legacy prompt lorem"
    stream = await client.completions.create(
        model="mock-n3", prompt="legacy", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "legacy lorem lorem"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

    floats = await client.embeddings.create(model="mock", input=["a", "b", "c"])
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.data[0].embedding == pytest.approx(list(mock_wire.EMBEDDING))
    encoded = await client.embeddings.create(model="mock", input="a", encoding_format="base64")
    assert isinstance(encoded.data[0].embedding, str)
    tokens = await client.embeddings.create(model="mock", input=[1, 2, 3])
    assert len(tokens.data) == 1 and tokens.usage.prompt_tokens == 1  # no text: 0 // 4 + 1

    models = [m.id async for m in client.models.list()]
    assert "mock" in models
    await client.close()


async def test_openai_sdk_responses(mock: Mock, http: aiohttp.ClientSession) -> None:
    client = openai_client(mock)
    done = await client.responses.create(model="mock-n3", input=USER)
    assert done.output_text == USER + " lorem lorem"
    assert done.usage is not None and done.usage.output_tokens == 3

    items = [{"role": "user", "content": [{"type": "input_text", "text": "streamed input"}]}]
    stream = await client.responses.create(model="mock-n2", input=items, stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["streamed input", " lorem"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.output_tokens == 2

    async with client.responses.stream(model="mock-n2", input="helper") as helper:
        final = await helper.get_final_response()
    assert final.output_text == "helper lorem"
    await client.close()

    async with http.post(
        f"{mock.url}/responses", json={"model": "mock", "input": "x", "stream": True}
    ) as r:
        raw = await r.read()
    for name, data in sse_events(raw):
        assert orjson.loads(data)["type"] == name


# --- Anthropic wire format ----------------------------------------------------------------


async def test_anthropic_sdk_messages(mock: Mock, http: aiohttp.ClientSession) -> None:
    client = anthropic_client(mock)
    done = await client.messages.create(
        model="mock-n3",
        max_tokens=64,
        system="be brief",
        messages=HISTORY,
    )
    assert done.content[0].type == "text" and done.content[0].text == USER + " lorem lorem"
    assert done.stop_reason == "end_turn"
    # input tokens: the prompt strings' characters (66 here) // 4 + 1.
    assert done.usage.output_tokens == 3 and done.usage.input_tokens == 17

    parts = [{"type": "text", "text": "anthropic parts"}]
    async with client.messages.stream(
        model="mock-n4", max_tokens=64, messages=[{"role": "user", "content": parts}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "anthropic parts" + " lorem" * 3
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 6  # 23 // 4 + 1
    await client.close()

    body = chat_body("mock-n2", stream=True, max_tokens=5)
    async with http.post(f"{mock.url}/messages", json=body) as resp:
        names = [name for name, _ in sse_events(await resp.read())]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


# --- errors and failure modes -------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_error_statuses_in_api_format(
    mock: Mock, http: aiohttp.ClientSession, status: int
) -> None:
    async with http.post(f"{mock.url}/chat/completions", json=chat_body(f"mock-e{status}")) as r:
        assert r.status == status
        assert (r.headers.get("Retry-After") == "1") == (status == 429)
        error = (await r.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    async with http.post(f"{mock.url}/messages", json=chat_body(f"mock-e{status}")) as r:
        assert r.status == status
        body = await r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert mock.stats.errored == 2 and mock.stats.completed == 0


async def test_errors_through_the_sdks(mock: Mock) -> None:
    client = openai_client(mock)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(**chat_body("mock-e429"))
    assert limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(**chat_body("mock-e500"), stream=True)
    await client.close()
    aclient = anthropic_client(mock)
    with pytest.raises(anthropic.RateLimitError) as ant:
        await aclient.messages.create(**chat_body("mock-e429"), max_tokens=5)
    assert ant.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": ant.value.body["error"]["message"]},
    }
    await aclient.close()


@pytest.mark.parametrize("path", ["/chat/completions", "/messages", "/embeddings"])
@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'{"model": 5}', b""])
async def test_malformed_body_is_400(
    mock: Mock, http: aiohttp.ClientSession, path: str, data: bytes
) -> None:
    async with http.post(mock.url + path, data=data, headers={"x-request-id": "bad"}) as r:
        assert r.status == 400
        body = await r.json()
    assert body["type"] == "error" if path == "/messages" else "error" in body
    assert (await mock.ended("bad")).end == "error"


async def test_reset_mid_stream_is_a_real_rst(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = chat_body("mock-n10-r3", stream=True)
    with pytest.raises(aiohttp.ClientError):
        async with http.post(
            f"{mock.url}/chat/completions", json=body, headers={"x-request-id": "r3"}
        ) as resp:
            assert resp.status == 200
            await resp.read()
    record = await mock.ended("r3")
    assert record.end == "reset" and mock.stats.reset == 1

    # A raw socket tells an RST (ECONNRESET) from a clean close (EOF).
    reader, writer = await asyncio.open_connection("127.0.0.1", int(mock.root.rsplit(":", 1)[1]))
    payload = orjson.dumps(chat_body("mock-n10-r2", stream=True))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    with pytest.raises(ConnectionResetError):
        while await reader.read(65536):
            pass
    writer.close()


@pytest.mark.parametrize("model", ["mock-r0", "mock-r0-e500", "mock-r5"])
async def test_reset_before_any_byte_or_mid_body(mock: Mock, model: str) -> None:
    client = openai_client(mock)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            **chat_body(model), extra_headers={"x-request-id": model}
        )
    await client.close()
    assert (await mock.ended(model)).end == "reset"


async def test_hang_never_sends_headers(mock: Mock, http: aiohttp.ClientSession) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            f"{mock.url}/chat/completions",
            json=chat_body("mock-hang"),
            headers={"x-request-id": "hang"},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    record = await mock.ended("hang")
    assert record.end == "disconnected" and record.ended_at is not None
    assert mock.stats.disconnected == 1


async def test_hangbody_sends_one_chunk_then_stalls(
    mock: Mock, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{mock.url}/messages",
        json=chat_body("mock-hangbody-n5", stream=True),
        headers={"x-request-id": "hb"},
    ) as resp:
        assert resp.status == 200
        seen = b""
        while b"content_block_delta" not in seen:
            seen += await resp.content.readany()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.content.readany(), 0.3)
        assert seen.count(b"event: content_block_delta") == 1
        assert mock.stats.requests["hb"].end is None
        resp.close()
    assert (await mock.ended("hb")).end == "disconnected"


async def test_slow_first_byte(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = chat_body("mock-f400-n2")
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            f"{mock.url}/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.05)
        )
    started = time.monotonic()
    async with http.post(f"{mock.url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    assert time.monotonic() - started >= 0.3  # generous lower bound on a 400 ms sleep


async def test_client_disconnect_mid_stream_is_recorded(
    mock: Mock, http: aiohttp.ClientSession
) -> None:
    body = chat_body("mock-n100000-d2", stream=True)
    async with http.post(
        f"{mock.url}/chat/completions", json=body, headers={"x-request-id": "gone"}
    ) as resp:
        await resp.content.readuntil(b"\n\n")
        await resp.content.readuntil(b"\n\n")
        resp.close()
    record = await mock.ended("gone")
    assert record.end == "disconnected" and record.ended_at is not None
    assert record.ended_at >= record.started_at
    assert mock.stats.disconnected == 1 and mock.stats.completed == 0


async def test_large_chunks_for_backpressure(mock: Mock, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{mock.url}/chat/completions", json=chat_body("mock-n20-s16384", stream=True)
    ) as resp:
        events = sse_events(await resp.read())
    contents = [orjson.loads(d)["choices"][0]["delta"].get("content") for _, d in events[1:-2]]
    assert contents[0] == USER
    assert [len(c) for c in contents[1:]] == [16384] * 19


async def test_same_model_string_behaves_identically(
    mock: Mock, http: aiohttp.ClientSession
) -> None:
    async def contents() -> list[Any]:
        async with http.post(
            f"{mock.url}/chat/completions", json=chat_body("mock-n6-s40", stream=True)
        ) as resp:
            events = sse_events(await resp.read())
        return [orjson.loads(d)["choices"] for _, d in events[:-1]]

    assert await contents() == await contents()


# --- stats --------------------------------------------------------------------------------


async def test_stats_record_metadata_only(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = chat_body("mock-n2", stream=True, store=False, stream_options={"include_usage": True})
    headers = {"x-request-id": "meta", "Authorization": "Bearer up-key", "X-Api-Key": "ak"}
    async with http.post(f"{mock.url}/chat/completions", json=body, headers=headers) as resp:
        await resp.read()
    async with http.get(f"{mock.url}/models", headers={"x-request-id": "models"}) as resp:
        await resp.read()
    record = await mock.ended("meta")
    assert record.end == "completed" and record.path == "/v1/chat/completions"
    assert record.model == "mock-n2" and record.stream is True
    assert record.ended_at is not None and record.ended_at >= record.started_at
    assert {"authorization", "x-api-key", "x-request-id", "content-type"} <= set(
        record.header_names
    )
    assert all(name == name.lower() for name in record.header_names)
    assert record.authorization == "Bearer up-key" and record.x_api_key == "ak"
    assert record.body_keys == ("model", "messages", "stream", "store", "stream_options")
    assert record.store is False and record.stream_options == {"include_usage": True}
    assert (await mock.ended("models")).path == "/v1/models"

    async with http.get(f"{mock.root}/_mock/stats") as resp:
        served = await resp.json()
    assert served["started"] == 2 and served["completed"] == 2
    assert served["requests"]["meta"]["store"] is False
    assert served["requests"]["meta"]["end"] == "completed"
    assert served["requests"]["meta"]["x_api_key"] == "ak"


def test_stats_keep_a_bounded_number_of_records() -> None:
    stats = MockStats(max_records=3)
    for i in range(5):
        record = RequestRecord("/v1/x", "mock", False, 0.0, (), None, None, ())
        stats.begin(f"id{i}", record)
        stats.finish(record, "completed")
        stats.finish(record, "error")  # only the first end counts
    stats.begin(None, RequestRecord("/v1/x", "mock", False, 0.0, (), None, None, ()))
    assert list(stats.requests) == ["id2", "id3", "id4"]
    assert (stats.started, stats.completed, stats.errored) == (6, 5, 0)
    assert mock_upstream.MAX_RECORDS == 10_000


# --- zero retention -----------------------------------------------------------------------


_ATOMIC = frozenset({int, float, bool, type(None), type, complex})


def live_objects_containing(needle: str, exclude: set[int]) -> list[str]:
    """Every live str/bytes/bytearray holding ``needle``, except the objects in ``exclude``.

    gc.get_objects() lists only tracked objects: str and bytes never are, and CPython
    untracks dicts and tuples that hold only atomic values, so walk the referents of every
    tracked object, level by level, descending into the untracked ones.
    """
    needle_bytes = needle.encode()
    level = gc.get_objects()
    seen = exclude | {id(needle), id(needle_bytes), id(level)} | set(map(id, level))
    hits: list[str] = []
    while level:
        deeper = []
        for obj in gc.get_referents(*level):
            if type(obj) in _ATOMIC or id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, str):
                if needle in obj:
                    hits.append(f"str of length {len(obj)}")
            elif isinstance(obj, bytes | bytearray):
                if needle_bytes in obj:
                    hits.append(f"{type(obj).__name__} of length {len(obj)}")
            elif not gc.is_tracked(obj):
                deeper.append(obj)
        level = deeper
    return hits


async def _read_all(resp: aiohttp.ClientResponse) -> tuple[bytearray, bool]:
    """The body, and whether the connection was reset; on a reset the exception's traceback
    keeps this frame alive until a collection, so it must not keep a chunk (the caller
    clears the bytearray)."""
    received = bytearray()
    try:
        while chunk := await resp.content.readany():
            received += chunk
    except aiohttp.ClientPayloadError:
        chunk = b""
        return received, True
    return received, False


async def _exchange(mock: Mock, marker: str, path: str, model: str, stream: bool) -> None:
    """One request whose prompt carries ``marker`` (echoed at the start, and deep inside).

    ``-d50``/``-hang``/``-f`` models are abandoned by the client; others are read in full.
    """
    prompt = f"{marker} is the start; more text follows, then {marker} again past the echo"
    if path == "/responses":
        body: dict[str, Any] = {"model": model, "input": prompt, "instructions": marker}
    else:
        body = {**chat_body(model, prompt), "system": marker, "max_tokens": 9}
    body["stream"] = stream
    data = orjson.dumps(body) if model != "broken" else b"{" + orjson.dumps(body)
    del body, prompt
    timeout = aiohttp.ClientTimeout(total=0.3 if "hang" in model or "-f" in model else None)
    connector = aiohttp.TCPConnector(force_close=True)
    headers = {"x-request-id": marker[:8]}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            async with session.post(mock.url + path, data=data, headers=headers) as r:
                del data
                if "n100000" in model or "hangbody" in model:
                    await r.content.readuntil(b"\n\n")
                    await r.content.readuntil(b"\n\n")
                    r.close()
                else:
                    received, reset = await _read_all(r)
                    assert reset == ("-r" in model)
                    assert (marker.encode() in received) == (model != "broken")
                    received.clear()
        except (TimeoutError, aiohttp.ClientError):
            assert "hang" in model or "-f" in model, model
    await mock.ended(marker[:8])
    for _ in range(5):
        await asyncio.sleep(0.02)  # let both ends finish tearing the connection down


@pytest.mark.parametrize(
    ("path", "model", "stream"),
    [
        ("/chat/completions", "mock-n5", True),
        ("/chat/completions", "mock-n5", False),
        ("/messages", "mock-n3", True),
        ("/responses", "mock-n3", True),
        ("/responses", "mock-n3", False),
        ("/chat/completions", "mock-n100000-d50", True),  # client leaves while the mock sleeps
        ("/chat/completions", "mock-n100000-s65536", True),  # client leaves mid-write
        ("/chat/completions", "mock-hangbody", True),
        ("/messages", "mock-hang", True),
        ("/chat/completions", "mock-f5000", False),  # client gives up before the first byte
        ("/chat/completions", "mock-n5-r2", True),  # mock resets mid-stream
        ("/chat/completions", "mock-r1", False),  # mock resets mid-body
        ("/chat/completions", "broken", False),  # malformed JSON
    ],
)
async def test_no_content_retained(
    mock: Mock, path: str, model: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    marker = f"ZRMARK{uuid.uuid4().hex}"
    gc.disable()  # content must die by reference counting, not wait for a collection
    try:
        await _exchange(mock, marker, path, model, stream)
        assert live_objects_containing(marker, {id(marker)}) == []
    finally:
        gc.enable()
    gc.collect()
    assert live_objects_containing(marker, {id(marker)}) == []
    assert marker not in caplog.text


def test_retention_scan_can_fail() -> None:
    marker = f"ZRMARK{uuid.uuid4().hex}"
    assert live_objects_containing(marker, {id(marker)}) == []
    # An untracked dict (atomic values only) inside a tuple inside a list: two hops deep.
    kept = [({"k": f"prefix {marker} suffix"}, (marker + "x").encode())]
    assert not gc.is_tracked(kept[0][0])
    assert sorted(live_objects_containing(marker, {id(marker)})) == [
        "bytes of length 39",
        "str of length 52",
    ]
    del kept


# --- process entry point and module hygiene ------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_main_as_a_subprocess(signum: int) -> None:
    proc = LoggedProcess(
        [sys.executable, "-m", "zrproxy.mock_upstream", "--listen", "127.0.0.1:0"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    try:
        match = proc.wait_for(r"mock upstream listening on (http://127\.0\.0\.1:(\d+))$", 30)
        assert int(match[2]) != 0, match[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(match[1] + "/v1/models") as resp:
                assert resp.status == 200
                assert (await resp.json())["object"] == "list"
        proc.proc.send_signal(signum)
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    finally:
        proc.stop()


def test_main_rejects_a_bad_listen_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--listen", "no-port-here"])
    assert exited.value.code == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_bind_failure_exits_1(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--listen", f"127.0.0.1:{port}"]) == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"mock upstream cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    caplog.clear()  # the one expected error


@pytest.mark.parametrize(
    ("module", "allowed"), [(mock_upstream, {"zrproxy.mock_wire"}), (mock_wire, set())]
)
def test_imports_nothing_from_zrproxy_but_its_wire_formats(
    module: ModuleType, allowed: set[str]
) -> None:
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "zrproxy"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            if (node.module or "").split(".")[0] == "zrproxy":
                found.add(node.module or "")
    assert found == allowed
