"""Tallies (zrproxy.metrics) count what prometheus-client's own `inc`/`observe` would.

They add to prometheus-client's value objects in place (its `MutexValue._value`, a
histogram child's `_upper_bounds`, `_buckets` and `_sum`, in multiprocess mode the
`MmapedValue`'s `_file` and `_key`): these tests pin those internals, so an upgrade
that renames them fails here, not in production metrics.
"""

from __future__ import annotations

from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.values import MutexValue

from zrproxy.metrics import Metrics, Spread, Tally, _tally, status_class, tally

# (project, route, upstream, status, stream, duration, ttfb, bytes in, out, chunks, tokens)
_Request = tuple[str, str, str, int, bool, float, float, int, int, int, dict[str, int]]
REQUESTS: list[_Request] = [
    ("acme", "r1", "mock", 200, True, 0.3, 0.005, 120, 4000, 64, {"prompt": 7, "completion": 64}),
    ("acme", "r1", "mock", 200, True, 0.01, 0.1, 90, 300, 3, {"completion": 3}),
    ("acme", "r1", "mock", 200, False, 600.0, 0.0, 50, 100, 1, {}),  # 600: on a bound
    ("acme", "r2", "spare", 502, False, 900.0, 0.0, 10, 0, 0, {}),  # past the last: +Inf
    ("none", "none", "none", 401, False, 0.0, 0.0, 0, 0, 0, {}),
    ("beta", "r2", "spare", 429, True, 1e-9, 61.0, 0, 70, 1, {"reasoning": 5}),
]


def _exposition(m: Metrics) -> list[str]:
    text = prometheus_client.generate_latest(m.registry).decode()
    return [line for line in text.splitlines() if "process_" not in line]


def _by_tallies(m: Metrics) -> None:
    for project, route, up, status, stream, duration, ttfb, b_in, b_out, chunks, tokens in REQUESTS:
        series = m.series(project, route, up, status, stream)
        series.requests.add(1.0)
        series.duration.observe(duration)
        if ttfb:
            series.ttfb.observe(ttfb)
        if b_in:
            series.bytes_in.add(b_in)
        if b_out:
            series.bytes_out.add(b_out)
        if chunks and stream:
            series.chunks.add(chunks)
        for kind, count in tokens.items():
            series.tokens[kind].add(count)
    m.in_flight_now.add(1.0)
    m.in_flight_now.add(1.0)
    m.in_flight_now.add(-1.0)
    m.open_streams_now.add(1.0)


def _by_prometheus_client(m: Metrics) -> None:
    for project, route, up, status, stream, duration, ttfb, b_in, b_out, chunks, tokens in REQUESTS:
        flag = "true" if stream else "false"
        m.requests.labels(project, route, up, status_class(status), flag).inc()
        m.duration.labels(route).observe(duration)
        if ttfb:
            m.ttfb.labels(route).observe(ttfb)
        if b_in:
            m.bytes_in.labels(project, route).inc(b_in)
        if b_out:
            m.bytes_out.labels(project, route).inc(b_out)
        if chunks and stream:
            m.chunks.labels(route).inc(chunks)
        for kind, count in tokens.items():
            m.tokens.labels(project, route, up, kind).inc(count)
    m.in_flight.inc()
    m.in_flight.inc()
    m.in_flight.dec()
    m.open_streams.inc()


def test_tallies_expose_exactly_what_inc_and_observe_would() -> None:
    tallied, reference = Metrics(), Metrics()
    for _ in range(3):  # the second and third rounds go through the bound series
        _by_tallies(tallied)
        _by_prometheus_client(reference)
    assert _exposition(tallied) == _exposition(reference)
    assert 'zrproxy_requests_total{project="acme"' in "\n".join(_exposition(tallied))


def test_a_series_appears_only_once_it_has_counted() -> None:
    m = Metrics()
    m.series("acme", "r1", "mock", 200, False).requests.add(1.0)
    text = "\n".join(_exposition(m))
    assert "zrproxy_requests_total{" in text
    for unused in (
        "zrproxy_request_bytes_total{",
        "zrproxy_tokens_total{",
        "zrproxy_time_to_first_byte_seconds_bucket{",
    ):
        assert unused not in text


def test_a_request_kind_is_bound_once() -> None:
    m = Metrics()
    first = m.series("acme", "r1", "mock", 200, True)
    first.bytes_in.add(5)
    assert m.series("acme", "r1", "mock", 204, True) is first  # the same status class
    assert m.series("acme", "r1", "mock", 200, False) is not first
    # Once bound, the placeholder is gone: the slot holds a plain tally on the child.
    assert type(first.bytes_in) is Tally
    assert type(first.duration) is Spread


def test_single_process_tallies_skip_the_lock_on_prometheus_clients_value() -> None:
    m = Metrics()
    child = m.requests.labels("acme", "r1", "mock", "2xx", "false")
    assert type(child._value) is MutexValue
    counter = tally(child)
    counter.add(2.0)
    assert child._value.get() == 2.0
    assert type(counter) is Tally


def test_multiprocess_tallies_write_every_add_to_the_process_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The value class prometheus-client uses when PROMETHEUS_MULTIPROC_DIR is set
    # (chosen at its import, so built here by hand, as `values.ValueClass` is).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    mmaped = values.MultiProcessValue(lambda: 4242)
    labels = ("project", "route")
    value = mmaped("counter", "zrproxy_t", "zrproxy_t_total", labels, ("acme", "r1"), "doc")
    counter = _tally(value)
    assert type(counter).__name__ == "_FileTally"
    for amount in (1.0, 2.0, 0.5):
        counter.add(amount)
    # What the supervisor's MultiProcessCollector reads: the file, right after the add.
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    assert registry.get_sample_value("zrproxy_t_total", {"project": "acme", "route": "r1"}) == 3.5
    assert value.get() == 3.5
    values.close_all_multiprocess_files()  # type: ignore[no-untyped-call]
