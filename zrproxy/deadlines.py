"""Coarse deadlines on one loop timer: each request's total deadline and each upstream
exchange's first-byte and idle deadlines, without a libuv timer apiece.

# Goals
Setting and cancelling a deadline costs a dict insert and a dict pop. A deadline never
fires early, and at most `RESOLUTION_S` late. A cancelled deadline lets go of its
callback and arguments at once (they hold a request's exchange and task).

# Strategy
uvloop gives every `call_at` its own libuv timer: allocated, put in libuv's heap, and on
cancel closed through one more loop callback. Two of those per request were a measured
share of a non-streaming request's CPU (bench/README.md). Here a deadline is rounded up
to the next multiple of `RESOLUTION_S` (its slot) and kept in that slot's dict; a heap
of slot numbers finds the earliest, and one loop timer is armed for it. A slot emptied by
cancels stays in the heap until its time comes and is skipped then.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any

# Our deadlines are seconds long (the shortest in practice: a first-byte wait), so
# firing up to 25 ms late changes nothing a client can tell.
RESOLUTION_S = 0.025


class Deadline:
    """One pending deadline; `cancel()` it when what it guards is over."""

    __slots__ = ("_args", "_callback", "_owner", "slot")

    def __init__(
        self, owner: Deadlines, slot: int, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._owner: Deadlines | None = owner
        self.slot = slot
        self._callback: Callable[..., object] | None = callback
        self._args = args

    def when(self) -> float:
        """The loop time it fires at (its slot's)."""
        return self.slot * RESOLUTION_S

    def cancel(self) -> None:
        owner = self._owner
        self._owner = None
        self._callback = None
        self._args = ()
        if owner is not None:
            owner._remove(self)

    def _run(self) -> None:
        callback, args = self._callback, self._args
        self._owner = None
        self._callback = None
        self._args = ()
        if callback is not None:
            callback(*args)


class Deadlines:
    """The deadlines of one event loop. Create inside the running loop."""

    __slots__ = ("_heap", "_loop", "_slots", "_timer", "_timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._slots: dict[int, dict[Deadline, None]] = {}
        self._heap: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0  # the slot _timer fires for; 0: no timer

    def __len__(self) -> int:
        return sum(len(members) for members in self._slots.values())

    def at(self, when: float, callback: Callable[..., object], *args: Any) -> Deadline:
        """Call `callback(*args)` at loop time `when` (up to RESOLUTION_S later)."""
        slot = -int(-when // RESOLUTION_S)  # rounded up: never early
        deadline = Deadline(self, slot, callback, args)
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
            if not self._timer_slot or slot < self._timer_slot:
                self._arm(slot)
        members[deadline] = None
        return deadline

    def _remove(self, deadline: Deadline) -> None:
        slot = deadline.slot
        members = self._slots.get(slot)
        if members is not None:
            members.pop(deadline, None)
            if not members:
                del self._slots[slot]  # its heap entry is skipped when its time comes

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_slot = 0
        now = self._loop.time()
        heap, slots = self._heap, self._slots
        while heap and heap[0] * RESOLUTION_S <= now:
            members = slots.pop(heapq.heappop(heap), None)
            if members:
                for deadline in list(members):
                    deadline._run()
        while heap and heap[0] not in slots:
            heapq.heappop(heap)  # emptied by cancels
        # (A callback may have armed the timer already, for a later slot.)
        if heap and (not self._timer_slot or heap[0] < self._timer_slot):
            self._arm(heap[0])
