"""deploy/grafana: the dashboard's structure, its queries use only (and show all of) the
spec's metrics, follow the $project/$route variables, and are valid PromQL to promtool."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy_support import (
    DASHBOARD,
    METRIC_TOKEN,
    SERIES,
    SPEC_METRICS,
    promql_problems,
    run_promtool,
)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def test_dashboard_structure() -> None:
    data = dashboard()
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"] and data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("project", "route"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"empty expr in {panel['title']!r}"
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_uses_only_spec_metrics_and_shows_them_all() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs():
        assert promql_problems(expr) == [], expr
        used |= {m.group(1) for m in METRIC_TOKEN.finditer(expr)}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert set(SPEC_METRICS) <= shown, f"metrics without a panel: {set(SPEC_METRICS) - shown}"


def test_dashboard_filters_follow_the_variables() -> None:
    for expr in dashboard_exprs():
        for match in METRIC_TOKEN.finditer(expr):
            labels = SERIES[match.group(1)]
            selector = match.group(2) or ""
            if "route" in labels and match.group(1) != "zrproxy_upstream_errors_total":
                assert 'route=~"$route"' in selector, expr
            if "project" in labels:
                assert 'project=~"$project"' in selector, expr


def substitute_variables(expr: str) -> str:
    """The expr as Grafana would send it with every variable at "All"."""
    return expr.replace("$__rate_interval", "1m").replace("$project", ".*").replace("$route", ".*")


def test_dashboard_exprs_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"zrproxy_dashboard:panel{i}", "expr": substitute_variables(expr)}
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_promtool("check", "rules", path.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
