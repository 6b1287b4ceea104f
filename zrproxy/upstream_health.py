"""Upstream health in the log: one line when an upstream starts failing, one when it
recovers, and while it keeps failing at most one summary per quiet period; and, once per
upstream and reason, the reason a failure gives the operator to act on (a TLS
certificate that did not verify, a 404 that means a wrong base_url, an egress proxy that
refused its credentials). The one place that decides what upstream trouble is logged.

Content-free by construction: the only variable parts are the upstream's config name,
a failure kind from a fixed set, counts, and reasons that are fixed text (ours, or the
ssl library's fixed verification messages). The metrics count every failure; this is
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
        # (upstream, reason) already logged: a bounded set, the reasons are fixed texts.
        self._reasons: set[tuple[str, str]] = set()

    def failed(self, upstream: str, kind: str, reason: str | None = None) -> None:
        """A failed attempt of kind `kind`; `reason`, a fixed text saying what the
        operator should look at, is logged the first time it is seen for `upstream`."""
        state = self._failing.get(upstream)
        now = self._clock()
        if state is None:
            state = self._failing[upstream] = _Failing(logged_at=now)
            log.warning("upstream %s is failing (%s)", upstream, kind)
        if reason is not None and (upstream, reason) not in self._reasons:
            self._reasons.add((upstream, reason))
            log.warning("upstream %s: %s", upstream, reason)
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
