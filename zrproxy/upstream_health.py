"""Upstream health in the log: one line when an upstream starts failing, one when it
recovers, and while it keeps failing at most one summary per quiet period.

Content-free by construction: the only variable parts are the upstream's config name,
a failure kind from a fixed set and counts. The metrics count every failure; this is
for the operator reading the log when a provider key expires or a region goes down.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("zrproxy.upstreams")

QUIET_S = 60.0


@dataclass(slots=True)
class _Failing:
    logged_at: float
    failures: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


class UpstreamHealth:
    """Tracks which upstreams are failing; `clock` is the event loop's time."""

    def __init__(self, clock: Callable[[], float], quiet_s: float = QUIET_S) -> None:
        self._clock = clock
        self._quiet_s = quiet_s
        self._failing: dict[str, _Failing] = {}

    def failed(self, upstream: str, kind: str) -> None:
        state = self._failing.get(upstream)
        now = self._clock()
        if state is None:
            state = self._failing[upstream] = _Failing(logged_at=now)
            log.warning("upstream %s is failing (%s)", upstream, kind)
        state.failures += 1
        state.kinds[kind] += 1
        if now - state.logged_at >= self._quiet_s:
            log.warning(
                "upstream %s still failing: %d failures (%s)",
                upstream,
                state.failures,
                ", ".join(f"{k} {n}" for k, n in sorted(state.kinds.items())),
            )
            state.logged_at = now

    def succeeded(self, upstream: str) -> None:
        if not self._failing:
            return  # the common case: one dict check per request
        state = self._failing.pop(upstream, None)
        if state is not None:
            log.warning("upstream %s recovered after %d failures", upstream, state.failures)
