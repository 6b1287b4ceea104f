"""The config: TOML parsed into frozen dataclasses by an explicit parser.

Owns every config key, its type, default and validation, and is the only module that
reads the environment. A mistake raises `ConfigError(key_path, problem)`; the problem
never quotes a value that could be a secret.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from zrproxy.errors import ConfigError

UpstreamKind = Literal["openai", "anthropic"]
UPSTREAM_KINDS: tuple[UpstreamKind, ...] = ("openai", "anthropic")
# Overrides may add fields (store, metadata policy, ...) but not change what is asked.
_PROTECTED_BODY_KEYS = frozenset({"model", "stream", "messages", "input", "prompt"})


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Address = Address("127.0.0.1", 8080)
    admin_listen: Address = Address("127.0.0.1", 9090)
    max_body_bytes: int = 10 * 1024 * 1024
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    total_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    # A client that reads nothing for this long while we have bytes for it is closed.
    send_timeout_s: float = 30.0
    mlock: bool = False
    scrub_memory: bool = False
    workers: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: UpstreamKind
    base_url: str
    api_key_env: str | None = None
    # Resolved from the environment at load time; never printed (repr=False).
    api_key: str | None = field(default=None, repr=False)
    region: str | None = None
    request_overrides: Mapping[str, Any] = field(default_factory=dict)
    # Open connections to this upstream at most; a request waits for a free one at most
    # pool_timeout_s, then fails over like a refused connection.
    max_connections: int = 1024
    pool_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    model: str
    upstreams: tuple[str, ...]
    upstream_model: str | None = None


@dataclass(frozen=True, slots=True)
class ProjectConfig:
    name: str
    key_sha256: tuple[bytes, ...]
    zero_retention: bool = True
    models: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    upstreams: tuple[UpstreamConfig, ...]
    routes: tuple[RouteConfig, ...]
    projects: tuple[ProjectConfig, ...]

    def upstream(self, name: str) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.name == name)


def process_environment() -> Mapping[str, str]:
    """The process environment (the one place that reads it)."""
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


# --- the parser -----------------------------------------------------------------------

T = TypeVar("T")
D = TypeVar("D")


class _Table:
    """One TOML table being read: takes keys off it and complains about leftovers."""

    def __init__(self, path: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.path = path
        self._data: dict[str, Any] = dict(data)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, kind: Callable[[str, object], T], default: D) -> T | D:
        if name not in self._data:
            return default
        return kind(self.key(name), self._data.pop(name))

    def require(self, name: str, kind: Callable[[str, object], T]) -> T:
        if name not in self._data:
            raise ConfigError(self.key(name), "is required")
        return kind(self.key(name), self._data.pop(name))

    def finish(self) -> None:
        for name in self._data:
            raise ConfigError(self.key(name), "unknown key")


def _str(path: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, "must be a non-empty string")
    return value


def _bool(path: str, value: object) -> bool:
    if type(value) is not bool:
        raise ConfigError(path, "must be true or false")
    return value


def _positive_int(path: str, value: object) -> int:
    if type(value) is not int or value <= 0:
        raise ConfigError(path, "must be a positive integer")
    return value


def _seconds(path: str, value: object) -> float:
    if type(value) not in (int, float) or not 0 < value < 1e7:  # type: ignore[operator]
        raise ConfigError(path, "must be a positive number of seconds")
    return float(value)  # type: ignore[arg-type]


def _str_list(path: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "must be a non-empty list of strings")
    return tuple(_str(f"{path}[{i}]", v) for i, v in enumerate(value))


def parse_address(path: str, value: object) -> Address:
    text = _str(path, value)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if match is None:
        raise ConfigError(path, "must be HOST:PORT (IPv6 as [ADDR]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(path, "port must be between 0 and 65535")
    return Address(host, port)


def _base_url(path: str, value: object) -> str:
    text = _str(path, value).rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", text):
        raise ConfigError(
            path, "must be an http:// or https:// URL without credentials, query or fragment"
        )
    return text


def _glob(path: str, value: object) -> str:
    text = _str(path, value)
    if len(text) > 200:
        raise ConfigError(path, "glob is longer than 200 characters")
    return text


def _glob_list(path: str, value: object) -> tuple[str, ...]:
    return tuple(_glob(f"{path}[{i}]", v) for i, v in enumerate(_str_list(path, value)))


def _key_hash(path: str, value: object) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ConfigError(path, "must be a SHA-256 digest as 64 hex characters")
    return bytes.fromhex(value)


def _name(path: str, value: object) -> str:
    text = _str(path, value)
    # Names become metric label values: keep them plain and bounded.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._*?\[\]-]{0,99}", text):
        raise ConfigError(path, "must be 1-100 letters, digits, '.', '_', '-' (globs allowed)")
    return text


def _any(_path: str, value: object) -> object:
    return value


def _tables(path: str, value: object) -> list[_Table]:
    if not isinstance(value, list):
        raise ConfigError(path, "must be an array of tables ([[...]])")
    return [_Table(f"{path}[{i}]", item) for i, item in enumerate(value)]


def _unique(path: str, names: list[str], what: str) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{path}[{i}].{what}", f"duplicate {what} '{name}'")
        seen.add(name)


def _server(table: _Table) -> ServerConfig:
    d = ServerConfig()
    server = ServerConfig(
        listen=table.take("listen", parse_address, d.listen),
        admin_listen=table.take("admin_listen", parse_address, d.admin_listen),
        max_body_bytes=table.take("max_body_bytes", _positive_int, d.max_body_bytes),
        connect_timeout_s=table.take("connect_timeout_s", _seconds, d.connect_timeout_s),
        first_byte_timeout_s=table.take("first_byte_timeout_s", _seconds, d.first_byte_timeout_s),
        idle_timeout_s=table.take("idle_timeout_s", _seconds, d.idle_timeout_s),
        total_timeout_s=table.take("total_timeout_s", _seconds, d.total_timeout_s),
        drain_timeout_s=table.take("drain_timeout_s", _seconds, d.drain_timeout_s),
        keepalive_timeout_s=table.take("keepalive_timeout_s", _seconds, d.keepalive_timeout_s),
        send_timeout_s=table.take("send_timeout_s", _seconds, d.send_timeout_s),
        mlock=table.take("mlock", _bool, d.mlock),
        scrub_memory=table.take("scrub_memory", _bool, d.scrub_memory),
        workers=table.take("workers", _positive_int, d.workers),
    )
    table.finish()
    if server.listen == server.admin_listen and server.listen.port != 0:
        raise ConfigError("server.admin_listen", "must differ from server.listen")
    return server


def _upstream(table: _Table, environ: Mapping[str, str]) -> UpstreamConfig:
    name = table.require("name", _name)
    kind = table.require("kind", _str)
    if kind not in UPSTREAM_KINDS:
        raise ConfigError(table.key("kind"), "must be 'openai' or 'anthropic'")
    base_url = table.require("base_url", _base_url)
    api_key_env = table.take("api_key_env", _str, None)
    api_key = None
    if api_key_env is not None:
        api_key = environ.get(api_key_env)
        if not api_key:
            problem = f"environment variable {api_key_env} is not set or empty"
            raise ConfigError(table.key("api_key_env"), problem)
    region = table.take("region", _name, None)
    overrides: Mapping[str, Any] = table.take("request_overrides", _overrides, {})
    d = UpstreamConfig(name, kind, base_url)
    max_connections = table.take("max_connections", _positive_int, d.max_connections)
    pool_timeout_s = table.take("pool_timeout_s", _seconds, d.pool_timeout_s)
    table.finish()
    return UpstreamConfig(
        name,
        kind,
        base_url,
        api_key_env,
        api_key,
        region,
        overrides,
        max_connections=max_connections,
        pool_timeout_s=pool_timeout_s,
    )


def _overrides(path: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, "must be a table of JSON body fields")
    for key in value:
        if key in _PROTECTED_BODY_KEYS:
            raise ConfigError(f"{path}.{key}", "may not be overridden (use upstream_model)")
    # A plain dict, not a MappingProxyType: the config is pickled to worker processes.
    return dict(value)


def _route(table: _Table, upstream_names: set[str]) -> RouteConfig:
    model = table.require("model", _glob)
    upstreams = table.require("upstreams", _str_list)
    for i, name in enumerate(upstreams):
        if name not in upstream_names:
            raise ConfigError(table.key(f"upstreams[{i}]"), f"undefined upstream '{name}'")
    route = RouteConfig(
        name=table.take("name", _name, model),
        model=model,
        upstreams=upstreams,
        upstream_model=table.take("upstream_model", _str, None),
    )
    table.finish()
    return route


def _project(table: _Table) -> ProjectConfig:
    name = table.require("name", _name)
    hashes_path = table.key("key_sha256")
    raw = table.require("key_sha256", _str_list)
    project = ProjectConfig(
        name=name,
        key_sha256=tuple(_key_hash(f"{hashes_path}[{i}]", v) for i, v in enumerate(raw)),
        zero_retention=table.take("zero_retention", _bool, True),
        models=table.take("models", _glob_list, None),
        regions=table.take("regions", _str_list, None),
    )
    table.finish()
    return project


def parse_config(data: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Validate parsed TOML data; `environ` supplies upstream API keys."""
    top = _Table("", data)
    server = _server(_Table("server", top.take("server", _any, {})))
    upstreams = [_upstream(t, environ) for t in top.take("upstreams", _tables, [])]
    if not upstreams:
        raise ConfigError("upstreams", "at least one [[upstreams]] is required")
    _unique("upstreams", [u.name for u in upstreams], "name")
    names = {u.name for u in upstreams}
    routes = [_route(t, names) for t in top.take("routes", _tables, [])]
    if not routes:
        raise ConfigError("routes", "at least one [[routes]] is required")
    _unique("routes", [r.name for r in routes], "name")
    projects = [_project(t) for t in top.take("projects", _tables, [])]
    if not projects:
        raise ConfigError("projects", "at least one [[projects]] is required")
    _unique("projects", [p.name for p in projects], "name")
    seen: dict[bytes, str] = {}
    for i, project in enumerate(projects):
        for j, digest in enumerate(project.key_sha256):
            if digest in seen:
                raise ConfigError(
                    f"projects[{i}].key_sha256[{j}]", f"key already belongs to '{seen[digest]}'"
                )
            seen[digest] = project.name
    regions = {u.region for u in upstreams if u.region}
    for i, project in enumerate(projects):
        for j, region in enumerate(project.regions or ()):
            if region not in regions:
                raise ConfigError(f"projects[{i}].regions[{j}]", f"no upstream in '{region}'")
    top.finish()
    return Config(server, tuple(upstreams), tuple(routes), tuple(projects))


def glob_matcher(globs: tuple[str, ...]) -> Callable[[str], bool]:
    """A compiled matcher for model globs (case-sensitive, like model ids)."""
    pattern = re.compile("|".join(fnmatch.translate(g) for g in globs))
    return lambda model: pattern.match(model) is not None


def embedded_default(mock_base_url: str, demo_key_sha256: bytes) -> Config:
    """The config of `zrproxy serve` without --config: every model to the bundled mock."""
    return Config(
        server=ServerConfig(),
        upstreams=(UpstreamConfig("mock", "openai", mock_base_url, region="local"),),
        routes=(RouteConfig(name="default", model="*", upstreams=("mock",)),),
        projects=(ProjectConfig(name="demo", key_sha256=(demo_key_sha256,)),),
    )
