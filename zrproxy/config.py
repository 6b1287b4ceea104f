"""The config's public face: `load_config`, `parse_config` (the checks across tables)
and, in `__all__`, every name other modules import from the config_* modules.

The config is TOML parsed into frozen dataclasses by an explicit parser, in layers:
`config_types` (the dataclasses, every key's type and default) <- `config_values`
(`_Table`, one value) <- `config_sections` (one table) <- this module; `config_derived`
answers questions about a parsed config. A mistake raises `ConfigError(key_path,
problem)`; the problem never quotes a value that could be a secret. This is the only
module that reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from zrproxy.config_derived import (
    activation_dates,
    covering_subprocessor,
    embedded_default,
    glob_matcher,
    is_glob,
    upstream_host,
)
from zrproxy.config_sections import (
    PLACEHOLDER_ENV,
    _audit,
    _limits,
    _project,
    _route,
    _server,
    _subprocessor,
    _upstream,
)
from zrproxy.config_types import (
    ALLOCATORS,
    LOG_FORMATS,
    OVERRIDE_ENDPOINTS,
    Address,
    Allocator,
    AuditConfig,
    AuditLogConfig,
    Config,
    LimitsConfig,
    LogFormat,
    ProjectConfig,
    RouteConfig,
    ServerConfig,
    SubprocessorConfig,
    UpstreamConfig,
)
from zrproxy.config_values import (
    _any,
    _Table,
    _tables,
    parse_address,
)
from zrproxy.errors import ConfigError, ConfigErrors

# The names other modules import: the config's public face is this module.
__all__ = [
    "ALLOCATORS",
    "LOG_FORMATS",
    "OVERRIDE_ENDPOINTS",
    "PLACEHOLDER_ENV",
    "Address",
    "Allocator",
    "AuditConfig",
    "AuditLogConfig",
    "Config",
    "LimitsConfig",
    "LogFormat",
    "ProjectConfig",
    "RouteConfig",
    "ServerConfig",
    "SubprocessorConfig",
    "UpstreamConfig",
    "activation_dates",
    "covering_subprocessor",
    "embedded_default",
    "export_metrics_dir",
    "glob_matcher",
    "is_glob",
    "load_config",
    "parse_address",
    "parse_config",
    "process_environment",
    "upstream_host",
]


def process_environment() -> Mapping[str, str]:
    """The process environment. zrproxy reads `os.environ` nowhere else
    (`export_metrics_dir` writes one variable); tests/unit/test_imports.py checks."""
    return os.environ


def export_metrics_dir(path: str) -> None:
    """Tell prometheus-client in processes started from now on where multiprocess
    metrics live (it reads PROMETHEUS_MULTIPROC_DIR before creating its first metric)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a TOML config file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        problem = f"cannot read file ({exc.strerror})"
    else:
        problem = ""
    if problem:
        raise ConfigError(str(path), problem)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # The decode error names a line and column, never the text.
        problem = f"not valid TOML ({_toml_position(exc)})"
    if problem:
        raise ConfigError(str(path), problem)
    return parse_config(data, process_environment() if environ is None else environ)


def _toml_position(exc: Exception) -> str:
    match = re.search(r"\(at (?:line \d+, column \d+|end of document)\)", str(exc))
    return match.group(0)[1:-1] if match else "encoding error"


T = TypeVar("T")


def _unique(path: str, names: list[str], what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{path}[{i}].{what}", f"duplicate {what} '{name}'")
        seen.add(name)


class _Collected:
    """The errors of one parse, from every table and every cross-check."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def table(self, table: _Table, parse: Callable[[_Table], T]) -> T | None:
        failure: ConfigError | None = None
        try:
            result: T | None = parse(table)
        except ConfigError as exc:
            failure, result = exc, None
        self.errors += table.errors
        if failure is not None:
            self.errors.append(failure)
        return result

    def check(self, check: Callable[[], None]) -> None:
        try:
            check()
        except ConfigError as exc:
            self.errors.append(exc)

    def about(self, key: str) -> bool:
        return any(e.key_path == key or e.key_path.startswith(key + "[") for e in self.errors)


def _as_written(data: Mapping[str, Any], key: str, field: str) -> set[str]:
    """`field` of the tables under `key` as written, parsed or not: a reference to a table
    that failed to parse is not a second mistake."""
    tables = data.get(key)
    if not isinstance(tables, list):
        return set()
    return {t[field] for t in tables if isinstance(t, dict) and isinstance(t.get(field), str)}


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Validate parsed TOML data; `environ` supplies upstream API keys.

    Raises one ConfigError, or ConfigErrors carrying every mistake found.
    """
    found = _Collected()
    top = _Table("", data)

    def tables(key: str, parse: Callable[[_Table], T]) -> list[T]:
        listed = top.take(key, _tables, [])
        found.errors += top.errors
        top.errors.clear()
        parsed = [found.table(t, parse) for t in listed]
        if not listed and not found.about(key):
            found.errors.append(ConfigError(key, f"at least one [[{key}]] is required"))
        return [p for p in parsed if p is not None]

    server: ServerConfig | None = None
    try:
        server_table = _Table("server", top.take("server", _any, {}))
    except ConfigError as exc:
        found.errors.append(exc)
    else:
        server = found.table(server_table, lambda t: _server(t, environ))
    upstreams = tables("upstreams", lambda t: _upstream(t, environ))
    found.check(lambda: _unique("upstreams", [u.name for u in upstreams], "name"))
    names = {u.name for u in upstreams} | _as_written(data, "upstreams", "name")
    routes = tables("routes", lambda t: _route(t, names))
    found.check(lambda: _unique("routes", [r.name for r in routes], "name"))
    projects = tables("projects", _project)
    found.check(lambda: _unique("projects", [p.name for p in projects], "name"))
    seen: dict[bytes, str] = {}
    for i, project in enumerate(projects):
        for j, digest in enumerate(project.key_sha256):
            if digest in seen:
                problem = f"key already belongs to '{seen[digest]}'"
                found.errors.append(ConfigError(f"projects[{i}].key_sha256[{j}]", problem))
            seen[digest] = project.name
    regions = {u.region for u in upstreams if u.region} | _as_written(data, "upstreams", "region")
    for i, project in enumerate(projects):
        for j, region in enumerate(project.regions or ()):
            if region not in regions:
                problem = f"no upstream in '{region}'"
                found.errors.append(ConfigError(f"projects[{i}].regions[{j}]", problem))
    listed = top.take("subprocessors", _tables, [])
    found.errors += top.errors
    top.errors.clear()
    parsed = [found.table(t, _subprocessor) for t in listed]
    subprocessors = [sub for sub in parsed if sub is not None]
    found.check(lambda: _unique("subprocessors", [s.name for s in subprocessors], "name"))
    audit: AuditConfig | None = None
    audit_table = top.take("audit", _any, None)
    if audit_table is not None:
        try:
            table = _Table("audit", audit_table)
        except ConfigError as exc:
            found.errors.append(exc)
        else:
            audit = found.table(table, _audit)
    for i, project in enumerate(projects):
        if project.audit_log is not None and audit is None and audit_table is None:
            found.errors.append(
                ConfigError(f"projects[{i}].audit_log", "needs an [audit] table with dir")
            )
    limits: LimitsConfig | None = None
    try:
        limits_table = _Table("limits", top.take("limits", _any, {}))
    except ConfigError as exc:
        found.errors.append(exc)
    else:
        limits = found.table(limits_table, _limits)
    top.finish()
    if subprocessors:
        for i, upstream in enumerate(upstreams):
            if covering_subprocessor(subprocessors, upstream) is None:
                found.errors.append(
                    ConfigError(
                        f"upstreams[{i}].base_url",
                        f"host of upstream '{upstream.name}' is in no [[subprocessors]] hosts",
                    )
                )
    found.errors += top.errors
    if found.errors:
        raise found.errors[0] if len(found.errors) == 1 else ConfigErrors(found.errors)
    assert server is not None and limits is not None
    return Config(
        server,
        tuple(upstreams),
        tuple(routes),
        tuple(projects),
        tuple(subprocessors),
        audit,
        limits,
    )
