"""What follows from a parsed config: model globs, an upstream's host and the
subprocessor entry covering it, the day each upstream may first be used, and the
built-in config of `zrproxy serve` without --config.

Pure functions of the dataclasses in `zrproxy.config_types`; nothing here parses or
validates.
"""

from __future__ import annotations

import datetime
import fnmatch
import re
import urllib.parse
from collections.abc import Callable

from zrproxy.config_types import (
    Config,
    ProjectConfig,
    RouteConfig,
    ServerConfig,
    SubprocessorConfig,
    UpstreamConfig,
)


def is_glob(model: str) -> bool:
    return any(c in model for c in "*?[")


def upstream_host(upstream: UpstreamConfig) -> str:
    """The host of an upstream's base_url, lower case (IPv6 in brackets, like `hosts`)."""
    host = urllib.parse.urlsplit(upstream.base_url).hostname or ""
    return f"[{host}]" if ":" in host else host


def covering_subprocessor(
    register: tuple[SubprocessorConfig, ...] | list[SubprocessorConfig],
    upstream: UpstreamConfig,
) -> SubprocessorConfig | None:
    """The register entry whose hosts include the upstream's host (the one in use
    earliest, when several are)."""
    host = upstream_host(upstream)
    covering = [s for s in register if host in s.hosts]
    return min(covering, key=lambda s: s.since, default=None)


def activation_dates(config: Config) -> dict[str, datetime.date]:
    """Per upstream name, the first day routing may use it: its subprocessor's `since`
    (`date.min`, i.e. always, without a register)."""
    dates: dict[str, datetime.date] = {}
    for upstream in config.upstreams:
        sub = covering_subprocessor(config.subprocessors, upstream)
        dates[upstream.name] = datetime.date.min if sub is None else sub.since
    return dates


def glob_matcher(globs: tuple[str, ...]) -> Callable[[str], bool]:
    """A compiled matcher for model globs (case-sensitive, like model ids)."""
    pattern = re.compile("|".join(fnmatch.translate(g) for g in globs))
    return lambda model: pattern.match(model) is not None


def embedded_default(mock_base_url: str, demo_key_sha256: bytes) -> Config:
    """The config of `zrproxy serve` without --config: every model to the bundled mock.

    The mock keeps nothing, so it is declared zero-retention (the demo project has zero
    retention, the default), and it is the one entry of the subprocessor register."""
    mock = UpstreamConfig("mock", "openai", mock_base_url, region="local", zero_data_retention=True)
    return Config(
        server=ServerConfig(),
        upstreams=(mock,),
        routes=(RouteConfig(name="default", model="*", upstreams=("mock",)),),
        projects=(ProjectConfig(name="demo", key_sha256=(demo_key_sha256,)),),
        subprocessors=(
            SubprocessorConfig(
                name="zrproxy bundled mock upstream",
                purpose="demo LLM inference (keeps nothing)",
                location="this machine",
                hosts=(upstream_host(mock),),
                since=datetime.date(2000, 1, 1),  # part of the program: always in use
            ),
        ),
    )
