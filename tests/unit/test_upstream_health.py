"""Upstream health lines: a start, rate-limited summaries, a recovery; names and counts only."""

from __future__ import annotations

import logging

import pytest

from zrproxy.upstream_health import UpstreamHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records if r.name == "zrproxy.upstreams"]
    caplog.clear()
    return out


def test_failing_then_summaries_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    health = UpstreamHealth(clock, quiet_s=60)
    health.succeeded("a")  # healthy upstreams log nothing
    assert lines(caplog) == []
    health.failed("a", "connect")
    assert lines(caplog) == ["upstream a is failing (connect)"]
    for _ in range(99):  # a burst inside the quiet period: no more lines
        clock.now += 0.1
        health.failed("a", "status_5xx")
    assert lines(caplog) == []
    clock.now += 60
    health.failed("a", "connect")
    assert lines(caplog) == ["upstream a still failing: 101 failures (connect 2, status_5xx 99)"]
    health.failed("b", "timeout")  # each upstream on its own
    assert lines(caplog) == ["upstream b is failing (timeout)"]
    health.succeeded("a")
    assert lines(caplog) == ["upstream a recovered after 101 failures"]
    health.succeeded("a")
    assert lines(caplog) == []
    health.failed("a", "reset")  # a new episode starts with a new line
    assert lines(caplog) == ["upstream a is failing (reset)"]
