"""After a burst of streams closes, no set of ours keeps the table the burst grew.

A Python set keeps its hash table at the largest size it reached (16 bytes a slot) until
it is cleared: after 5,000 streams the handler set and the upstream pool's set of
connections held 512 KiB each with nothing in them (bench/README.md, "Memory after a
burst"). Both give it back once empty.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import aiohttp
import orjson

from tests.conftest import RunningProxy

STREAMS = 120  # well past a set's 8 inline slots: its table is on the heap
SLOW = "mock-n600-d100"  # a minute of chunks: every stream stays open until we close it
EMPTY_SET = sys.getsizeof(set())


async def _open_stream(
    session: aiohttp.ClientSession, proxy: RunningProxy
) -> aiohttp.ClientResponse:
    body = orjson.dumps(
        {"model": SLOW, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    )
    response = await session.post(
        proxy.url + "/v1/chat/completions", data=body, headers=proxy.auth()
    )
    assert response.status == 200
    assert await response.content.readany()  # the stream is under way
    return response


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):  # at most 20 s
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


async def test_the_handler_and_connection_sets_shrink_once_a_burst_has_closed(
    proxy: RunningProxy,
) -> None:
    state = proxy.service.state
    pool = proxy.service._upstreams.pool("mock")  # type: ignore[union-attr]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        responses = await asyncio.gather(*(_open_stream(session, proxy) for _ in range(STREAMS)))
        assert len(state.handlers) == STREAMS
        assert len(pool._all) == STREAMS
        grown = sys.getsizeof(state.handlers), sys.getsizeof(pool._all)
        assert min(grown) > EMPTY_SET
        for response in responses:
            response.close()  # the client goes away mid-stream
        await _until(lambda: not state.handlers and not pool._all, "every stream ended")
    assert sys.getsizeof(state.handlers) == EMPTY_SET
    assert sys.getsizeof(pool._all) == EMPTY_SET
