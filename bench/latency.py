"""Scenarios 3 and 4: added latency at low load, and chunk pacing through each proxy.

# Strategy
Latency: one keep-alive connection per target and requests strictly one at a time,
round-robin over the targets (the order rotates each round) so drift on the machine hits
every target alike. Overhead is reported later as via-proxy minus direct, per percentile.
Pacing: a few concurrent mock-n20-d100 streams per target; the gaps between content
events should be 100 ms, and any buffering or batching in a proxy shows as deviation.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from typing import Any

from bench import client
from bench.context import Context, Target

WORKLOADS = {"stream": ("mock-n64", True), "nonstream": ("mock-n64", False)}
PACING_MODEL = "mock-n20-d100"
PACING_GAP_S = 0.100


def percentiles(samples: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 in milliseconds."""
    if len(samples) < 2:
        return {"p50": None, "p90": None, "p99": None}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {f"p{q}": round(cuts[q - 1] * 1000, 4) for q in (50, 90, 99)}


async def run(ctx: Context) -> dict[str, Any]:
    count = ctx.budget(300, 100)
    results: dict[str, Any] = {}
    for kind, (model, stream) in WORKLOADS.items():
        results[kind] = await _sequential(ctx, kind, client.body(model, stream), count)
    return results


async def _sequential(ctx: Context, kind: str, data: bytes, count: int) -> dict[str, Any]:
    targets = ctx.targets
    conns = {t.name: client.Connection(t.host, t.port) for t in targets}
    raw = {t.name: client.request(t.host, t.port, data, ctx.key) for t in targets}
    ttfb: dict[str, list[float]] = {t.name: [] for t in targets}
    ttlb: dict[str, list[float]] = {t.name: [] for t in targets}
    errors = dict.fromkeys(conns, 0)
    for t in targets:  # warm-up: connections, pools, caches
        for _ in range(20):
            await conns[t.name].exchange(raw[t.name])
    deadline = time.monotonic() + ctx.budget(60, 20)
    gc.collect()
    gc.disable()  # our own collector pauses would land on one target at random
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            for t in targets[i % len(targets) :] + targets[: i % len(targets)]:
                ex = await conns[t.name].exchange(raw[t.name])
                if ex.status != 200:
                    errors[t.name] += 1
                ttfb[t.name].append(ex.ttfb)
                ttlb[t.name].append(ex.ttlb)
    finally:
        gc.enable()
        for conn in conns.values():
            await conn.close()
    out: dict[str, Any] = {}
    for t in targets:
        out[t.name] = {
            "n": len(ttfb[t.name]),
            "errors": errors[t.name],
            "ttfb_ms": percentiles(ttfb[t.name]),
            "ttlb_ms": percentiles(ttlb[t.name]),
            "ttfb_samples_ms": [round(s * 1000, 4) for s in ttfb[t.name]],
            "ttlb_samples_ms": [round(s * 1000, 4) for s in ttlb[t.name]],
        }
        print(f"  {kind:9} {t.name:14} ttfb={out[t.name]['ttfb_ms']} ttlb={out[t.name]['ttlb_ms']}")
    return out


async def pacing(ctx: Context) -> dict[str, Any]:
    streams = ctx.budget(10, 3)
    data = client.body(PACING_MODEL, True)
    results: dict[str, Any] = {}
    for target in ctx.targets:
        results[target.name] = figures = await _pace(ctx, target, data, streams)
        print(f"  pacing    {target.name:14} {figures}")
    return results


async def _pace(ctx: Context, target: Target, data: bytes, streams: int) -> dict[str, Any]:
    raw = client.request(target.host, target.port, data, ctx.key)
    conns = [client.Connection(target.host, target.port) for _ in range(streams)]
    try:
        exchanges = await asyncio.wait_for(
            asyncio.gather(*(c.exchange(raw) for c in conns)), timeout=15
        )
    finally:
        for conn in conns:
            await conn.close()
    gaps = [b - a for ex in exchanges for a, b in zip(ex.events, ex.events[1:], strict=False)]
    deviations = [abs(g - PACING_GAP_S) * 1000 for g in gaps]
    return {
        "streams": streams,
        "events": sum(len(ex.events) for ex in exchanges),
        "gaps": len(gaps),
        "max_deviation_ms": round(max(deviations), 3) if deviations else None,
        "mean_deviation_ms": round(statistics.fmean(deviations), 3) if deviations else None,
        "mean_gap_ms": round(statistics.fmean(gaps) * 1000, 3) if gaps else None,
    }
