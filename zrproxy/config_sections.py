"""The parser of each config table: [server], [[upstreams]], [[routes]], [[projects]]
(with audit_log), [audit], [[subprocessors]] and [limits], from a `_Table` to its
dataclass.

Checks what one table can check alone; checks across tables (dangling references,
duplicates) are `zrproxy.config.parse_config`'s. Reads upstream secrets only from the
`environ` mapping it is handed, never from the process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import pyrage
from pyrage import x25519

from zrproxy.config_derived import glob_matcher, is_glob
from zrproxy.config_types import (
    ALLOCATORS,
    LOG_FORMATS,
    OVERRIDE_ENDPOINTS,
    AuditConfig,
    AuditLogConfig,
    LimitsConfig,
    ProjectConfig,
    RouteConfig,
    ServerConfig,
    SubprocessorConfig,
    UpstreamConfig,
)
from zrproxy.config_values import (
    _api_version,
    _base_url,
    _bool,
    _date,
    _deployments,
    _env_name,
    _glob,
    _glob_list,
    _header_overrides,
    _host_list,
    _key_hash,
    _name,
    _one_of,
    _overrides,
    _positive_int,
    _proxy_url,
    _readable_file,
    _redis_url,
    _seconds,
    _str,
    _str_list,
    _Table,
    parse_address,
)
from zrproxy.dialects import KIND_ENDPOINTS, KINDS
from zrproxy.errors import ConfigError


class _EveryVariableSet(Mapping[str, str]):
    """An environment in which every variable is set, to a placeholder (`--no-env`)."""

    def __getitem__(self, name: str) -> str:
        return "placeholder-not-read-from-the-environment"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


# For validating a config without the provider secrets (CI): api_key_env must still be
# a valid name, but its variable need not exist. Never serve with it.
PLACEHOLDER_ENV: Mapping[str, str] = _EveryVariableSet()


def _proxy_auth(
    table: _Table, proxy: str | None, environ: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """egress_proxy_auth_env of a table and the "USER:PASSWORD" it names (checked for
    the colon, never printed), for that table's own egress_proxy."""
    env = table.take("egress_proxy_auth_env", _env_name, None)
    if env is None:
        return None, None
    key = table.key("egress_proxy_auth_env")
    if proxy is None:
        raise ConfigError(key, "needs egress_proxy in the same table")
    value = environ.get(env)
    if not value:
        raise ConfigError(key, f"environment variable {env} is not set or empty")
    if environ is not PLACEHOLDER_ENV and (":" not in value or any(c in value for c in "\r\n")):
        raise ConfigError(key, f"environment variable {env} must hold USER:PASSWORD")
    return env, value


_kind = _one_of(KINDS)
_allocator = _one_of(ALLOCATORS)
_log_format = _one_of(LOG_FORMATS)


def _server(table: _Table, environ: Mapping[str, str]) -> ServerConfig:
    d = ServerConfig()
    egress_proxy = table.take("egress_proxy", _proxy_url, d.egress_proxy)
    egress_auth_env, egress_auth = _proxy_auth(table, egress_proxy, environ)
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
        egress_proxy=egress_proxy,
        egress_proxy_auth_env=egress_auth_env,
        egress_proxy_auth=egress_auth,
        mlock=table.take("mlock", _bool, d.mlock),
        scrub_memory=table.take("scrub_memory", _bool, d.scrub_memory),
        allocator=table.take("allocator", _allocator, d.allocator),
        workers=table.take("workers", _positive_int, d.workers),
        log_format=table.take("log_format", _log_format, d.log_format),
        max_connections=table.take("max_connections", _positive_int, d.max_connections),
        max_in_flight=table.take("max_in_flight", _positive_int, d.max_in_flight),
        max_streams=table.take("max_streams", _positive_int, d.max_streams),
        max_buffered_body_bytes=table.take(
            "max_buffered_body_bytes", _positive_int, d.max_buffered_body_bytes
        ),
        body_timeout_s=table.take("body_timeout_s", _seconds, d.body_timeout_s),
        header_timeout_s=table.take("header_timeout_s", _seconds, d.header_timeout_s),
        max_request_line_bytes=table.take(
            "max_request_line_bytes", _positive_int, d.max_request_line_bytes
        ),
        max_header_field_bytes=table.take(
            "max_header_field_bytes", _positive_int, d.max_header_field_bytes
        ),
        max_header_fields=table.take("max_header_fields", _positive_int, d.max_header_fields),
        max_header_bytes=table.take("max_header_bytes", _positive_int, d.max_header_bytes),
        max_event_bytes=table.take("max_event_bytes", _positive_int, d.max_event_bytes),
    )
    table.finish()
    if server.listen == server.admin_listen and server.listen.port != 0:
        raise ConfigError("server.admin_listen", "must differ from server.listen")
    return server


def _upstream(table: _Table, environ: Mapping[str, str]) -> UpstreamConfig:
    name = table.require("name", _name)
    kind = table.require("kind", _kind)
    base_url = table.require("base_url", _base_url)
    api_key_env = table.take("api_key_env", _env_name, None)
    api_key = None
    if api_key_env is not None:
        api_key = environ.get(api_key_env)
        if not api_key:
            problem = f"environment variable {api_key_env} is not set or empty"
            raise ConfigError(table.key("api_key_env"), problem)
    region = table.take("region", _name, None)
    overrides: Mapping[str, Any] = table.take("request_overrides", _overrides, {})
    header_overrides = table.take("header_overrides", _header_overrides, {})
    zdr = table.take("zero_data_retention", _bool, False)
    endpoints = table.take("override_endpoints", _str_list, OVERRIDE_ENDPOINTS[kind])
    for i, path in enumerate(endpoints):
        if path not in KIND_ENDPOINTS[kind]:
            raise ConfigError(
                table.key(f"override_endpoints[{i}]"), f"is not an endpoint of a {kind} upstream"
            )
    d = UpstreamConfig(name, kind, base_url)
    max_connections = table.take("max_connections", _positive_int, d.max_connections)
    pool_timeout_s = table.take("pool_timeout_s", _seconds, d.pool_timeout_s)
    ca_file = table.take("ca_file", _readable_file, None)
    client_cert_file = table.take("client_cert_file", _readable_file, None)
    client_key_file = table.take("client_key_file", _readable_file, None)
    egress_proxy = table.take("egress_proxy", _proxy_url, None)
    egress_auth_env, egress_auth = _proxy_auth(table, egress_proxy, environ)
    api_version = table.take("api_version", _api_version, None)
    deployments = table.take("deployments", _deployments, {})
    version_bad = any(e.key_path == table.key("api_version") for e in table.errors)
    if kind == "azure_openai" and api_version is None and not version_bad:
        raise ConfigError(
            table.key("api_version"),
            "is required for kind azure_openai (Azure's dated api-version, e.g. 2024-10-21)",
        )
    for azure_key, given in (("api_version", api_version), ("deployments", deployments)):
        if kind != "azure_openai" and given:
            raise ConfigError(table.key(azure_key), "applies only to kind azure_openai")
    if (client_cert_file is None) != (client_key_file is None):
        raise ConfigError(
            table.key("client_cert_file"), "needs client_key_file too (and the other way round)"
        )
    if not base_url.startswith("https://") and (ca_file or client_cert_file):
        raise ConfigError(table.key("base_url"), "must be https:// for ca_file or client certs")
    table.finish()
    return UpstreamConfig(
        name,
        kind,
        base_url,
        api_key_env,
        api_key,
        region,
        overrides,
        header_overrides,
        zdr,
        tuple(endpoints),
        max_connections=max_connections,
        pool_timeout_s=pool_timeout_s,
        ca_file=ca_file,
        client_cert_file=client_cert_file,
        client_key_file=client_key_file,
        egress_proxy=egress_proxy,
        egress_proxy_auth_env=egress_auth_env,
        egress_proxy_auth=egress_auth,
        api_version=api_version,
        deployments=deployments,
    )


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
        models=table.take("models", _str_list, ()),
    )
    table.finish()
    matches = glob_matcher((model,))
    for i, listed in enumerate(route.models):
        if is_glob(listed) or not matches(listed):
            raise ConfigError(
                table.key(f"models[{i}]"), "must be a concrete model id matched by this route"
            )
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
        audit_log=table.take("audit_log", _audit_log, None),
        max_concurrent=table.take("max_concurrent", _positive_int, None),
        requests_per_minute=table.take("requests_per_minute", _positive_int, None),
        tokens_per_minute=table.take("tokens_per_minute", _positive_int, None),
    )
    table.finish()
    if project.audit_log is not None and project.zero_retention:
        raise ConfigError(
            table.key("audit_log"), "needs zero_retention = false (a content log keeps content)"
        )
    return project


_AGE_RECIPIENT = re.compile(r"age1[02-9ac-hj-np-z]{58}")


def _age_parses(recipient: str) -> bool:
    """Whether age itself takes the recipient (its Bech32 checksum), so a typo is a
    config error naming the key rather than a crash when the audit writer starts."""
    try:
        x25519.Recipient.from_str(recipient)
    except pyrage.RecipientError:
        return False
    return True


def _audit_log(path: str, value: object) -> AuditLogConfig:
    table = _Table(path, value)
    recipient = table.require("recipient", _str)
    if not _AGE_RECIPIENT.fullmatch(recipient) or not _age_parses(recipient):
        raise ConfigError(table.key("recipient"), "must be an age X25519 recipient (age1...)")
    retention = table.take("retention_days", _positive_int, 30)
    table.finish()
    return AuditLogConfig(recipient, retention)


def _audit(table: _Table) -> AuditConfig:
    d = AuditConfig(dir="")
    audit = AuditConfig(
        dir=table.require("dir", _str),
        max_file_bytes=table.take("max_file_bytes", _positive_int, d.max_file_bytes),
        max_record_bytes=table.take("max_record_bytes", _positive_int, d.max_record_bytes),
        queue_records=table.take("queue_records", _positive_int, d.queue_records),
    )
    table.finish()
    return audit


def _subprocessor(table: _Table) -> SubprocessorConfig:
    sub = SubprocessorConfig(
        name=table.require("name", _str),
        purpose=table.require("purpose", _str),
        location=table.require("location", _str),
        hosts=table.require("hosts", _host_list),
        since=table.require("since", _date),
    )
    table.finish()
    return sub


def _limits(table: _Table) -> LimitsConfig:
    limits = LimitsConfig(redis_url=table.take("redis_url", _redis_url, None))
    table.finish()
    return limits
