"""Admission limits: global caps, the request-body memory budget and per-project rates.

# Goals
The proxy never dies of its clients and sheds load fairly: a global cap answers 503 and a
project's limit answers 429, both with Retry-After, before any upstream work. Counters
hold metadata only: project names (from the config), counts and random lease ids.

# Strategy
Global caps (in-flight requests, open streams, buffered body bytes, connections) are
per-process counters: they protect this process's memory, and with `--workers N` each
process gets `share(cap, N)`. Per-project limits hold for the whole service: with
`[limits] redis_url` the counters live in Redis; without it, or while Redis is
unreachable, each of N workers enforces `share(limit, N)`. Minute limits use fixed
windows (`floor(wall time / 60)`) so every process agrees on the window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Literal

from zrproxy.config import Config, ProjectConfig
from zrproxy.errors import RateLimited, forget

log = logging.getLogger("zrproxy")

Backend = Literal["local", "redis"]
_WINDOW_S = 60
# How long a Redis concurrency lease outlives total_timeout_s if its process dies.
_LEASE_SLACK_S = 60.0
_REDIS_TIMEOUT_S = 0.5
_REDIS_RETRY_S = 5.0


def share(limit: int, workers: int) -> int:
    """One worker's part of a limit: limit / workers, at least 1."""
    return max(1, limit // max(1, workers))


class Gate:
    """A count with a cap: `enter()` is False at the cap, else counts one in."""

    __slots__ = ("cap", "count")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.count = 0

    def enter(self) -> bool:
        if self.count >= self.cap:
            return False
        self.count += 1
        return True

    def leave(self) -> None:
        self.count -= 1


class BodyBudget:
    """Bytes of request bodies being read or held, over all requests of this process."""

    __slots__ = ("cap", "used")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.cap:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True, slots=True)
class ProjectLimit:
    max_concurrent: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None

    @property
    def unlimited(self) -> bool:
        return (
            self.max_concurrent is None
            and self.requests_per_minute is None
            and self.tokens_per_minute is None
        )

    def divided(self, workers: int) -> ProjectLimit:
        def part(limit: int | None) -> int | None:
            return None if limit is None else share(limit, workers)

        return ProjectLimit(
            part(self.max_concurrent),
            part(self.requests_per_minute),
            part(self.tokens_per_minute),
        )


@dataclass(slots=True)
class Lease:
    """One admitted request's hold on its project's concurrency."""

    project: str
    backend: Backend
    lease_id: str = ""
    released: bool = False


def retry_after(now: float) -> int:
    """Seconds until the current minute window ends (at least 1)."""
    return max(1, math.ceil(_WINDOW_S - now % _WINDOW_S))


@dataclass(slots=True)
class _Counts:
    concurrent: int = 0
    window: int = -1
    requests: int = 0
    tokens: int = 0

    def roll(self, window: int) -> None:
        if window != self.window:
            self.window, self.requests, self.tokens = window, 0, 0


class LocalCounters:
    """Per-process counters."""

    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}

    def admit(self, project: str, limit: ProjectLimit, now: float) -> int | None:
        """None when admitted (and counted), else the Retry-After in seconds."""
        counts = self._counts.setdefault(project, _Counts())
        counts.roll(int(now // _WINDOW_S))
        if limit.max_concurrent is not None and counts.concurrent >= limit.max_concurrent:
            return 1
        if limit.tokens_per_minute is not None and counts.tokens >= limit.tokens_per_minute:
            return retry_after(now)
        if limit.requests_per_minute is not None and counts.requests >= limit.requests_per_minute:
            return retry_after(now)
        counts.requests += 1
        counts.concurrent += 1
        return None

    def release(self, project: str) -> None:
        self._counts[project].concurrent -= 1

    def add_tokens(self, project: str, tokens: int, now: float) -> None:
        counts = self._counts.setdefault(project, _Counts())
        counts.roll(int(now // _WINDOW_S))
        counts.tokens += tokens


class RedisCounters:
    """The same counters in Redis, shared by every process that uses the same server.

    Keys: `zrproxy:c:<project>` (a sorted set of random lease ids scored by expiry, so a
    dead process's leases expire), `zrproxy:r:<project>:<window>` and
    `zrproxy:t:<project>:<window>` (request and token counts, expiring after two windows).
    """

    def __init__(self, url: str, lease_ttl_s: float) -> None:
        import redis.asyncio as aioredis  # only when configured

        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=_REDIS_TIMEOUT_S,
            socket_connect_timeout=_REDIS_TIMEOUT_S,
            retry_on_timeout=False,
        )
        self._lease_ttl = lease_ttl_s

    async def admit(self, project: str, limit: ProjectLimit, now: float) -> tuple[int | None, str]:
        window = int(now // _WINDOW_S)
        lease_id = secrets.token_hex(8)
        ckey = f"zrproxy:c:{project}"
        rkey = f"zrproxy:r:{project}:{window}"
        tkey = f"zrproxy:t:{project}:{window}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(ckey, "-inf", now)
            pipe.zadd(ckey, {lease_id: now + self._lease_ttl})
            pipe.zcard(ckey)
            pipe.expire(ckey, int(self._lease_ttl) + 1)
            pipe.get(tkey)
            pipe.incr(rkey)
            pipe.expire(rkey, 2 * _WINDOW_S)
            _, _, concurrent, _, tokens, requests, _ = await pipe.execute()
        refusal: int | None = None
        if limit.max_concurrent is not None and concurrent > limit.max_concurrent:
            refusal = 1
        elif limit.tokens_per_minute is not None and int(tokens or 0) >= limit.tokens_per_minute:
            refusal = retry_after(now)
        elif limit.requests_per_minute is not None and requests > limit.requests_per_minute:
            refusal = retry_after(now)
        if refusal is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(ckey, lease_id)
                pipe.decr(rkey)  # a refused request is not one of the minute's requests
                await pipe.execute()
            return refusal, ""
        return None, lease_id

    async def release(self, project: str, lease_id: str) -> None:
        await self._redis.zrem(f"zrproxy:c:{project}", lease_id)

    async def add_tokens(self, project: str, tokens: int, now: float) -> None:
        key = f"zrproxy:t:{project}:{int(now // _WINDOW_S)}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.expire(key, 2 * _WINDOW_S)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()


def _redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError, TimeoutError)


@dataclass(slots=True)
class ProjectLimiter:
    """Per-project admission: `admit()` before the body is read, `release()` at the end,
    `add_tokens()` once the usage is known.

    `on_backend(backend)` is called with the backend in force at start and whenever it
    changes (for the zrproxy_limits_backend gauge).
    """

    projects: tuple[ProjectConfig, ...]
    workers: int
    redis_url: str | None
    lease_ttl_s: float
    on_backend: Callable[[Backend], None]
    clock: Callable[[], float] = time.time
    _full: dict[str, ProjectLimit] = field(default_factory=dict)
    _shares: dict[str, ProjectLimit] = field(default_factory=dict)
    _local: LocalCounters = field(default_factory=LocalCounters)
    _redis: RedisCounters | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _redis_down: bool = False
    _redis_retry_at: float = 0.0

    def __post_init__(self) -> None:
        for p in self.projects:
            limit = ProjectLimit(p.max_concurrent, p.requests_per_minute, p.tokens_per_minute)
            if not limit.unlimited:
                self._full[p.name] = limit
                self._shares[p.name] = limit.divided(self.workers)
        if self.redis_url is not None:
            self._redis = RedisCounters(self.redis_url, self.lease_ttl_s)
        self.on_backend(self.backend)

    @property
    def backend(self) -> Backend:
        return "redis" if self._redis is not None and not self._redis_down else "local"

    def limited(self, project: str) -> bool:
        return project in self._full

    async def admit(self, project: str) -> Lease:
        """A lease, or raises RateLimited with its Retry-After."""
        now = self.clock()
        if self._redis is not None and self._use_redis(now):
            try:
                refusal, lease_id = await self._redis.admit(project, self._full[project], now)
            except _redis_errors() as exc:
                forget(exc)
                self._redis_failed(now)
            else:
                self._redis_ok()
                if refusal is not None:
                    raise RateLimited(retry_after_s=refusal)
                return Lease(project, "redis", lease_id)
        refusal = self._local.admit(project, self._shares[project], now)
        if refusal is not None:
            raise RateLimited(retry_after_s=refusal)
        return Lease(project, "local")

    def release(self, lease: Lease) -> None:
        """Give the concurrency slot back (Redis: in the background)."""
        if lease.released:
            return
        lease.released = True
        if lease.backend == "local":
            self._local.release(lease.project)
        else:
            self._background(self._release_redis(lease))

    def add_tokens(self, project: str, tokens: int) -> None:
        """Count a finished request's tokens in its minute (Redis: in the background)."""
        if project not in self._full or tokens <= 0:
            return
        now = self.clock()
        if self._redis is not None and self._use_redis(now):
            self._background(self._add_tokens_redis(project, tokens, now))
        else:
            self._local.add_tokens(project, tokens, now)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        if self._redis is not None:
            await self._redis.close()

    async def _release_redis(self, lease: Lease) -> None:
        assert self._redis is not None
        try:
            await self._redis.release(lease.project, lease.lease_id)
        except _redis_errors() as exc:
            forget(exc)  # the lease expires on its own after lease_ttl_s
            self._redis_failed(self.clock())

    async def _add_tokens_redis(self, project: str, tokens: int, now: float) -> None:
        assert self._redis is not None
        try:
            await self._redis.add_tokens(project, tokens, now)
        except _redis_errors() as exc:
            forget(exc)
            self._redis_failed(now)
            self._local.add_tokens(project, tokens, now)
        else:
            self._redis_ok()

    def _background(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _use_redis(self, now: float) -> bool:
        # While Redis is down, one try every _REDIS_RETRY_S tells whether it is back.
        return not self._redis_down or now >= self._redis_retry_at

    def _redis_ok(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("limits: redis reachable again; service-wide counters in force")
            self.on_backend("redis")

    def _redis_failed(self, now: float) -> None:
        if not self._redis_down:
            self._redis_down = True
            log.warning(
                "limits: redis unreachable; per-process shares in force (1/%d of each limit)",
                self.workers,
            )
            self.on_backend("local")
        self._redis_retry_at = now + _REDIS_RETRY_S


class Limits:
    """Everything the proxy asks before doing work for a request, for one process."""

    def __init__(self, config: Config, on_backend: Callable[[Backend], None]) -> None:
        server = config.server
        workers = server.workers
        self.in_flight = Gate(share(server.max_in_flight, workers))
        self.streams = Gate(share(server.max_streams, workers))
        self.bodies = BodyBudget(share(server.max_buffered_body_bytes, workers))
        self.max_connections = share(server.max_connections, workers)
        self.projects = ProjectLimiter(
            config.projects,
            workers,
            config.limits.redis_url,
            server.total_timeout_s + _LEASE_SLACK_S,
            on_backend,
        )
