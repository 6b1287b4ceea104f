"""zrproxy.sse: the verdict on an event stream, and the bytes it lets through, are the
same however the stream is split into reads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zrproxy.sse import SseCheck

GOOD = (
    b'event: message_start\ndata: {"a":1}\n\n: ping\n\n'
    b'event: x\r\ndata: {"b":2}\r\n\r\ndata: [DONE]\n\nid: 3\nretry: 5\ndata: {}\n\n'
)
# (stream, bytes of whole events before the fault)
BROKEN = [
    (b"event: a\ndata: {}\n\ngarbage line\ndata: {}\n\n", b"event: a\ndata: {}\n\n"),
    (b"data: {}\n\ndata: hello\n\n", b"data: {}\n\n"),
    (b"data: {}\n\nxy\n\n", b"data: {}\n\n"),
    (b"data: {}\n\nevent: y\nid: 4\n: c\n\ndata: {}\n\n", b"data: {}\n\n"),
    (b"hello\n\n", b""),
]


def _run(stream: bytes, cuts: list[int], max_event: int = 1 << 20) -> tuple[str, bytes]:
    check = SseCheck(max_event)
    out: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if end > start:
            out.append(check.feed(stream[start:end]))
            if check.broken:
                return "broken", b"".join(out)
    return ("whole" if check.ended_well() else "cut short"), b"".join(out)


def _cuts(size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, max(1, size - 1)), max_size=8).map(sorted)


@given(_cuts(len(GOOD)))
def test_a_good_stream_passes_whole_however_split(cuts: list[int]) -> None:
    assert _run(GOOD, cuts) == ("whole", GOOD)


@pytest.mark.parametrize(("stream", "before"), BROKEN)
@given(data=st.data())
def test_a_broken_stream_is_refused_however_split(
    stream: bytes, before: bytes, data: st.DataObject
) -> None:
    verdict, out = _run(stream, data.draw(_cuts(len(stream))))
    assert verdict == "broken"
    if b"event: y" in stream:
        # A nameless event is known only at its blank line: its first lines went on.
        assert out.startswith(before) and stream.startswith(out)
    else:
        assert out == before  # never a part of the bad line


@given(_cuts(len(GOOD)), st.integers(0, len(GOOD) - 1))
def test_a_stream_ended_inside_an_event_is_cut_short(cuts: list[int], end: int) -> None:
    stream = GOOD[:end]
    cuts = [c for c in cuts if c < end]
    verdict, _ = _run(stream, cuts)
    whole = stream.endswith((b"\n\n", b"\r\n\r\n")) and b"\ndata: [DONE]\n" in stream
    assert verdict == ("whole" if whole else "cut short")


@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=6),
    st.integers(10, 80),
    st.data(),
)
def test_an_event_over_the_bound_breaks_the_stream(
    sizes: list[int], bound: int, data: st.DataObject
) -> None:
    events = [b"data: {" + b"x" * n + b"}\n\n" for n in sizes] + [b"data: [DONE]\n\n"]
    stream = b"".join(events)
    verdict, out = _run(stream, data.draw(_cuts(len(stream))), bound)
    over = [i for i, e in enumerate(events) if len(e) > bound]
    if not over:
        assert (verdict, out) == ("whole", stream)
        return
    assert verdict == "broken"
    before = b"".join(events[: over[0]])
    # What went on: the events before, and at most the part of the big one that came in
    # reads before the one that crossed the bound.
    assert out.startswith(before)
    assert len(out) < len(before) + len(events[over[0]])


LAST_EVENTS = [
    b"data: [DONE]\n\n",
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    b'event: response.completed\ndata: {"type":"response.completed"}\n\n',
    b'event: response.incomplete\r\ndata: {"type":"response.incomplete"}\r\n\r\n',
    b'event: response.failed\ndata: {"type":"response.failed"}\n\n',
    b'event: error\ndata: {"type":"error"}\n\n',
]
EVENTS = b'event: content_block_delta\ndata: {"a":1}\n\ndata: {"b":"[DONE]"}\n\n'


@pytest.mark.parametrize("last", LAST_EVENTS)
@given(data=st.data())
def test_a_stream_is_whole_only_with_its_apis_last_event(last: bytes, data: st.DataObject) -> None:
    # Whole events, but without the last one the SDKs would end the answer early: an
    # upstream that stopped between events. `[DONE]` inside a data value is not one.
    assert _run(EVENTS, data.draw(_cuts(len(EVENTS))))[0] == "cut short"
    stream = EVENTS + last
    assert _run(stream, data.draw(_cuts(len(stream)))) == ("whole", stream)
