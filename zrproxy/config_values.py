"""The TOML reader's parts: `_Table`, which takes keys off one table and reports the
leftovers, and the value parsers, each turning one TOML value into a Python value or a
`ConfigError(key_path, problem)` whose problem never quotes the value.

Knows no section: which keys a table has is `zrproxy.config_sections`' business.
"""

from __future__ import annotations

import datetime
import difflib
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

from zrproxy.config_types import Address
from zrproxy.errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")


class _Table:
    """One TOML table being read: takes keys off it and complains about leftovers.

    A bad optional value is recorded in `errors` (the default stands in for it) so one
    pass finds every mistake; a missing or bad required value raises at once.
    """

    def __init__(self, path: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.path = path
        self._data: dict[str, Any] = dict(data)
        self._known: list[str] = []
        self.errors: list[ConfigError] = []

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, kind: Callable[[str, object], T], default: D) -> T | D:
        self._known.append(name)
        if name not in self._data:
            return default
        try:
            return kind(self.key(name), self._data.pop(name))
        except ConfigError as exc:
            self.errors.append(exc)
            return default

    def require(self, name: str, kind: Callable[[str, object], T]) -> T:
        self._known.append(name)
        if name not in self._data:
            close = difflib.get_close_matches(name, list(self._data), n=1, cutoff=0.6)
            hint = f" (is '{close[0]}' a misspelling of it?)" if close else ""
            raise ConfigError(self.key(name), "is required" + hint)
        return kind(self.key(name), self._data.pop(name))

    def finish(self) -> None:
        for name in self._data:
            close = difflib.get_close_matches(name, self._known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.errors.append(ConfigError(self.key(name), "unknown key" + hint))


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


def _proxy_url(path: str, value: object) -> str:
    text = _str(path, value).rstrip("/")
    if "@" in text:
        # Never printed: the part before "@" is a password in a file that gets committed.
        raise ConfigError(
            path,
            "must not carry credentials (USER:PASSWORD@): put them in an environment"
            " variable and name it in egress_proxy_auth_env",
        )
    if not re.fullmatch(r"http://[^\s/?#@:]+:\d{1,5}", text):
        raise ConfigError(path, "must be http://HOST:PORT (no path or query)")
    return text


def _readable_file(path: str, value: object) -> str:
    text = _str(path, value)
    if not os.access(text, os.R_OK) or not os.path.isfile(text):
        raise ConfigError(path, "is not a readable file")
    return text


def _base_url(path: str, value: object) -> str:
    text = _str(path, value).rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", text):
        raise ConfigError(
            path, "must be an http:// or https:// URL without credentials, query or fragment"
        )
    return text


_S = TypeVar("_S", bound=str)


def _one_of(known: tuple[_S, ...]) -> Callable[[str, object], _S]:
    """A parser for a string that must be one of `known` (the config's fixed choices)."""
    choices = ", ".join(f"'{k}'" for k in known[:-1]) + f" or '{known[-1]}'"

    def parse(path: str, value: object) -> _S:
        text = _str(path, value)
        for choice in known:
            if text == choice:
                return choice
        raise ConfigError(path, f"must be {choices}")

    return parse


def _api_version(path: str, value: object) -> str:
    text = _str(path, value)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}(-preview)?", text):
        raise ConfigError(path, "must be a dated Azure api-version: YYYY-MM-DD[-preview]")
    return text


# Azure's deployment names: letters, digits, '.', '_', '-' (they go into the URL path).
_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _deployments(path: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(path, "must be a table of model ids to deployment names")
    for model, deployment in value.items():
        if not isinstance(deployment, str) or not _DEPLOYMENT.fullmatch(deployment):
            raise ConfigError(
                f"{path}.{model}", "must be a deployment name (letters, digits, '.', '_', '-')"
            )
    return dict(value)


def _env_name(path: str, value: object) -> str:
    # Checked before anything prints it: a key pasted here must not end up in a log.
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", value):
        raise ConfigError(
            path, "must be the NAME of an environment variable ([A-Z_][A-Z0-9_]*), not a key"
        )
    return value


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


# Headers the proxy owns on the way upstream: framing, hop-by-hop, the upstream key
# (api_key_env), the identity encoding the usage tap needs, and our request id.
_PROTECTED_HEADERS = frozenset(
    {
        "accept-encoding",
        "authorization",
        "connection",
        "content-encoding",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "api-key",
        "x-api-key",
        "x-request-id",
    }
)


def _header_overrides(path: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(path, "must be a table of header names to string values")
    for name, text in value.items():
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ConfigError(f"{path}.{name}", "is not a valid header name")
        if name.lower().replace("_", "-") in _PROTECTED_HEADERS:
            raise ConfigError(f"{path}.{name}", "is set by the proxy and may not be overridden")
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            raise ConfigError(f"{path}.{name}", "must be a string without line breaks")
    return dict(value)


# Overrides may add fields (store, metadata policy, ...) but not change what is asked.
_PROTECTED_BODY_KEYS = frozenset({"model", "stream", "messages", "input", "prompt"})


def _overrides(path: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, "must be a table of JSON body fields")
    for key in value:
        if key in _PROTECTED_BODY_KEYS:
            raise ConfigError(f"{path}.{key}", "may not be overridden (use upstream_model)")
    # A plain dict, not a MappingProxyType: the config is pickled to worker processes.
    return dict(value)


def _date(path: str, value: object) -> datetime.date:
    if type(value) is not datetime.date:
        raise ConfigError(path, "must be a TOML date (YYYY-MM-DD, unquoted)")
    return value


def _host_list(path: str, value: object) -> tuple[str, ...]:
    hosts = _str_list(path, value)
    for i, host in enumerate(hosts):
        if not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", host):
            raise ConfigError(f"{path}[{i}]", "must be a host name or address, without port")
    return tuple(h.lower() for h in hosts)


def _redis_url(path: str, value: object) -> str:
    text = _str(path, value)
    if not re.fullmatch(r"rediss?://\S+|unix://\S+", text):
        raise ConfigError(path, "must be a redis://, rediss:// or unix:// URL")
    return text
