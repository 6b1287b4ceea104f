"""The deployment artefacts under deploy/: Kubernetes, Prometheus, Grafana, systemd, Docker.

Checks the files offline against each other, against the shared spec and against
zrproxy's own config parser. The external tools they drive (promtool, systemd-analyze,
kubectl) skip with the reason when missing; nothing here touches the network beyond
127.0.0.1.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.request
import zipfile
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from tests.processes import LoggedProcess
from zrproxy.config import ServerConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DASHBOARD = DEPLOY / "grafana" / "zrproxy-dashboard.json"
UNIT = DEPLOY / "systemd" / "zrproxy.service"
DOCKERFILE = DEPLOY / "Dockerfile"

# The oldest Kubernetes minor we claim to support, and the newest schema set that
# kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
PATCH_FILES = {"mlock-patch.yaml"}
MISSING_PROMTOOL = "promtool not installed (Debian package `prometheus`; `make system-deps`)"

# The metrics of the shared interface spec (its "Metrics" section): name -> (type, label names).
# TODO: read these from zrproxy.metrics (now that the module exists) instead of the spec;
# until then test_spec_metrics_match_zrproxy_metrics keeps the two in step.
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "zrproxy_requests_total": (
        "counter",
        frozenset({"project", "route", "upstream", "status_class", "stream"}),
    ),
    "zrproxy_request_duration_seconds": ("histogram", frozenset({"route"})),
    "zrproxy_time_to_first_byte_seconds": ("histogram", frozenset({"route"})),
    "zrproxy_request_bytes_total": ("counter", frozenset({"project", "route"})),
    "zrproxy_response_bytes_total": ("counter", frozenset({"project", "route"})),
    "zrproxy_stream_chunks_total": ("counter", frozenset({"route"})),
    "zrproxy_tokens_total": ("counter", frozenset({"project", "route", "type"})),
    "zrproxy_upstream_errors_total": ("counter", frozenset({"upstream", "kind"})),
    "zrproxy_failovers_total": ("counter", frozenset({"route"})),
    "zrproxy_client_aborts_total": ("counter", frozenset({"route"})),
    "zrproxy_rejections_total": ("counter", frozenset({"reason"})),
    "zrproxy_in_flight_requests": ("gauge", frozenset()),
    "zrproxy_open_streams": ("gauge", frozenset()),
    "zrproxy_client_errors_total": ("counter", frozenset({"kind"})),
    "zrproxy_limits_backend": ("gauge", frozenset({"backend"})),
    "zrproxy_refused_accepts_total": ("counter", frozenset()),
}
# Closed label value sets from the spec (1xx: zrproxy.metrics.STATUS_CLASSES has it too).
LABEL_ENUMS = {
    "status_class": {"1xx", "2xx", "3xx", "4xx", "5xx"},
    "stream": {"true", "false"},
    "type": {"prompt", "completion"},
    "kind": {"connect", "timeout", "status_429", "status_5xx", "reset"},
    "reason": {
        "auth",
        "model",
        "size",
        "malformed",
        "not_found",
        "method",
        "draining",
        "region",
    },
}
# Labels Prometheus (and the Prometheus Operator) attach to every scraped series.
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
)


def series_labels() -> dict[str, frozenset[str]]:
    """Every series name the spec's metrics expose, with the labels each series carries."""
    out: dict[str, frozenset[str]] = {"up": frozenset()}
    for name, (kind, labels) in SPEC_METRICS.items():
        if kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = labels
            out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


SERIES = series_labels()
_METRIC_TOKEN = re.compile(r"\b(zrproxy_\w+|up)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def promql_problems(expr: str) -> list[str]:
    """What in `expr` does not fit the spec: unknown series, labels or enum values."""
    problems: list[str] = []
    used: set[str] = set()
    for match in _METRIC_TOKEN.finditer(expr):
        name, selector = match.group(1), match.group(2)
        if name not in SERIES:
            problems.append(f"unknown metric {name}")
            continue
        used.add(name)
        allowed = SERIES[name] | TARGET_LABELS
        for matcher in filter(None, (selector or "{}")[1:-1].split(",")):
            parsed = _MATCHER.fullmatch(matcher)
            if parsed is None:
                problems.append(f"unparsed matcher {matcher!r} on {name}")
                continue
            label, op, value = parsed.groups()
            if label not in allowed:
                problems.append(f"{name} has no label {label}")
            elif op == "=" and label in LABEL_ENUMS and value not in LABEL_ENUMS[label]:
                problems.append(f"{label}={value!r} is not one of {sorted(LABEL_ENUMS[label])}")
    grouping_allowed = TARGET_LABELS.union(*(SERIES[n] for n in used)) if used else TARGET_LABELS
    for group in _GROUPING.finditer(expr):
        for label in filter(None, (part.strip() for part in group.group(1).split(","))):
            if label not in grouping_allowed:
                problems.append(f"grouping by {label}, which none of {sorted(used)} has")
    return problems


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def k8s_resources() -> list[dict[str, Any]]:
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load_yaml_docs(K8S / name)]


def only(kind: str, resources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [r for r in (resources or k8s_resources()) if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def example_config() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads(only("ConfigMap")["data"]["config.toml"])
    return data


def zrproxy_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    named = [c for c in containers if c["name"] == "zrproxy"]
    assert len(named) == 1
    container: dict[str, Any] = named[0]
    return container


def require_tool(name: str, reason: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(reason)
    return path


# --- Kubernetes ------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml_docs(K8S / "kustomization.yaml")[0]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - PATCH_FILES
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    text = (K8S / "kustomization.yaml").read_text(encoding="utf-8")
    assert "mlock-patch.yaml" in text, "the mlock variant must be discoverable from here"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_offline(version: str) -> None:
    checked = 0
    for doc in k8s_resources():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            with pytest.raises(SchemaNotFoundError):  # validated by hand below
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 5


def test_validation_rejects_a_broken_manifest() -> None:
    deployment = only("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"
    ] = True  # misspelt: strict validation must refuse it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_configmap_config_parses_with_zrproxy() -> None:
    config = example_config()
    env_names = {u["api_key_env"] for u in config["upstreams"] if "api_key_env" in u}
    parsed = parse_config(config, {name: "placeholder" for name in env_names})
    assert (parsed.server.listen.host, parsed.server.listen.port) == ("0.0.0.0", 8080)
    assert (parsed.server.admin_listen.host, parsed.server.admin_listen.port) == ("0.0.0.0", 9090)
    assert parsed.server.mlock is False, "mlock needs mlock-patch.yaml; the base must not"


def test_deployment_security_context() -> None:
    deployment = only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = zrproxy_container(deployment)
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add"), "IPC_LOCK belongs in mlock-patch.yaml only"
    for level in (pod["securityContext"], sc):
        assert level["runAsNonRoot"] is True
        assert level["runAsUser"] == 10001
        assert level["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # preStop only waits for endpoint removal to propagate (the sleep action: no shell);
    # the drain itself is the proxy's, so the grace period must cover both.
    pre_stop = container["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop["sleep"]["seconds"] + 30
    for name in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][name].keys()


def test_deployment_writes_nothing_to_disk() -> None:
    deployment = only("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for volume in volumes.values():
        kinds = volume.keys() - {"name"}
        assert kinds in ({"configMap"}, {"emptyDir"}), f"unexpected volume {volume}"
        if "emptyDir" in volume:
            assert volume["emptyDir"]["medium"] == "Memory", "an emptyDir on disk retains data"
    mounts = {m["mountPath"]: m for m in zrproxy_container(deployment)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/etc/zrproxy"]["readOnly"] is True
    assert "configMap" in volumes[mounts["/etc/zrproxy"]["name"]]


def test_deployment_probes_ports_and_grace_period() -> None:
    deployment = only("Deployment")
    container = zrproxy_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9090}
    config = example_config()
    assert config["server"]["listen"].endswith(f":{ports['http']}")
    assert config["server"]["admin_listen"].endswith(f":{ports['admin']}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config["server"]["drain_timeout_s"]


def test_deployment_command_matches_image() -> None:
    container = zrproxy_container(only("Deployment"))
    assert container["command"] + container["args"] == dockerfile_cmd()


def test_api_keys_come_from_secrets() -> None:
    container = zrproxy_container(only("Deployment"))
    env = {e["name"]: e for e in container["env"]}
    wanted = {u["api_key_env"] for u in example_config()["upstreams"] if "api_key_env" in u}
    assert wanted, "the example config should show api_key_env"
    for name in wanted:
        assert set(env[name]) == {"name", "valueFrom"}, f"{name} must not be a literal value"
        assert "secretKeyRef" in env[name]["valueFrom"]
    assert all("value" not in e for e in container["env"]), "no literal env values at all"


def test_selectors_and_ports_line_up() -> None:
    resources = k8s_resources()
    deployment, service = only("Deployment", resources), only("Service", resources)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in zrproxy_container(deployment)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {n: p["port"] for n, p in service_ports.items()} == {"http": 8080, "admin": 9090}
    assert {p["targetPort"] for p in service_ports.values()} <= container_ports
    pdb = only("PodDisruptionBudget", resources)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = only("HorizontalPodAutoscaler", resources)
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2, "with one replica, a node drain is an outage"


def test_servicemonitor_scrapes_the_admin_port() -> None:
    resources = k8s_resources()
    monitor = only("ServiceMonitor", resources)
    service = only("Service", resources)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert endpoint["port"] in service_ports
        assert endpoint["port"] == "admin"
        assert endpoint["path"] == "/metrics"


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "kubectl not installed: cannot render the kustomization")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def test_kustomize_renders_the_base() -> None:
    rendered = kustomize(K8S)
    assert sorted(r["kind"] for r in rendered) == sorted(r["kind"] for r in k8s_resources())
    assert zrproxy_container(only("Deployment", rendered))["image"] == "zrproxy:0.1.0"


def test_mlock_patch_adds_only_ipc_lock(tmp_path: Path) -> None:
    overlay = tmp_path / "kubernetes"
    shutil.copytree(K8S, overlay)
    with (overlay / "kustomization.yaml").open("a", encoding="utf-8") as f:
        f.write("patches:\n  - path: mlock-patch.yaml\n")
    deployment = only("Deployment", kustomize(overlay))
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    sc = zrproxy_container(deployment)["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    # Kubernetes grants no ambient capabilities, so only UID 0 can hold IPC_LOCK.
    assert (sc["runAsUser"], sc["runAsNonRoot"]) == (0, False)


# --- Prometheus rules ------------------------------------------------------------------


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


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", MISSING_PROMTOOL)
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


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


# --- Grafana ----------------------------------------------------------------------------


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
        used |= {m.group(1) for m in _METRIC_TOKEN.finditer(expr)}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert set(SPEC_METRICS) <= shown, f"metrics without a panel: {set(SPEC_METRICS) - shown}"


def test_dashboard_filters_follow_the_variables() -> None:
    for expr in dashboard_exprs():
        for match in _METRIC_TOKEN.finditer(expr):
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


# --- the spec list against the implementation ----------------------------------------


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


# --- Docker -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "dangling line continuation"
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def dockerfile_cmd() -> list[str]:
    cmds = [args for ins, args in final_stage() if ins == "CMD"]
    assert len(cmds) == 1
    cmd: list[str] = json.loads(cmds[0])
    return cmd


def test_dockerfile_image_shape() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final = final_stage()
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    env = " ".join(a for ins, a in final if ins == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    users = [a for ins, a in final if ins == "USER"]
    assert users == ["10001:10001"], "a numeric non-root USER lets kubelet check runAsNonRoot"
    assert (
        int(users[0].split(":")[0])
        == zrproxy_container(only("Deployment"))["securityContext"]["runAsUser"]
    )
    assert [a for ins, a in final if ins == "EXPOSE"] == ["8080 9090"]
    assert dockerfile_cmd() == ["zrproxy", "serve", "--config", "/etc/zrproxy/config.toml"]
    for ins, a in instructions:
        if ins == "RUN" and "pip install" in a:
            assert "--no-cache-dir" in a


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allowlist: ignore everything, then re-include"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert {"pyproject.toml", "zrproxy", project["readme"]} <= included


def test_docker_context_builds_a_wheel_with_the_cmd(tmp_path: Path) -> None:
    # What the image's `pip install .` sees: the files the allowlist re-includes.
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling not installed here: cannot build offline")
    context = tmp_path / "context"
    context.mkdir()
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        if line.startswith("!") and (ROOT / line[1:]).exists():
            source = ROOT / line[1:].rstrip("/")
            if source.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(source, context / source.name, ignore=ignore)
            else:
                shutil.copy(source, context)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    dist = tmp_path / "dist"
    out = subprocess.run(
        [*pip_wheel, *offline, "-w", str(dist), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = dist.glob("zrproxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "zrproxy/cli.py" in names
    assert re.search(r"^zrproxy = zrproxy\.cli:run$", scripts, re.MULTILINE), scripts
    assert dockerfile_cmd()[0] == "zrproxy"


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared with the test on purpose

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[tuple[int, type[_StatusHandler]]]:
    handler = type("Handler", (_StatusHandler,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_dockerfile_healthcheck_runs(status_server: tuple[int, type[_StatusHandler]]) -> None:
    port, handler = status_server
    checks = [a for ins, a in final_stage() if ins == "HEALTHCHECK"]
    assert len(checks) == 1
    exec_form = checks[0].split(" CMD ", 1)[1]
    command = json.loads(exec_form)
    assert command[:2] == ["python", "-c"], "slim has no curl; the check must use python"
    code = command[2]
    assert "http://127.0.0.1:9090/healthz" in code
    local = code.replace("127.0.0.1:9090", f"127.0.0.1:{port}")

    def run() -> int:
        env = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}
        return subprocess.run(
            [sys.executable, "-c", local], capture_output=True, timeout=30, env=env, check=False
        ).returncode

    assert run() == 0
    assert handler.paths == ["/healthz"]
    handler.status = 503
    assert run() == 1
    handler.status = 200
    local = code.replace("127.0.0.1:9090", "127.0.0.1:1")  # nothing listens there
    assert run() == 1


# --- systemd ----------------------------------------------------------------------------


def unit_settings() -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment in the unit, duplicates kept."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def test_unit_hardening_settings() -> None:
    settings = unit_settings()
    service = {key: value for section, key, value in settings if section == "Service"}
    expected = {
        "ExecStart": "/usr/local/bin/zrproxy serve --config /etc/zrproxy/config.toml",
        "LimitCORE": "0",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "AmbientCapabilities": "CAP_IPC_LOCK",
        "CapabilityBoundingSet": "CAP_IPC_LOCK",
        "LimitMEMLOCK": "infinity",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "UMask": "0077",
        "DynamicUser": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/zrproxy/")
    assert service["MemoryDenyWriteExecute"] in ("yes", "no"), "decide it explicitly"
    # PrivateUsers= would leave CAP_IPC_LOCK powerless in the host user namespace.
    assert "PrivateUsers" not in service
    assert float(service["TimeoutStopSec"]) > ServerConfig().drain_timeout_s


def stub_unit(tmp_path: Path, unit_text: str) -> Path:
    """`unit_text` with /usr/local/bin/zrproxy pointing at an executable stub in tmp_path.

    systemd-analyze verify fails a unit whose ExecStart binary does not exist, and this
    machine has no /usr/local/bin/zrproxy; everything else is verified as shipped.
    """
    stub = tmp_path / "zrproxy"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert unit_text.count("/usr/local/bin/zrproxy") >= 2
    path = tmp_path / "zrproxy.service"
    path.write_text(unit_text.replace("/usr/local/bin/zrproxy", str(stub)))
    return path


def systemd_verify(path: Path) -> subprocess.CompletedProcess[str]:
    analyze = require_tool("systemd-analyze", "systemd-analyze not installed")
    env = {**os.environ, "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [analyze, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.fixture
def verify_works(tmp_path: Path) -> None:
    """Skip unless systemd-analyze verify passes a trivial unit (it needs no running systemd)."""
    control = tmp_path / "control"
    control.mkdir()
    unit = "[Service]\nExecStartPre=/usr/local/bin/zrproxy x\nExecStart=/usr/local/bin/zrproxy\n"
    out = systemd_verify(stub_unit(control, unit))
    if out.returncode != 0 or out.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run here: {out.stderr.strip()[:300]}")


@pytest.mark.usefixtures("verify_works")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    out = systemd_verify(stub_unit(tmp_path, UNIT.read_text(encoding="utf-8")))
    # verify exits 0 on unknown keys ("ignoring"), so any message at all is a failure.
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@pytest.mark.usefixtures("verify_works")
def test_systemd_analyze_verify_as_shipped() -> None:
    out = systemd_verify(UNIT)
    if Path("/usr/local/bin/zrproxy").exists():
        assert (out.returncode, out.stderr) == (0, "")
        return
    # Without the binary installed the only complaint may be that it is missing.
    complaints = [line for line in out.stderr.splitlines() if line.strip()]
    assert complaints, "verify should notice that /usr/local/bin/zrproxy is missing"
    for line in complaints:
        assert "/usr/local/bin/zrproxy is not executable" in line, line


@pytest.mark.usefixtures("verify_works")
def test_systemd_analyze_verify_can_fail(tmp_path: Path) -> None:
    text = UNIT.read_text(encoding="utf-8").replace("ProtectHome=yes", "ProtectHomes=yes")
    out = systemd_verify(stub_unit(tmp_path, text))
    assert "Unknown key 'ProtectHomes'" in out.stderr, out.stderr


def test_systemd_security_exposure(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd-analyze not installed")
    path = stub_unit(tmp_path, UNIT.read_text(encoding="utf-8"))
    out = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "offline" in out.stderr and "unrecognized" in out.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    assert overall is not None, out.stdout + out.stderr
    assert float(overall.group(1)) <= 2.0, out.stdout
    assert out.returncode == 0


# --- MemoryDenyWriteExecute=yes, proved on the real process ---------------------------

# The seccomp rule systemd installs for MemoryDenyWriteExecute=yes on x86-64 (systemd
# 252's seccomp_memory_deny_write_execute): EPERM for mmap with PROT_WRITE|PROT_EXEC,
# mprotect/pkey_mprotect adding PROT_EXEC, and shmat with SHM_EXEC. The wrapper installs
# it, proves it bites with a W+X mapping, then execs the command (filters survive exec).
MDWE_WRAPPER = r"""
import ctypes, mmap, os, struct, sys
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, DENY = 0x7FFF0000, 0x00050000 | 1
AUDIT_ARCH_X86_64, ARG2 = 0xC000003E, 16 + 2 * 8
RULES = [(9, 6), (10, 4), (329, 4), (30, 0o100000)]  # mmap, mprotect, pkey_mprotect, shmat
prog = [(LD, 0, 0, 4), (JEQ, 0, 6 * len(RULES), AUDIT_ARCH_X86_64)]
for nr, mask in RULES:
    prog += [(LD, 0, 0, 0), (JEQ, 0, 4, nr), (LD, 0, 0, ARG2), (AND, 0, 0, mask),
             (JEQ, 0, 1, mask), (RET, 0, 0, DENY)]
prog.append((RET, 0, 0, ALLOW))
raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
buf = ctypes.create_string_buffer(raw, len(raw))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit("no_new_privs failed")
if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
    sys.exit("seccomp failed: errno %d" % ctypes.get_errno())
mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE).close()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    print("mdwe: W+X mapping refused", file=sys.stderr, flush=True)
else:
    sys.exit("mdwe: W+X mapping was allowed")
if len(sys.argv) > 1:
    os.execv(sys.argv[1], sys.argv[1:])
"""

needs_x86_64 = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the MemoryDenyWriteExecute filter here is written for Linux x86-64",
)


@needs_x86_64
def test_mdwe_filter_refuses_write_execute_memory() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "W+X mapping refused" in out.stderr


def cli_available() -> bool:
    return importlib.util.find_spec("zrproxy.cli") is not None


@needs_x86_64
@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("flags", [[], ["--scrub-memory"]], ids=["default", "scrub-memory"])
def test_proxy_serves_under_memory_deny_write_execute(tmp_path: Path, flags: list[str]) -> None:
    if not cli_available():
        pytest.skip("zrproxy.cli not available yet")
    env = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}
    key = "zrp-" + secrets.token_urlsafe(24)
    mock = LoggedProcess(
        [sys.executable, "-m", "zrproxy", "mock-upstream", "--listen", "127.0.0.1:0"]
    )
    proxy: LoggedProcess | None = None
    try:
        base = mock.wait_for(r"mock upstream listening on (http://\S+)").group(1)
        config = tmp_path / "config.toml"
        config.write_text(
            "[server]\n"
            'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\ndrain_timeout_s = 5\n'
            f'[[upstreams]]\nname = "mock"\nkind = "openai"\nbase_url = "{base}/v1"\n'
            '[[routes]]\nmodel = "*"\nupstreams = ["mock"]\n'
            f'[[projects]]\nname = "mdwe"\nkey_sha256 = ["{sha256(key.encode()).hexdigest()}"]\n'
        )
        argv = [sys.executable, "-m", "zrproxy", "serve", "--config", str(config), *flags]
        proxy = LoggedProcess([sys.executable, "-c", MDWE_WRAPPER, *argv], env=env)
        proxy.wait_for("W\\+X mapping refused")
        api = proxy.wait_for(r"zrproxy ready: api=(http://\S+) admin=(http://\S+)").group(1)
        body = json.dumps(
            {
                "model": "mock-n8",
                "stream": True,
                "messages": [{"role": "user", "content": "hello"}],
            }
        ).encode()
        request = urllib.request.Request(
            f"{api}/v1/chat/completions",
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            assert response.status == 200
            streamed = response.read()
        assert b"data: [DONE]" in streamed
        assert proxy.stop() == 0, proxy.output()
    finally:
        if proxy is not None:
            proxy.stop()
        mock.stop()
