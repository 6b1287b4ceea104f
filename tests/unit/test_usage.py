"""UsageTap: any split of a response gives the same bytes out and the same token counts."""

from __future__ import annotations

import itertools
import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zrproxy.usage import TOKEN_TYPES, UsageTap

# Text a model could well produce: none of it may be counted or stripped.
TRICKY = [
    "usage",
    '"usage":{',
    '"usage": {"prompt_tokens": 999, "completion_tokens": 999}',
    '{"usage":{"prompt_tokens":777,"completion_tokens":777}}',
    '\\"usage\\":{',
    '"choices":[]',
    '"choices":[{',
    "data: [DONE]\n\n",
    "}\n\n{",
    "",
]
contents = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=30)), max_size=6)
tokens = st.integers(min_value=0, max_value=10**6)

settings.register_profile("usage", max_examples=300, deadline=None)


def prompt_completion(tap: UsageTap) -> tuple[int, int]:
    tokens = tap.tokens()
    return tokens["prompt"], tokens["completion"]


def sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def openai_events(texts: list[str], prompt: int, completion: int) -> list[bytes]:
    """The events an OpenAI upstream sends when asked for usage: content chunks with
    "usage":null, then (second to last) a usage chunk with no choices, then [DONE]."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice], "usage": None})

    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    usage_event = sse({**base, "choices": [], "usage": usage})
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": text}) for text in texts]
    events += [chunk({}, "stop"), usage_event, b"data: [DONE]\n\n"]
    return events


def openai_stream(texts: list[str], prompt: int, completion: int) -> tuple[bytes, bytes]:
    """(the whole stream, its usage event)."""
    events = openai_events(texts, prompt, completion)
    return b"".join(events), events[-2]


def anthropic_stream(texts: list[str], prompt: int, cached: int, completion: int) -> bytes:
    def event(name: str, payload: dict[str, object]) -> bytes:
        return f"event: {name}\n".encode() + sse({"type": name, **payload})

    message: dict[str, object] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": 1,
        },
    }
    parts = [
        event("message_start", {"message": message}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    parts += [
        event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": t}})
        for t in texts
    ]
    parts += [
        event("content_block_stop", {"index": 0}),
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": completion},
            },
        ),
        event("message_stop", {}),
    ]
    return b"".join(parts)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at every point in `cuts` (repeats give empty pieces)."""
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(tap: UsageTap, chunks: list[bytes]) -> bytes:
    out = b"".join(tap.feed(c) for c in chunks)
    return out + tap.flush()


def split_points(data: st.DataObject, length: int) -> list[int]:
    return data.draw(st.lists(st.integers(0, length), max_size=40), label="cuts")


# --- OpenAI streams -------------------------------------------------------------------


@settings(settings.get_profile("usage"))
@given(texts=contents, prompt=tokens, completion=tokens, data=st.data())
def test_openai_stream_pass_through(
    texts: list[str], prompt: int, completion: int, data: st.DataObject
) -> None:
    stream, _ = openai_stream(texts, prompt, completion)
    tap = UsageTap()
    assert run(tap, pieces(stream, split_points(data, len(stream)))) == stream
    assert prompt_completion(tap) == (prompt, completion)


@settings(settings.get_profile("usage"))
@given(texts=contents, prompt=tokens, completion=tokens, data=st.data())
def test_openai_stream_strip(
    texts: list[str], prompt: int, completion: int, data: st.DataObject
) -> None:
    stream, usage_event = openai_stream(texts, prompt, completion)
    tap = UsageTap(strip_usage_event=True)
    out = run(tap, pieces(stream, split_points(data, len(stream))))
    assert out == stream.replace(usage_event, b"")
    assert prompt_completion(tap) == (prompt, completion)


@settings(settings.get_profile("usage"))
@given(texts=contents, data=st.data())
def test_strip_mode_forwards_content_at_once(texts: list[str], data: st.DataObject) -> None:
    # Only the start of an event that does not yet show '"choices":[{' may be held back;
    # every byte of a content event goes out in the same feed() that brought it.
    events = openai_events(texts, 5, 6)
    stream, usage_event = b"".join(events), events[-2]
    starts = [0]
    for event in events:
        starts.append(starts[-1] + len(event))
    tap = UsageTap(strip_usage_event=True)
    out = b""
    fed = 0
    for cut in sorted(set(split_points(data, len(stream)))):
        out += tap.feed(stream[fed:cut])
        fed = cut
        event_start = max(s for s in starts if s <= cut)
        partial = stream[event_start:cut]
        expected = stream[:event_start].replace(usage_event, b"")
        if b'"choices":[{' in partial:
            expected += partial
        assert out == expected, cut


@pytest.mark.parametrize("strip", [False, True])
def test_usage_object_split_at_every_byte(strip: bool) -> None:
    stream, usage_event = openai_stream(["hi"], 12, 34)
    expected = stream.replace(usage_event, b"") if strip else stream
    start = stream.index(usage_event)
    for cut in range(start - 1, start + len(usage_event) + 2):
        tap = UsageTap(strip_usage_event=strip)
        assert run(tap, [stream[:cut], stream[cut:]]) == expected, cut
        assert prompt_completion(tap) == (12, 34), cut


@pytest.mark.parametrize("strip", [False, True])
def test_usage_stream_byte_by_byte(strip: bool) -> None:
    stream, usage_event = openai_stream(['"usage":{"prompt_tokens":5}', "x"], 7, 8)
    tap = UsageTap(strip_usage_event=strip)
    out = run(tap, [stream[i : i + 1] for i in range(len(stream))])
    assert out == (stream.replace(usage_event, b"") if strip else stream)
    assert prompt_completion(tap) == (7, 8)


def test_stream_without_usage_counts_nothing() -> None:
    stream, usage_event = openai_stream(TRICKY, 1, 2)
    stream = stream.replace(usage_event, b"")
    for strip in (False, True):
        tap = UsageTap(strip_usage_event=strip)
        assert run(tap, pieces(stream, list(range(0, len(stream), 7)))) == stream
        assert prompt_completion(tap) == (0, 0)


def test_strip_keeps_a_usage_event_that_carries_content() -> None:
    # Some upstreams put usage on the last content chunk: it must reach the client.
    event = sse(
        {
            "choices": [{"index": 0, "delta": {"content": "x"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
    )
    tap = UsageTap(strip_usage_event=True)
    assert run(tap, [event, b"data: [DONE]\n\n"]) == event + b"data: [DONE]\n\n"


# --- flush ----------------------------------------------------------------------------


@settings(settings.get_profile("usage"))
@given(texts=contents, data=st.data())
def test_flush_returns_what_is_held_when_the_stream_stops_early(
    texts: list[str], data: st.DataObject
) -> None:
    stream, usage_event = openai_stream(texts, 3, 4)
    end = data.draw(st.integers(0, len(stream)), label="end")
    cut_short = stream[:end]
    usage_start = stream.index(usage_event)
    complete = end >= usage_start + len(usage_event)
    tap = UsageTap(strip_usage_event=True)
    out = run(tap, pieces(cut_short, split_points(data, end)))
    assert out == (cut_short.replace(usage_event, b"") if complete else cut_short)
    assert tap.flush() == b""  # flushing empties the tap


def test_flush_of_a_partial_usage_event() -> None:
    stream, usage_event = openai_stream(["a"], 3, 4)
    partial = usage_event[:-5]
    tap = UsageTap(strip_usage_event=True)
    head = stream[: stream.index(usage_event)]
    assert tap.feed(head + partial) == head
    assert tap.flush() == partial
    assert tap.flush() == b""


def test_pass_through_never_holds_anything() -> None:
    stream, _ = openai_stream(["a"], 3, 4)
    tap = UsageTap()
    for i in range(len(stream)):
        assert tap.feed(stream[i : i + 1]) == stream[i : i + 1]
    assert tap.flush() == b""


# --- Anthropic streams ----------------------------------------------------------------


@settings(settings.get_profile("usage"))
@given(
    texts=contents,
    prompt=tokens,
    cached=tokens,
    completion=tokens,
    data=st.data(),
)
def test_anthropic_stream_pass_through(
    texts: list[str], prompt: int, cached: int, completion: int, data: st.DataObject
) -> None:
    stream = anthropic_stream(texts, prompt, cached, completion)
    tap = UsageTap()
    assert run(tap, pieces(stream, split_points(data, len(stream)))) == stream
    # Cache reads are their own type; message_delta's output count replaces the 1.
    assert prompt_completion(tap) == (prompt, completion)
    assert tap.tokens()["cache_read"] == cached


# --- non-stream bodies ----------------------------------------------------------------


def openai_body(text: str, prompt: int, completion: int) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        },
        indent=2,
    ).encode()


def anthropic_body(text: str, prompt: int, completion: int) -> bytes:
    return json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "content": [{"type": "text", "text": text}],
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        },
        indent=4,
    ).encode()


@settings(settings.get_profile("usage"))
@given(
    text=st.one_of(st.sampled_from(TRICKY), st.text(max_size=40)),
    prompt=tokens,
    completion=tokens,
    anthropic=st.booleans(),
    data=st.data(),
)
def test_pretty_printed_json_body(
    text: str, prompt: int, completion: int, anthropic: bool, data: st.DataObject
) -> None:
    body = (anthropic_body if anthropic else openai_body)(text, prompt, completion)
    assert b'"usage": {\n' in body  # whitespace after the colon
    tap = UsageTap()
    assert run(tap, pieces(body, split_points(data, len(body)))) == body
    assert prompt_completion(tap) == (prompt, completion)


def test_usage_null_and_other_keys_are_ignored() -> None:
    tap = UsageTap()
    body = b'{"x_usage":{"prompt_tokens":9},"usage":null,"usages":{"prompt_tokens":9}}'
    assert tap.feed(body) == body
    assert prompt_completion(tap) == (0, 0)


def test_malformed_usage_values_are_ignored() -> None:
    tap = UsageTap()
    tap.feed(b'{"usage":{"prompt_tokens":-1,"completion_tokens":"5","output_tokens":true}}')
    assert prompt_completion(tap) == (0, 0)
    tap.feed(b'{"usage":{"prompt_tokens":4,"completion_tokens":2.5}}')
    assert prompt_completion(tap) == (4, 0)


def test_close_drops_partial_state() -> None:
    tap = UsageTap(strip_usage_event=True)
    assert tap.feed(b'data: {"choices":[],"usage":{"prompt_to') == b""
    tap.close()
    assert tap.flush() == b""


# --- token types a finance team can use ------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # Chat Completions: cached_tokens are part of prompt_tokens, reasoning_tokens part
        # of completion_tokens; each is counted once, as its own type.
        (
            {
                "prompt_tokens": 100,
                "completion_tokens": 50,
                "total_tokens": 150,
                "prompt_tokens_details": {"cached_tokens": 30, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 20, "audio_tokens": 0},
            },
            {
                "prompt": 70,
                "cache_read": 30,
                "cache_creation": 0,
                "completion": 30,
                "reasoning": 20,
            },
        ),
        # The Responses API spells them input/output.
        (
            {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 4},
                "output_tokens": 9,
                "output_tokens_details": {"reasoning_tokens": 5},
                "total_tokens": 19,
            },
            {"prompt": 6, "cache_read": 4, "cache_creation": 0, "completion": 4, "reasoning": 5},
        ),
        # Anthropic: input_tokens already exclude both cache counts.
        (
            {
                "input_tokens": 12,
                "cache_creation_input_tokens": 7,
                "cache_read_input_tokens": 3,
                "output_tokens": 8,
            },
            {"prompt": 12, "cache_read": 3, "cache_creation": 7, "completion": 8, "reasoning": 0},
        ),
        # Details that are null or malformed count as absent.
        (
            {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None},
            {"prompt": 5, "cache_read": 0, "cache_creation": 0, "completion": 2, "reasoning": 0},
        ),
    ],
)
def test_token_types_are_disjoint(usage: dict[str, object], expected: dict[str, int]) -> None:
    tap = UsageTap()
    body = json.dumps({"id": "x", "usage": usage}).encode()
    for i in range(0, len(body), 7):  # split anywhere: the object is found across chunks
        tap.feed(body[i : i + 7])
    assert tap.tokens() == expected
    assert tuple(expected) == TOKEN_TYPES
