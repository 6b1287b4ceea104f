"""The spec's metric list (tests/deploy_support.py: SPEC_METRICS), which the deploy/ tests
check the alerts and dashboard against, matches the metrics zrproxy.metrics registers."""

from __future__ import annotations

from tests.deploy_support import (
    SPEC_METRICS,
)


def test_spec_metrics_match_zrproxy_metrics() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from zrproxy.metrics import Metrics

    found: dict[str, tuple[str, frozenset[str]]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            # Private but long-stable attributes: a labelled metric shows its label names
            # nowhere else until a child exists.
            kind, name = metric._type, metric._name
            name += "_total" if kind == "counter" else ""
            found[name] = (kind, frozenset(metric._labelnames))
    assert found == SPEC_METRICS
