"""What the deploy/ tests share: the artefacts' paths, the metrics of the shared spec
with a PromQL checker against them, and readers for the Kubernetes manifests and the
Dockerfile. The tests are tests/e2e/test_deploy_*.py, one file per artefact."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from zrproxy.errors import RejectReason
from zrproxy.metrics import TokenType, UpstreamErrorKind

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
    "zrproxy_tokens_total": ("counter", frozenset({"project", "route", "upstream", "type"})),
    "zrproxy_upstream_errors_total": ("counter", frozenset({"upstream", "kind"})),
    "zrproxy_failovers_total": ("counter", frozenset({"route"})),
    "zrproxy_client_aborts_total": ("counter", frozenset({"route"})),
    "zrproxy_rejections_total": ("counter", frozenset({"reason", "project", "route"})),
    "zrproxy_zero_retention_refusals_total": ("counter", frozenset({"field"})),
    "zrproxy_in_flight_requests": ("gauge", frozenset()),
    "zrproxy_open_streams": ("gauge", frozenset()),
    "zrproxy_audit_records_total": ("counter", frozenset({"project", "outcome"})),
    "zrproxy_project_info": ("gauge", frozenset({"project", "zero_retention", "audit_log"})),
    "zrproxy_build_info": ("gauge", frozenset({"version"})),
    "zrproxy_client_errors_total": ("counter", frozenset({"kind"})),
    "zrproxy_limits_backend": ("gauge", frozenset({"backend"})),
    "zrproxy_refused_accepts_total": ("counter", frozenset()),
    "zrproxy_accept_pauses_total": ("counter", frozenset()),
}
# Closed label value sets from the spec (1xx: zrproxy.metrics.STATUS_CLASSES has it too).
LABEL_ENUMS = {
    "status_class": {"1xx", "2xx", "3xx", "4xx", "5xx"},
    "outcome": {"written", "dropped_queue_full", "dropped_write_error"},
    "zero_retention": {"true", "false"},
    "audit_log": {"true", "false"},
    "stream": {"true", "false"},
    "type": set(get_args(TokenType)),
    "kind": set(get_args(UpstreamErrorKind)),
    "reason": set(get_args(RejectReason)),
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
METRIC_TOKEN = re.compile(r"\b(zrproxy_\w+|up)\b(\{[^}]*\})?")
_MATCHER = re.compile(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def promql_problems(expr: str) -> list[str]:
    """What in `expr` does not fit the spec: unknown series, labels or enum values."""
    problems: list[str] = []
    used: set[str] = set()
    for match in METRIC_TOKEN.finditer(expr):
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
    # kustomization.yaml's configMapGenerator makes the ConfigMap from this file.
    data: dict[str, Any] = tomllib.loads((K8S / "config.toml").read_text(encoding="utf-8"))
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


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool", MISSING_PROMTOOL)
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


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
