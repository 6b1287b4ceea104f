"""Helpers for the audit-log tests: age keys, a config with an audit project beside a
zero-retention one, and waiting for the writer (test helper)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyrage
import pytest
from pyrage import x25519

from tests.conftest import Mock, RunningProxy, metric
from zrproxy.app import Service
from zrproxy.audit import utc_now
from zrproxy.auth import new_key
from zrproxy.config import parse_config

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"

AGE = shutil.which("age")
AGE_KEYGEN = shutil.which("age-keygen")
needs_age = pytest.mark.skipif(
    AGE is None, reason="age not installed (Debian package 'age'; make test installs it)"
)


def keypair(directory: Path, name: str = "key.txt") -> tuple[str, Path]:
    """A customer's age identity file and its recipient (made with age-keygen if present)."""
    path = directory / name
    if AGE_KEYGEN is not None:
        done = subprocess.run([AGE_KEYGEN, "-o", str(path)], capture_output=True, check=True)
        match = re.search(rb"age1[0-9a-z]+", done.stderr)
        assert match is not None, done.stderr
        return match.group(0).decode(), path
    identity = x25519.Identity.generate()
    path.write_text(str(identity) + "\n")
    return str(identity.to_public()), path


def age_decrypt(path: Path, identity: Path) -> bytes:
    """The plaintext of one record file, by the real `age` CLI."""
    assert AGE is not None
    return subprocess.run(
        [AGE, "-d", "-i", str(identity), str(path)], capture_output=True, check=True
    ).stdout


def pyrage_decrypt(path: Path, identity: Path) -> dict[str, Any]:
    key = x25519.Identity.from_str(identity.read_text().strip().splitlines()[-1])
    record: dict[str, Any] = orjson.loads(pyrage.decrypt(path.read_bytes(), [key]))
    return record


def chat(model: str, text: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}]}


def anthropic(model: str, text: str, stream: bool) -> dict[str, Any]:
    return {**chat(model, text, stream), "max_tokens": 64}


def audited_config(
    mock_url: str,
    recipient: str,
    audit_dir: Path,
    keys: dict[str, str],
    audit: dict[str, Any] | None = None,
    retention_days: int = 30,
    anthropic_url: str | None = None,
) -> dict[str, Any]:
    """Projects 'zr' (zero retention), 'beta' (audit log) and 'meta' (metadata only);
    claude-* models go to an Anthropic-kind upstream (at `anthropic_url` where that mock
    is another one). `keys` maps project to key digest."""
    return {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "upstreams": [
            {"name": "mock", "kind": "openai", "base_url": mock_url, "zero_data_retention": True},
            {
                "name": "claude",
                "kind": "anthropic",
                "base_url": anthropic_url or mock_url,
                "zero_data_retention": True,
            },
        ],
        "routes": [
            {"name": "claude", "model": "claude-*", "upstreams": ["claude"]},
            {"name": "default", "model": "*", "upstreams": ["mock"]},
        ],
        "projects": [
            {"name": "zr", "key_sha256": [keys["zr"]]},
            {
                "name": "beta",
                "key_sha256": [keys["beta"]],
                "zero_retention": False,
                "audit_log": {"recipient": recipient, "retention_days": retention_days},
            },
            {"name": "meta", "key_sha256": [keys["meta"]], "zero_retention": False},
        ],
        "audit": {"dir": str(audit_dir), **(audit or {})},
    }


async def audit_count(proxy: RunningProxy, outcome: str | None = None) -> float:
    labels = {"project": "beta"} if outcome is None else {"project": "beta", "outcome": outcome}
    return await metric(proxy, "zrproxy_audit_records_total", **labels)


async def wait_for(check: Callable[[], Any], timeout_s: float = 15.0) -> None:
    """Until `await check()` is true (bounded: fails after timeout_s)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@dataclass
class Audited:
    proxy: RunningProxy  # .key is project beta's (the audit project)
    keys: dict[str, str]  # project -> API key
    audit_dir: Path
    identity: Path
    config: dict[str, Any]  # as parsed TOML

    async def post(
        self, path: str, body: dict[str, Any], project: str = "beta", rid: str | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        headers = {"Authorization": f"Bearer {self.keys[project]}"}
        if path == MESSAGES:
            headers["anthropic-version"] = "2023-06-01"
        if rid is not None:
            headers["X-Request-Id"] = rid
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.proxy.url + path, data=orjson.dumps(body), headers=headers) as resp,
        ):
            return resp.status, await resp.read(), dict(resp.headers)


Start = Callable[..., Awaitable[Audited]]


@contextlib.asynccontextmanager
async def audited_services(mock: Mock, tmp_path: Path) -> AsyncIterator[Start]:
    """start(audit=..., clock=..., retention_days=...) -> Audited; all stopped at exit."""
    services: list[Service] = []
    recipient, identity = keypair(tmp_path)

    async def start(
        audit: dict[str, Any] | None = None,
        clock: Callable[[], datetime.datetime] = utc_now,
        retention_days: int = 30,
    ) -> Audited:
        keys, digests = {}, {}
        for name in ("zr", "beta", "meta"):
            keys[name], digests[name] = new_key()
        audit_dir = tmp_path / "audit"
        data = audited_config(
            mock.url, recipient, audit_dir, digests, audit, retention_days, mock.anthropic_url
        )
        service = Service(parse_config(data, {}), audit_clock=clock)
        await service.start()
        services.append(service)
        proxy = RunningProxy(
            service,
            f"http://{service.api_address}",
            f"http://{service.admin_address}",
            keys["beta"],
        )
        return Audited(proxy, keys, audit_dir, identity, data)

    try:
        yield start
    finally:
        for service in services:
            await service.stop()
