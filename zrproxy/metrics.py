"""Counters-only Prometheus metrics: no per-request records, bounded label sets.

Label values come only from config names (project, route, upstream) and the fixed
enums below; callers pass config names, never client input. Children are bound once
per label tuple and cached, so the per-request cost is a dict probe and an `inc()`.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

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
