"""deploy/prometheus: the alert rules use only the spec's metrics, labels and label values,
each alert is shown firing and silent by alerts_test.yaml, and promtool (skipped with the
reason when missing) accepts the rules and runs their unit tests, which can fail."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from tests.deploy_support import (
    ALERTS,
    ALERTS_TEST,
    load_yaml_docs,
    promql_problems,
    run_promtool,
)


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml_docs(ALERTS)[0]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promql_checker_catches_mistakes() -> None:
    assert promql_problems('sum by (route) (rate(zrproxy_failovers_total{route="a"}[5m]))') == []
    assert promql_problems("rate(zrproxy_request_total[5m])") == [
        "unknown metric zrproxy_request_total"
    ]
    assert promql_problems('zrproxy_requests_total{status="5xx"}') == [
        "zrproxy_requests_total has no label status"
    ]
    assert promql_problems('zrproxy_rejections_total{reason="oversize"}')
    assert promql_problems("sum by (project) (zrproxy_failovers_total)")
    assert promql_problems('zrproxy_open_streams{project=~"$project"}')


def test_alerts_use_only_spec_metrics() -> None:
    for rule in alert_rules():
        assert promql_problems(rule["expr"]) == [], rule["alert"]


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.keys() >= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"].strip()
        assert rule["annotations"]["description"].strip()
    exprs = " ".join(re.sub(r"\s+", "", r["expr"]) for r in rules)
    for needle in (
        'zrproxy_requests_total{status_class="5xx"}',
        "zrproxy_upstream_errors_total",
        "zrproxy_failovers_total",
        "histogram_quantile(0.99,",
        "zrproxy_time_to_first_byte_seconds_bucket",
        "zrproxy_in_flight_requests",
        "zrproxy_open_streams",
        'zrproxy_rejections_total{reason="size"}',
        'up{job="zrproxy"}==0',
    ):
        assert needle in exprs, f"no alert covers {needle}"


def test_every_alert_has_firing_and_silent_cases() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml_docs(ALERTS_TEST)[0]["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown staying silent"


def test_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout + out.stderr


def test_promtool_test_rules() -> None:
    out = run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules_can_fail(tmp_path: Path) -> None:
    # The unit tests must notice a broken rule: compare 5xx against a class that never exists.
    shutil.copy(ALERTS_TEST, tmp_path)
    broken = ALERTS.read_text(encoding="utf-8").replace('status_class="5xx"', 'status_class="6xx"')
    (tmp_path / ALERTS.name).write_text(broken, encoding="utf-8")
    out = run_promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert out.returncode != 0
    assert "ZrproxyHighErrorRatio" in out.stdout + out.stderr
