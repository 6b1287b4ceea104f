"""zrproxy.deadlines: every deadline fires once, never early and at most RESOLUTION_S
late, a cancelled one never, and nothing it referenced outlives its cancel.

A hand-driven clock stands in for the event loop's (Deadlines asks a loop only for
`time()` and `call_at()`), so the checks are exact on every machine; one test runs on
a real loop.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import weakref
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from zrproxy.deadlines import RESOLUTION_S, Deadlines


class _Handle:
    def __init__(self, clock: _Clock, when: float, callback: Callable[[], object]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False
        clock.handles.append(self)

    def cancel(self) -> None:
        self.cancelled = True


class _Clock:
    """The two loop methods Deadlines uses, on a time we move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.handles: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], object]) -> _Handle:
        return _Handle(self, when, callback)

    def advance(self, to: float) -> None:
        """Move to `to`, running every live timer due on the way, in time order."""
        while True:
            due = [h for h in self.handles if not h.cancelled and h.when <= to]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)
            self.handles.remove(handle)
            self.now = max(self.now, handle.when)
            handle.callback()
        self.now = to

    def live_timers(self) -> int:
        return sum(1 for h in self.handles if not h.cancelled)


def _deadlines(clock: _Clock) -> Deadlines:
    return Deadlines(clock)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    delays=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=40),
    cancelled=st.sets(st.integers(0, 39)),
    step=st.floats(0.001, 0.2),
)
def test_each_fires_once_never_early_at_most_a_resolution_late(
    delays: list[float], cancelled: set[int], step: float
) -> None:
    clock = _Clock()
    deadlines = _deadlines(clock)
    fired: dict[int, float] = {}

    def fire(index: int) -> None:
        assert index not in fired, "fired twice"
        fired[index] = clock.now

    start = clock.now
    handles = [deadlines.at(start + delay, fire, i) for i, delay in enumerate(delays)]
    for index in cancelled & set(range(len(delays))):
        handles[index].cancel()
    end = start + max(delays) + 1.0
    while clock.now < end:
        clock.advance(clock.now + step)
    for index, delay in enumerate(delays):
        if index in cancelled:
            assert index not in fired
            continue
        assert fired[index] >= start + delay  # never early
        assert fired[index] <= start + delay + RESOLUTION_S + 1e-9
    assert len(deadlines) == 0
    assert clock.live_timers() == 0  # no timer left armed with nothing to do


def test_one_loop_timer_serves_many_deadlines() -> None:
    clock = _Clock()
    deadlines = _deadlines(clock)
    for i in range(1000):
        deadlines.at(clock.now + 10 + i * 0.001, lambda: None)
    assert clock.live_timers() == 1
    assert len(deadlines) == 1000


def test_an_earlier_deadline_moves_the_timer_and_a_later_one_does_not() -> None:
    clock = _Clock()
    deadlines = _deadlines(clock)
    order: list[str] = []
    deadlines.at(clock.now + 5, order.append, "late")
    deadlines.at(clock.now + 1, order.append, "early")
    deadlines.at(clock.now + 3, order.append, "middle")
    clock.advance(clock.now + 2)
    assert order == ["early"]
    clock.advance(clock.now + 4)
    assert order == ["early", "middle", "late"]


def test_a_callback_may_set_the_next_deadline() -> None:
    clock = _Clock()
    deadlines = _deadlines(clock)
    times: list[float] = []

    def again() -> None:
        times.append(clock.now)
        if len(times) < 3:
            deadlines.at(clock.now + 1, again)

    deadlines.at(clock.now + 1, again)
    clock.advance(clock.now + 10)
    assert len(times) == 3
    assert all(b - a >= 1 for a, b in itertools.pairwise(times))


def test_a_cancelled_deadline_lets_go_of_what_it_held_at_once() -> None:
    clock = _Clock()
    deadlines = _deadlines(clock)

    class Held:
        pass

    held = Held()
    ref = weakref.ref(held)
    deadline = deadlines.at(clock.now + 600, lambda h: None, held)
    del held
    assert ref() is not None
    gc.disable()
    try:
        deadline.cancel()
        assert ref() is None  # freed by reference counting, not by a collection
    finally:
        gc.enable()
    assert len(deadlines) == 0


def test_on_a_real_loop_it_fires_after_its_time() -> None:
    async def main() -> tuple[float, float, list[Any]]:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        done: asyncio.Future[float] = loop.create_future()
        skipped: list[Any] = []
        when = loop.time() + 0.05
        deadlines.at(when, lambda: done.set_result(loop.time()))
        deadlines.at(when, skipped.append, 1).cancel()
        fired = await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.1)
        return when, fired, skipped

    when, fired, skipped = asyncio.run(main())
    assert fired >= when
    assert skipped == []
