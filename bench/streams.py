"""Scenarios 5 and 6: memory per open stream, and abort propagation to the upstream.

# Strategy
Memory: RSS of the proxy tree (VmRSS) before, while N slow streams are open (each gets
one chunk a second, so buffers are in use), and after they close and the mock has seen
every upstream request end. Abort: clients close right after their first body bytes;
the mock's `/_mock/stats` says when each upstream request (found by our x-request-id)
ended and how, on the same monotonic clock as ours.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
from typing import Any

import aiohttp

from bench import client
from bench.context import Context, Target
from bench.servers import Server

SLOW_MODEL = "mock-n600-d1000"  # ten minutes, a chunk a second
ABORT_MODEL = "mock-n64-d100"  # 6.4 s: a stream nobody cancels ends "completed"
_ENDED = ("completed", "disconnected", "reset", "errored")
# Connections opened at once: below the mock's listen backlog (aiohttp's default, 128),
# or SYNs to it are dropped and retried a second later.
_BATCH = 100


async def mock_stats(mock: Server) -> dict[str, Any]:
    url = f"http://{mock.host}:{mock.port}/_mock/stats"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        result: dict[str, Any] = await response.json()
        return result


async def _ended(mock: Server) -> int:
    stats = await mock_stats(mock)
    return sum(stats[name] for name in _ENDED)


async def memory(ctx: Context) -> dict[str, Any]:
    # A proxy holds two sockets per stream; without CAP_SYS_RESOURCE the fd hard limit
    # (often 20,000 in containers) caps "10k" slightly below 10,000.
    big = min(10_000, (ctx.fd_limit - 256) // 2)
    sizes = {"500": 500} if ctx.quick else {"500": 500, "5k": 5_000, "10k": big}
    results: dict[str, Any] = {}
    for target in ctx.targets:
        results[target.name] = {}
        for label, n in sizes.items():
            figures = await _hold(ctx, target, n)
            results[target.name][label] = figures
            print(f"  memory    {target.name:14} n={n}: {figures}")
    return results


async def _hold(ctx: Context, target: Target, n: int) -> dict[str, Any]:
    proxy = target.proxy
    assert proxy is not None
    loop = asyncio.get_running_loop()
    raw = client.request(target.host, target.port, client.body(SLOW_MODEL, True), ctx.key)
    await asyncio.sleep(1)
    ended_before = await _ended(ctx.mock)
    before = proxy.rss_kib()
    started = loop.time()
    holders = await client.open_streams(
        target.host, target.port, [raw] * n, batch=_BATCH, deadline=started + ctx.budget(120, 30)
    )
    open_s = loop.time() - started
    await asyncio.sleep(2)  # steady state: every stream has had a chunk or two relayed
    during = proxy.rss_kib()
    for holder in holders:
        holder.close()
    for _ in range(40):  # up to 20 s for the mock to see every upstream request end
        if await _ended(ctx.mock) >= ended_before + len(holders):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(3)  # zrproxy hands freed memory back within a second of going idle
    after = proxy.rss_kib()
    return {
        "streams": n,
        "opened": len(holders),
        "all_opened": len(holders) == n,
        "open_seconds": round(open_s, 2),
        "rss_before_kib": before,
        "rss_open_kib": during,
        "rss_after_kib": after,
        "kib_per_stream": round((during - before) / max(len(holders), 1), 2),
        "after_minus_before_kib": after - before,
    }


async def abort(ctx: Context) -> dict[str, Any]:
    n = ctx.budget(100, 30)
    results: dict[str, Any] = {}
    for target in ctx.targets:
        results[target.name] = figures = await _abort(ctx, target, n)
        print(f"  abort     {target.name:14} {figures}")
    return results


async def _abort(ctx: Context, target: Target, n: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    data = client.body(ABORT_MODEL, True)
    run_id = secrets.token_hex(4)
    rids = {
        client.request(target.host, target.port, data, ctx.key, rid): rid
        for rid in (f"abort-{target.name}-{run_id}-{i}" for i in range(n))
    }
    holders = await client.open_streams(
        target.host,
        target.port,
        list(rids),
        batch=min(n, _BATCH),
        deadline=loop.time() + 20,
        close_on_first=True,
    )
    await asyncio.sleep(1.5)
    records = (await mock_stats(ctx.mock))["requests"]
    lags, ends = [], []
    for holder in holders:
        record = records.get(rids[holder.raw_request], {})
        ends.append(record.get("end"))
        if record.get("end") == "disconnected" and record.get("ended_at") is not None:
            lags.append(record["ended_at"] - holder.closed_at)
    within = sum(1 for lag in lags if lag <= 1.0)
    return {
        "streams": n,
        "aborted": len(holders),
        "closed_within_1s": within,
        "percent_within_1s": round(100 * within / max(len(holders), 1), 1),
        "still_open_or_completed": len(holders) - len(lags),
        "lag_ms_median": round(statistics.median(lags) * 1000, 2) if lags else None,
        "lag_ms_max": round(max(lags) * 1000, 2) if lags else None,
        "ends": {str(e): ends.count(e) for e in set(ends)},
    }
