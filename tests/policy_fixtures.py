"""Helpers for the data-handling tests: several mocks, a recording fake upstream, a proxy
with an injected calendar, and requests that read the whole answer (test helper)."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.fakes import FakeUpstream, FakeUpstreams
from zrproxy.app import Service
from zrproxy.auth import new_key
from zrproxy.config import parse_config
from zrproxy.mock_upstream import MOCK_STATS, MockStats, start_mock
from zrproxy.routing import DayClock


@dataclass
class Mocks:
    """Bundled mocks by name: url and what each received."""

    urls: dict[str, str] = field(default_factory=dict)
    stats: dict[str, MockStats] = field(default_factory=dict)

    def started(self, name: str) -> int:
        return self.stats[name].started


@contextlib.asynccontextmanager
async def mocks(*names: str) -> AsyncIterator[Mocks]:
    out = Mocks()
    runners = []
    try:
        for name in names:
            runner, url = await start_mock()
            runners.append(runner)
            out.urls[name], out.stats[name] = url, runner.app[MOCK_STATS]
        yield out
    finally:
        for runner in runners:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def recorder(
    status: int = 200, headers: dict[str, str] | None = None
) -> AsyncIterator[FakeUpstream]:
    """A fake upstream (tests/fakes.py) that records every request whole and answers
    `status` with `headers` and an empty chat completion."""
    fakes = FakeUpstreams()
    try:
        rec = await fakes.start("recorder")
        rec.status, rec.headers = status, headers or {}
        rec.body = b'{"id":"x","object":"chat.completion","choices":[]}'
        yield rec
    finally:
        await fakes.close()


@dataclass
class Running:
    service: Service
    url: str
    admin_url: str
    keys: dict[str, str]  # project name -> API key

    def auth(self, project: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[project]}"}


@contextlib.asynccontextmanager
async def proxy(
    data: dict[str, Any],
    *,
    today: Callable[[], datetime.date] | None = None,
    monotonic: Callable[[], float] | None = None,
) -> AsyncIterator[Running]:
    """The real Service for `data` (projects get fresh keys: give them no key_sha256),
    with "today" and the clock the calendar is re-read by injected when given."""
    keys: dict[str, str] = {}
    data = {"server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}, **data}
    projects = []
    for project in data["projects"]:
        key, digest = new_key()
        keys[project["name"]] = key
        projects.append({**project, "key_sha256": [digest]})
    data["projects"] = projects
    clock = None
    if today is not None:
        clock = (
            DayClock(today, recheck_s=0.0)
            if monotonic is None
            else DayClock(today, monotonic=monotonic)
        )
    service = Service(parse_config(data, {}), day_clock=clock)
    await service.start()
    try:
        yield Running(
            service, f"http://{service.api_address}", f"http://{service.admin_address}", keys
        )
    finally:
        await service.stop()


async def call(
    url: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    method: str = "POST",
) -> tuple[int, Any, bytes]:
    """(status, parsed JSON or None, raw body) of one request."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            url,
            data=None if body is None else orjson.dumps(body),
            headers={"Content-Type": "application/json", **headers},
        ) as resp,
    ):
        raw = await resp.read()
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        return resp.status, doc, raw


def chat(model: str = "mock-n2", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
