"""Counters-only Prometheus metrics: no per-request records, bounded label sets.

Label values come only from config names (project, route, upstream) and the fixed
enums below; callers pass config names, never client input. Children are bound once
per label tuple and cached.

# Per request: tallies
prometheus-client's `inc()` validates its argument and takes a lock per call (in
multiprocess mode also a `getpid()` system call); a request touched a dozen series, so
that was about a tenth of the proxy's CPU. The series every proxied request updates
(request counts, bytes, chunks, tokens, the two histograms, the in-flight gauges) are
`Tally`/`Spread` objects instead, found with one dict probe per request
(`Metrics.series`): they add to the bound child's own value in place, so the exposition
is still prometheus-client's, name for name, and exact. Only the API loop's thread adds
to them; a scrape on the admin thread reads a float, which the interpreter lock keeps
whole. In multiprocess mode (values in per-process mmap'ed files the supervisor sums)
a tally writes the new value to the file at once, as prometheus-client's `inc` does
(`_FileTally`), so the sums stay exact and immediate.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Literal, TypeVar, get_args

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.values import MutexValue

from zrproxy import __version__
from zrproxy.outcomes import FailureKind

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

M = TypeVar("M", bound=MetricWrapperBase)

# The project, route or upstream label of a request that ended before that name was
# known (a 401 has no project, a 404 no route, a 502 after every upstream failed no
# upstream).
NOT_KNOWN = "none"
UpstreamErrorKind = FailureKind  # the `kind` label of zrproxy_upstream_errors
TokenType = Literal["prompt", "cache_read", "cache_creation", "completion", "reasoning"]
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

_TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def status_class(status: int) -> str:
    return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]


class Tally:
    """One counter or gauge series, added to in place (see the module docstring)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value  # the child's MutexValue: a float under a lock we skip

    def add(self, amount: float = 1.0) -> None:
        self._value._value += amount


class _FileTally(Tally):
    """A tally in multiprocess mode: adds to the value and writes it to this process's
    mmap'ed file, as `MmapedValue.inc` does, without its lock and its `getpid()` (a
    fork check; workers are spawned, never forked). The lock guards the file growing
    when a child is made: children are made on the API loop's thread, which is the only
    one adding to these series; the audit thread's pre-bound counters take the lock."""

    __slots__ = ("_file", "_key")

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self._file = value._file
        self._key = value._key

    def add(self, amount: float = 1.0) -> None:
        value = self._value
        value._value += amount
        self._file.write_value(self._key, value._value, 0.0)


class _SharedTally(Tally):
    """A tally on a value class we do not know: its own (locked) `inc`."""

    __slots__ = ()

    def add(self, amount: float = 1.0) -> None:
        self._value.inc(amount)


def _tally(value: Any) -> Tally:
    if type(value) is MutexValue:
        return Tally(value)
    if getattr(value, "_multiprocess", False) and hasattr(value, "_file"):
        return _FileTally(value)
    return _SharedTally(value)


def tally(child: Counter | Gauge) -> Tally:
    """A tally on a bound child (or on a metric without labels)."""
    return _tally(child._value)


class Spread:
    """One histogram series. The bucket is found by bisection where `observe` scans:
    the first upper bound >= the amount (the last bound is +Inf)."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._bounds: list[float] = list(child._upper_bounds)
        self._buckets = [_tally(b) for b in child._buckets]
        self._sum = _tally(child._sum)

    def observe(self, amount: float) -> None:
        self._sum.add(amount)
        self._buckets[bisect_left(self._bounds, amount)].add(1.0)


class _Unbound(Tally):
    """A series not bound yet. The first `add` binds it and puts the bound tally in its
    place: as with `.labels(...).inc()`, a series appears once it has counted."""

    __slots__ = ("_bind", "_install")

    def __init__(self, bind: Callable[[], Tally], install: Callable[[Tally], None]) -> None:
        self._bind, self._install = bind, install

    def add(self, amount: float = 1.0) -> None:
        bound = self._bind()
        self._install(bound)
        bound.add(amount)


class _UnboundSpread(Spread):
    __slots__ = ("_bind", "_install")

    def __init__(self, bind: Callable[[], Spread], install: Callable[[Spread], None]) -> None:
        self._bind, self._install = bind, install

    def observe(self, amount: float) -> None:
        bound = self._bind()
        self._install(bound)
        bound.observe(amount)


class RequestSeries:
    """Every series one kind of proxied request updates, for one (project, route,
    upstream, status class, stream) tuple."""

    __slots__ = ("bytes_in", "bytes_out", "chunks", "duration", "requests", "tokens", "ttfb")

    def __init__(
        self, m: Metrics, project: str, route: str, upstream: str, sc: str, stream: str
    ) -> None:
        self.requests = tally(m.requests.labels(project, route, upstream, sc, stream))
        self.duration = Spread(m.duration.labels(route))
        self.ttfb: Spread = _UnboundSpread(
            lambda: Spread(m.ttfb.labels(route)), lambda s: setattr(self, "ttfb", s)
        )
        self.bytes_in = self._unbound("bytes_in", m.bytes_in, project, route)
        self.bytes_out = self._unbound("bytes_out", m.bytes_out, project, route)
        self.chunks = self._unbound("chunks", m.chunks, route)
        self.tokens: dict[str, Tally] = {}
        for kind in get_args(TokenType):
            self.tokens[kind] = self._unbound_token(m.tokens, project, route, upstream, kind)

    def _unbound(self, slot: str, metric: Counter, *labels: str) -> Tally:
        return _Unbound(
            lambda: tally(metric.labels(*labels)), lambda bound: setattr(self, slot, bound)
        )

    def _unbound_token(self, metric: Counter, *labels: str) -> Tally:
        def install(bound: Tally) -> None:
            self.tokens[labels[-1]] = bound

        return _Unbound(lambda: tally(metric.labels(*labels)), install)


class Metrics:
    """All zrproxy metrics, in their own registry (never the global default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zrproxy_requests",
            "Requests answered, by project, route, upstream, status class and streaming.",
            ["project", "route", "upstream", "status_class", "stream"],
            registry=r,
        )
        self.duration = Histogram(
            "zrproxy_request_duration_seconds",
            "Time from request received to response finished.",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "zrproxy_time_to_first_byte_seconds",
            "Time from request received to the first response byte sent to the client.",
            ["route"],
            buckets=_TTFB_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "zrproxy_request_bytes",
            "Request body bytes received.",
            ["project", "route"],
            registry=r,
        )
        self.bytes_out = Counter(
            "zrproxy_response_bytes",
            "Response body bytes sent to clients.",
            ["project", "route"],
            registry=r,
        )
        self.chunks = Counter(
            "zrproxy_stream_chunks", "Stream chunks forwarded to clients.", ["route"], registry=r
        )
        self.tokens = Counter(
            "zrproxy_tokens",
            "Tokens reported by upstreams' usage data; the types are disjoint.",
            ["project", "route", "upstream", "type"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "zrproxy_upstream_errors",
            "Failed upstream attempts, by upstream and kind.",
            ["upstream", "kind"],
            registry=r,
        )
        self.failovers = Counter(
            "zrproxy_failovers",
            "Requests moved on to a route's next upstream.",
            ["route"],
            registry=r,
        )
        self.client_aborts = Counter(
            "zrproxy_client_aborts",
            "Clients that went away before the response ended.",
            ["route"],
            registry=r,
        )
        self.rejections = Counter(
            "zrproxy_rejections",
            "Requests refused by the proxy itself, by reason (and project and route where known).",
            ["reason", "project", "route"],
            registry=r,
        )
        self.zero_retention_refusals = Counter(
            "zrproxy_zero_retention_refusals",
            "Zero-retention requests refused for asking the provider to keep state, by field.",
            ["field"],
            registry=r,
        )
        self.in_flight = Gauge(
            "zrproxy_in_flight_requests",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.open_streams = Gauge(
            "zrproxy_open_streams",
            "Streaming responses in progress.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.audit_records = Counter(
            "zrproxy_audit_records",
            "Content audit records, by project and outcome (written, or dropped and why).",
            ["project", "outcome"],
            registry=r,
        )
        self.project_info = Gauge(
            "zrproxy_project_info",
            "1 per configured project: its zero-retention and audit-log settings.",
            ["project", "zero_retention", "audit_log"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info = Gauge(
            "zrproxy_build_info",
            "1, labelled with the zrproxy version running.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        # process_* (RSS, open fds, CPU seconds, start time) of the process serving /metrics.
        ProcessCollector(registry=r)
        self.client_errors = Counter(
            "zrproxy_client_errors",
            "Requests failed by their client (a stalled or too slow body, a stalled reader).",
            ["kind"],
            registry=r,
        )
        self.limits_backend = Gauge(
            "zrproxy_limits_backend",
            "Where per-project limit counters live: 1 for the backend in force (redis, local).",
            ["backend"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.refused_accepts = Counter(
            "zrproxy_refused_accepts",
            "Connections the API listener could not accept (out of file descriptors).",
            registry=r,
        )
        self.accept_pauses = Counter(
            "zrproxy_accept_pauses",
            "Times the API listener stopped accepting at its connection cap.",
            registry=r,
        )
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self._series: dict[tuple[str, str, str, str, str], RequestSeries] = {}
        # The two gauges every request moves (only the API loop's thread moves them).
        self.in_flight_now = tally(self.in_flight)
        self.open_streams_now = tally(self.open_streams)

    def set_limits_backend(self, backend: str) -> None:
        for name in ("local", "redis"):
            self.limits_backend.labels(name).set(1 if name == backend else 0)

    def child(self, metric: M, *labels: str) -> M:
        """The bound child for these label values (bound once, then cached)."""
        key = (metric, labels)
        bound = self._children.get(key)
        if bound is None:
            bound = self._children[key] = metric.labels(*labels)
        return bound  # type: ignore[return-value]

    def series(
        self, project: str, route: str, upstream: str, status: int, stream: bool
    ) -> RequestSeries:
        """The series of a proxied request with these names and outcome (bound once)."""
        key = (project, route, upstream, status_class(status), "true" if stream else "false")
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = RequestSeries(self, *key)
        return found
