"""The pool and send-timeout config keys: defaults, values, and errors naming the key."""

from __future__ import annotations

from typing import Any

import pytest

from zrproxy.config import parse_config
from zrproxy.errors import ConfigError


def _data(upstream: dict[str, Any] | None = None, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "upstreams": [
            {"name": "u", "kind": "openai", "base_url": "http://u/v1", **(upstream or {})}
        ],
        "routes": [{"model": "*", "upstreams": ["u"]}],
        "projects": [{"name": "p", "key_sha256": ["0" * 64]}],
    }


def test_defaults() -> None:
    config = parse_config(_data(), {})
    assert config.upstreams[0].max_connections == 1024
    assert config.upstreams[0].pool_timeout_s == 5.0
    assert config.server.send_timeout_s == 30.0


def test_values() -> None:
    config = parse_config(
        _data({"max_connections": 4, "pool_timeout_s": 0.5}, send_timeout_s=2), {}
    )
    assert config.upstreams[0].max_connections == 4
    assert config.upstreams[0].pool_timeout_s == 0.5
    assert config.server.send_timeout_s == 2.0


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (_data({"max_connections": 0}), "upstreams[0].max_connections"),
        (_data({"max_connections": True}), "upstreams[0].max_connections"),
        (_data({"max_connections": "4"}), "upstreams[0].max_connections"),
        (_data({"pool_timeout_s": 0}), "upstreams[0].pool_timeout_s"),
        (_data({"pool_timeout_s": "1"}), "upstreams[0].pool_timeout_s"),
        (_data(send_timeout_s=-1), "server.send_timeout_s"),
        (_data(send_timeout_s=False), "server.send_timeout_s"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, {})
    assert info.value.key_path == key
