"""Warnings about a valid config: settings that are legal but almost certainly a mistake.

Owns the heuristics `check-config` (and `serve`, at start) report. Like config errors, a
warning names the key path and never prints a value that could be a secret.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

from zrproxy.config import Config, ProjectConfig, RouteConfig

# Hosts of the real providers: requests there without a key can only fail.
PROVIDER_HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "openai.azure.com",
    "cognitiveservices.azure.com",
)
# What the proxy appends to base_url; a base_url already ending in one doubles it.
_ENDPOINT_SUFFIXES = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/messages",
    "/models",
)
# The version segment of an API path: /v1, /v2, /v1beta, ...
_VERSION_PATH = re.compile(r".*/v\d+[a-z0-9]*")
MAX_WORKERS = 64
WORKERS_PER_CPU = 4


class ConfigWarning(NamedTuple):
    key_path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.key_path}: {self.problem}"


def _overlap(a: str, b: str) -> bool:
    """Whether two model globs can match a common model (either matches the other as text).

    Exact for the usual shapes ("gpt-4o*" inside "gpt-*", a plain id inside a glob); two
    globs that only share models without either containing the other count as disjoint.
    """
    return fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a)


def _can_use(config: Config, project: ProjectConfig, route: RouteConfig) -> bool:
    if project.models is not None and not any(_overlap(g, route.model) for g in project.models):
        return False
    if project.regions is None:
        return True
    return any(config.upstream(name).region in project.regions for name in route.upstreams)


def _routes(config: Config) -> list[ConfigWarning]:
    found = []
    for i, route in enumerate(config.routes):
        for j, earlier in enumerate(config.routes[:i]):
            # The earlier glob matches this one's text: every model it could take is taken.
            if fnmatch.fnmatchcase(route.model, earlier.model):
                problem = f"never used: routes[{j}] ('{earlier.model}') matches first"
                found.append(ConfigWarning(f"routes[{i}].model", problem))
                break
        else:
            if not any(_can_use(config, p, route) for p in config.projects):
                problem = "no project can use this route (models or regions rule it out)"
                found.append(ConfigWarning(f"routes[{i}]", problem))
    return found


def _allowlists(config: Config) -> list[ConfigWarning]:
    found = []
    for i, project in enumerate(config.projects):
        for j, glob in enumerate(project.models or ()):
            if not any(_overlap(glob, route.model) for route in config.routes):
                problem = "no route serves a model this glob allows"
                found.append(ConfigWarning(f"projects[{i}].models[{j}]", problem))
    return found


def _upstreams(config: Config) -> list[ConfigWarning]:
    found = []
    for i, upstream in enumerate(config.upstreams):
        parts = urlsplit(upstream.base_url)
        path = parts.path.rstrip("/")
        key = f"upstreams[{i}].base_url"
        suffix = next((s for s in _ENDPOINT_SUFFIXES if path.endswith(s)), None)
        if upstream.kind == "azure_openai":
            if "/openai" in path:
                problem = (
                    "has an /openai path; for kind azure_openai it is the resource's "
                    "endpoint (https://RESOURCE.openai.azure.com): the proxy appends "
                    "/openai/deployments/DEPLOYMENT/..."
                )
                found.append(ConfigWarning(key, problem))
        elif suffix is not None:
            problem = f"ends with the endpoint path {suffix}; the proxy appends it itself"
            found.append(ConfigWarning(key, problem))
        elif not _VERSION_PATH.fullmatch(path):
            problem = (
                "has no API version path (such as /v1): requests would go to "
                "base_url + /chat/completions, /messages, ..."
            )
            found.append(ConfigWarning(key, problem))
        host = (parts.hostname or "").lower()
        if upstream.api_key_env is None and any(
            host == h or host.endswith("." + h) for h in PROVIDER_HOSTS
        ):
            problem = "a provider's API host without api_key_env: every request will be refused"
            found.append(ConfigWarning(f"upstreams[{i}]", problem))
        if parts.scheme == "http" and not _is_loopback(host):
            problem = "plain http:// to a host that is not loopback: prompts cross unencrypted"
            found.append(ConfigWarning(key, problem))
        if upstream.kind == "azure_openai" and "store" in upstream.request_overrides:
            problem = (
                "Azure OpenAI api-versions before stored completions reject 'store' "
                "(400 Unknown parameter), and Azure stores nothing unless asked: leave it out"
            )
            found.append(ConfigWarning(f"upstreams[{i}].request_overrides.store", problem))
        if upstream.kind == "anthropic" and upstream.request_overrides:
            problem = (
                "Anthropic's Messages API rejects unknown fields: every field here must be "
                "one it accepts, or each request fails with 400"
            )
            found.append(ConfigWarning(f"upstreams[{i}].request_overrides", problem))
    return found


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _server(config: Config, cpus: int) -> list[ConfigWarning]:
    server = config.server
    found = []
    if server.idle_timeout_s > server.total_timeout_s:
        problem = "is longer than server.total_timeout_s, which ends every request first"
        found.append(ConfigWarning("server.idle_timeout_s", problem))
    if server.first_byte_timeout_s > server.total_timeout_s:
        problem = "is longer than server.total_timeout_s, which ends every request first"
        found.append(ConfigWarning("server.first_byte_timeout_s", problem))
    if server.workers > MAX_WORKERS or server.workers > WORKERS_PER_CPU * cpus:
        problem = (
            f"{server.workers} worker processes for {cpus} CPUs: more than "
            f"{WORKERS_PER_CPU} per CPU (or {MAX_WORKERS} in all) only adds memory"
        )
        found.append(ConfigWarning("server.workers", problem))
    return found


def config_warnings(config: Config, cpus: int) -> list[ConfigWarning]:
    """Everything suspicious about `config` on a machine with `cpus` CPUs, in file order."""
    return [
        *_server(config, cpus),
        *_upstreams(config),
        *_routes(config),
        *_allowlists(config),
    ]
