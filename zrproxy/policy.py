"""The privacy policy as this config enforces it, in data and in plain words.

Builds the report of `zrproxy policy`, the admin listener's `GET /policy` and a
customer's `GET /v1/policy` (that project's part only), and the config warnings of
`check-config` and start-up. What is kept per request is read from the metric
definitions in `zrproxy.metrics` (the only per-request record the proxy keeps), not
written down twice. Never holds request content: everything here comes from the config.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable
from typing import Any

import orjson
from prometheus_client.metrics import MetricWrapperBase

from zrproxy.config import (
    Config,
    ProjectConfig,
    RouteConfig,
    UpstreamConfig,
    activation_dates,
    covering_subprocessor,
    glob_matcher,
    upstream_host,
)
from zrproxy.metrics import Metrics
from zrproxy.routing import route_access

Report = dict[str, Any]


def kept_per_request(metrics: Metrics) -> list[dict[str, Any]]:
    """Every metric the proxy updates per request: name, type, labels and meaning, read
    from the `Metrics` object's own definitions."""
    kept = []
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        kind = str(metric._type)
        name = metric._name + ("_total" if kind == "counter" else "")
        kept.append(
            {
                "metric": name,
                "type": kind,
                "labels": list(metric._labelnames),
                "meaning": metric._documentation,
            }
        )
    return kept


def recipient_fingerprint(recipient: str) -> str:
    """A short, stable name for an audit recipient key (it is public, but long)."""
    return "sha256:" + hashlib.sha256(recipient.encode()).hexdigest()[:16]


def _relevant(project: ProjectConfig, route: RouteConfig) -> bool:
    """Whether the project's model allowlist lets any request reach this route."""
    if not project.models:
        return True
    if glob_matcher(project.models)(route.model):
        return True
    matches = glob_matcher((route.model,))
    return any(matches(m) for m in project.models if not any(c in m for c in "*?["))


def _subprocessor_status(sub_since: datetime.date, today: datetime.date) -> str:
    return "current" if sub_since <= today else "announced"


def _upstream_entry(config: Config, upstream: UpstreamConfig, today: datetime.date) -> Report:
    sub = covering_subprocessor(config.subprocessors, upstream)
    return {
        "upstream": upstream.name,
        "host": upstream_host(upstream),
        "region": upstream.region,
        "zero_data_retention": upstream.zero_data_retention,
        "subprocessor": None
        if sub is None
        else {
            "name": sub.name,
            "location": sub.location,
            "since": sub.since.isoformat(),
            "status": _subprocessor_status(sub.since, today),
        },
        "request_overrides": dict(upstream.request_overrides),
        # Names only: a header value may be an account identifier.
        "header_overrides": sorted(upstream.header_overrides),
    }


def project_report(
    config: Config, project: ProjectConfig, metrics: Metrics, today: datetime.date
) -> Report:
    """One project's part of the policy: what a customer of that project may see."""
    routes = []
    for route in config.routes:
        if not _relevant(project, route):
            continue
        access = route_access(config, project, route)
        unavailable = None
        if not access.usable:
            unavailable = "zero_retention" if access.in_regions else "region"
        routes.append(
            {
                "route": route.name,
                "model": route.model,
                "upstreams": [_upstream_entry(config, u, today) for u in access.usable],
                "unavailable": unavailable,
            }
        )
    audit = project.audit_log
    return {
        "project": project.name,
        "zero_retention": project.zero_retention,
        "kept_per_request": kept_per_request(metrics),
        "audit_log": None
        if audit is None
        else {
            "recipient_fingerprint": recipient_fingerprint(audit.recipient),
            "retention_days": audit.retention_days,
        },
        "regions": list(project.regions) if project.regions is not None else None,
        "models": list(project.models) if project.models is not None else None,
        "routes": routes,
    }


def register_report(config: Config, today: datetime.date) -> list[Report]:
    return [
        {
            "name": s.name,
            "purpose": s.purpose,
            "location": s.location,
            "hosts": list(s.hosts),
            "since": s.since.isoformat(),
            "status": _subprocessor_status(s.since, today),
        }
        for s in config.subprocessors
    ]


def report(
    config: Config, metrics: Metrics, today: datetime.date, project: str | None = None
) -> Report:
    """The whole policy (or one project's part of it) as JSON-ready data."""
    projects = [p for p in config.projects if project is None or p.name == project]
    return {
        "date": today.isoformat(),
        "register_kept": bool(config.subprocessors),
        "subprocessors": register_report(config, today),
        "projects": [project_report(config, p, metrics, today) for p in projects],
    }


def to_json(data: Report) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_INDENT_2)


# --- in plain words ----------------------------------------------------------------------


def _overrides_text(entry: Report) -> str:
    body = ", ".join(
        f"{k} = {orjson.dumps(v).decode()}" for k, v in entry["request_overrides"].items()
    )
    headers = ", ".join(entry["header_overrides"])
    return f"body fields set: {body or 'none'}; headers set: {headers or 'none'}"


def _upstream_text(entry: Report) -> str:
    sub = entry["subprocessor"]
    if sub is None:
        who = "no subprocessor entry (no register kept)"
    elif sub["status"] == "current":
        who = f"subprocessor {sub['name']} ({sub['location']}), in use since {sub['since']}"
    else:
        who = f"subprocessor {sub['name']} ({sub['location']}), announced: used from {sub['since']}"
    zdr = "keeps nothing" if entry["zero_data_retention"] else "may retain data"
    region = entry["region"] or "no region"
    return (
        f"{entry['upstream']} at {entry['host']}, {region}; provider contract: {zdr}; "
        f"{who}; {_overrides_text(entry)}"
    )


def _project_text(p: Report) -> Iterable[str]:
    yield f"Project {p['project']}"
    if p["zero_retention"]:
        yield (
            "  Zero retention: on. Prompts and completions stay in memory for the request"
            " only; only upstreams whose contract keeps nothing serve it; chat and"
            " responses bodies go out with store: false (to OpenAI; Azure OpenAI stores"
            " nothing unless asked and gets no store field); requests that ask a provider to"
            " keep state are refused."
        )
    else:
        yield "  Zero retention: off. Upstreams that may retain data can serve this project."
    audit = p["audit_log"]
    if audit is None:
        yield "  Content audit log: none. No prompt or completion is written anywhere."
    else:
        yield (
            "  Content audit log: on. Request and response bodies are written encrypted to"
            f" the project's key {audit['recipient_fingerprint']}, deleted after"
            f" {audit['retention_days']} days."
        )
    regions = p["regions"]
    yield "  Regions: " + (", ".join(regions) if regions else "any") + "."
    yield "  Kept per request, as counters summed over all requests (no per-request record):"
    for m in p["kept_per_request"]:
        labels = "by " + ", ".join(m["labels"]) if m["labels"] else "no labels"
        yield f"    - {m['metric']} ({m['type']}; {labels}): {m['meaning']}"
    yield "  Where its requests can go:"
    for route in p["routes"]:
        yield f"    route {route['route']} (model {route['model']}):"
        if route["unavailable"] == "zero_retention":
            yield "      - nowhere: no upstream in its regions keeps nothing (403)"
        elif route["unavailable"] == "region":
            yield "      - nowhere: no upstream in its regions (503)"
        for entry in route["upstreams"]:
            yield f"      - {_upstream_text(entry)}"


def to_text(data: Report) -> str:
    lines: list[str] = [f"zrproxy privacy policy, as configured (on {data['date']}, UTC)", ""]
    for p in data["projects"]:
        lines += [*_project_text(p), ""]
    lines.append("Subprocessor register")
    if not data["register_kept"]:
        lines.append("  None is kept in this config ([[subprocessors]]).")
    for status, title in (("current", "Current"), ("announced", "Announced")):
        entries = [s for s in data["subprocessors"] if s["status"] == status]
        if entries:
            lines.append(f"  {title}:")
        for s in entries:
            when = "since" if status == "current" else "used from"
            lines.append(
                f"    - {s['name']}: {s['purpose']}; {s['location']};"
                f" hosts {', '.join(s['hosts'])}; {when} {s['since']}"
            )
    return "\n".join(lines) + "\n"


# --- what check-config and start-up say ----------------------------------------------------


def policy_warnings(config: Config, today: datetime.date | None = None) -> list[str]:
    """Every project and route that can never be served, naming both and the key to set;
    routes only announced subprocessors serve (until when, given `today`); and a
    missing subprocessor register."""
    warnings: list[str] = []
    starts = activation_dates(config)
    index = {u.name: i for i, u in enumerate(config.upstreams)}
    for i, project in enumerate(config.projects):
        for route in config.routes:
            if not _relevant(project, route):
                continue
            access = route_access(config, project, route)
            if access.usable:
                first = min(starts[u.name] for u in access.usable)
                if today is not None and first > today:
                    warnings.append(
                        f"project '{project.name}' cannot be served by route '{route.name}'"
                        f" before {first.isoformat()}: its upstreams' subprocessors are only"
                        " announced until then ([[subprocessors]] since)"
                    )
                continue
            if access.in_regions:
                keys = " or ".join(
                    f"upstreams[{index[u.name]}].zero_data_retention"
                    for u, why in access.excluded
                    if why == "zero_retention"
                )
                warnings.append(
                    f"project '{project.name}' can never be served by route '{route.name}':"
                    " the project has zero retention and no upstream of the route in its"
                    f" regions declares zero_data_retention = true; set {keys} = true where"
                    " the provider's contract keeps nothing, or"
                    f" projects[{i}].zero_retention = false"
                )
            else:
                warnings.append(
                    f"project '{project.name}' can never be served by route '{route.name}':"
                    f" none of the route's upstreams is in projects[{i}].regions; set"
                    f" [[upstreams]] region on one of them, or add its region to"
                    f" projects[{i}].regions"
                )
    if not config.subprocessors:
        warnings.append(
            "no subprocessor register is kept: add [[subprocessors]] entries covering"
            " every upstream's base_url host"
        )
    return warnings


def register_lines(config: Config, today: datetime.date) -> list[str]:
    """When each subprocessor is, or becomes, active (for check-config)."""
    lines = []
    for s in config.subprocessors:
        if s.since <= today:
            lines.append(f"  subprocessor '{s.name}': active since {s.since.isoformat()}")
        else:
            lines.append(
                f"  subprocessor '{s.name}': announced, becomes active on {s.since.isoformat()}"
                " (its upstreams are not used before)"
            )
    return lines
