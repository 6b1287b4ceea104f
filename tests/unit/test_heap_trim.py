"""app.trim_heap_when_idle: after a burst, the heap is trimmed once idle and once more a
period later (the burst's connections close after its last handler), never while
requests are in flight, and not again until the next burst."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from zrproxy.app import _TRIM_AFTER_REQUESTS, trim_heap_when_idle
from zrproxy.proxy import ServiceState

_PERIOD_S = 0.01


async def _run_for(state: ServiceState, periods: int, trims: list[int]) -> None:
    task = asyncio.create_task(trim_heap_when_idle(state, _PERIOD_S, trims.append))
    await asyncio.sleep(_PERIOD_S * periods)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    # Each trim collects garbage, which takes a while in a test process: wait for it.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(_PERIOD_S)


def test_trims_twice_after_a_burst_then_waits_for_the_next() -> None:
    async def main() -> list[int]:
        state = ServiceState()
        trims: list[int] = []
        task = asyncio.create_task(trim_heap_when_idle(state, _PERIOD_S, trims.append))
        await asyncio.sleep(_PERIOD_S * 5)
        assert trims == []  # no burst yet
        state.served += _TRIM_AFTER_REQUESTS
        await _until(lambda: len(trims) >= 2)
        assert trims == [0, 0]  # once idle, and once more
        state.served += _TRIM_AFTER_REQUESTS - 1
        await asyncio.sleep(_PERIOD_S * 10)
        task.cancel()
        return trims

    assert asyncio.run(main()) == [0, 0]


def test_never_trims_while_a_request_is_in_flight() -> None:
    async def main() -> list[int]:
        state = ServiceState()
        state.served += 10 * _TRIM_AFTER_REQUESTS
        busy: asyncio.Task[object] = asyncio.create_task(asyncio.sleep(10))
        state.handlers.add(busy)
        trims: list[int] = []
        await _run_for(state, 15, trims)
        busy.cancel()
        return trims

    assert asyncio.run(main()) == []
