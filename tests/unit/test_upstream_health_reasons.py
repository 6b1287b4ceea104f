"""The one "log once" mechanism: a failure's reason (TLS, a wrong base_url, an egress
proxy refusing its credentials) is logged the first time per upstream and reason, next
to the failing/recovered episode lines."""

from __future__ import annotations

import logging

import pytest

from zrproxy.upstream_health import UpstreamHealth


def test_each_reason_is_logged_once_per_upstream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    health = UpstreamHealth(lambda: 0.0)
    for _ in range(3):
        health.failed("a", "tls", "TLS failed (certificate has expired)")
    health.failed("a", "tls", "TLS failed (hostname mismatch)")
    health.failed("b", "tls", "TLS failed (certificate has expired)")
    health.succeeded("a")
    health.failed("a", "tls", "TLS failed (certificate has expired)")  # a new episode
    assert [r.getMessage() for r in caplog.records] == [
        "upstream a is failing (tls)",
        "upstream a: TLS failed (certificate has expired)",
        "upstream a: TLS failed (hostname mismatch)",
        "upstream b is failing (tls)",
        "upstream b: TLS failed (certificate has expired)",
        "upstream a recovered after 4 failures",
        "upstream a is failing (tls)",
    ]
