"""Scenarios 1, 2 and 7: CPU per request (or per chunk) of each proxy's process tree, and
requests/s with the proxy on one core, under wrk; plus `serve --workers 2`.

# Strategy
CPU per request is measured at the same offered rate for every target (wrk's delay()
paces each connection), because CPU per request depends on load: a busy event loop
reads several chunks per syscall and serves several sockets per wake-up, an idle one
does not. Throughput is a separate closed-loop run, as fast as it goes. Either way the
figure is the proxy tree's CPU seconds (/proc utime+stime, children included) over the
requests completed, the median of three runs with the targets taking turns (drift on
the machine hits them alike). The proxy has CPU 0 to itself; wrk and the mock share
CPU 1, so the bottleneck is named from who was busy.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from bench import client, procs, servers, wrk
from bench.context import Context, Target


@dataclass(frozen=True, slots=True)
class Workload:
    model: str
    stream: bool
    connections: int
    rate: int | None = None  # requests/s offered in total; None: as fast as it goes
    seconds: int = 2  # per measured run


# (a) 64 chunks back to back and (c) non-streaming: paced for CPU, unpaced for throughput.
CPU = {
    "stream": Workload("mock-n64", True, 32, rate=500),
    "nonstream": Workload("mock-n64", False, 32, rate=1500),
}
MAX = {kind: dataclasses.replace(w, rate=None) for kind, w in CPU.items()}
# (b) 200 streams of 64 chunks 10 ms apart: the mock paces these itself.
# A stream takes about a second, so runs are longer: the streams cut off at either end of
# a run cost CPU without counting as completed.
STREAMS_200 = Workload("mock-n64-d10", True, 200, seconds=5)
CHUNKS = 64  # content chunks per mock-n64* stream
_BUSY = 0.9  # a CPU this busy (of 1.0) counts as saturated
REPEATS = 3  # measured runs of 2 s per target and workload (--quick: 1)


def _measure(
    ctx: Context, target: Target, workload: Workload, *, warm_up: bool = True
) -> dict[str, Any]:
    data = client.body(workload.model, workload.stream)
    delay = 1000 * workload.connections // workload.rate if workload.rate else None
    load = wrk.Wrk(
        ctx.tmp, target.host, target.port, client.PATH, data, ctx.key, workload.connections,
        seconds=1, delay_ms=delay,
    )  # fmt: skip
    if warm_up:
        load.run()  # connection pools, caches
    proxy, mock = target.proxy, ctx.mock
    proxy_before = proxy.cpu_seconds() if proxy else 0.0
    user_before = proxy.user_seconds() if proxy else 0.0
    mock_before = mock.cpu_seconds()
    background = procs.Background()
    done = dataclasses.replace(load, seconds=ctx.budget(workload.seconds, 2)).run()
    proxy_cpu = proxy.cpu_seconds() - proxy_before if proxy else 0.0
    proxy_user = proxy.user_seconds() - user_before if proxy else 0.0
    mock_cpu = mock.cpu_seconds() - mock_before
    count, wall = max(done.requests, 1), done.seconds
    out: dict[str, Any] = {
        "requests": done.requests,
        "errors": done.errors,
        "seconds": round(wall, 3),
        "rps": round(done.requests / wall, 1),
        "proxy_cpu_s": round(proxy_cpu, 3),
        "cpu_us_per_request": round(proxy_cpu / count * 1e6, 1) if proxy else None,
        # Of that, outside the kernel (the kernel's part is the reads, writes and epoll).
        "user_us_per_request": round(proxy_user / count * 1e6, 1) if proxy else None,
        "mock_cpu_us_per_request": round(mock_cpu / count * 1e6, 1),
        "proxy_util": round(proxy_cpu / wall, 3) if proxy else None,
        "mock_util": round(mock_cpu / wall, 3),
        "wrk_util": round(done.cpu_s / wall, 3),
        "background_util": round(background.share(), 3),
    }
    if workload.rate:
        out["bottleneck"] = f"paced at {workload.rate}/s"
    elif proxy and proxy_cpu / wall >= _BUSY * len(os.sched_getaffinity(proxy.pid)):
        out["bottleneck"] = "proxy"
    elif (mock_cpu + done.cpu_s) / wall >= _BUSY:
        out["bottleneck"] = "load generator + mock (CPU 1)"
    elif out["background_util"] > 0.2:
        out["bottleneck"] = "none saturated; other processes took CPU"
    else:
        out["bottleneck"] = "none saturated"
    return out


def _median_run(
    ctx: Context, targets: list[Target], workload: Workload, key: str
) -> dict[str, Any]:
    """`_measure` REPEATS times per target, the targets interleaved so that drift on the
    machine (other tenants, frequency) hits them alike; per target, the run with the
    median `key`, plus every run's `key` to show the spread."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for rep in range(ctx.budget(REPEATS, 1)):
        for target in targets:
            runs[target.name].append(_measure(ctx, target, workload, warm_up=rep == 0))
    out = {}
    for name, figures in runs.items():
        field = key if figures[0][key] is not None else "mock_cpu_us_per_request"
        ordered = sorted(figures, key=lambda f: f[field])
        out[name] = {**ordered[len(ordered) // 2], "runs": [f[field] for f in figures]}
    return out


def _each(ctx: Context, workloads: dict[str, Workload], key: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind, workload in workloads.items():
        results[kind] = _median_run(ctx, ctx.targets, workload, key)
        for name, figures in results[kind].items():
            print(f"  {kind:9} {name:14} {_line(figures)}")
    return results


def run_cpu(ctx: Context) -> dict[str, Any]:
    """(a) streaming 64 chunks, (c) non-streaming: CPU per request at a fixed rate."""
    return _each(ctx, CPU, "cpu_us_per_request")


def run_max(ctx: Context) -> dict[str, Any]:
    """(a) and (c) as fast as they go: requests/s with the proxy on one core."""
    return _each(ctx, MAX, "rps")


def run_streams(ctx: Context) -> dict[str, Any]:
    """(b) 200 concurrent streams of 64 chunks 10 ms apart: CPU per chunk."""
    results = _median_run(ctx, ctx.targets, STREAMS_200, "cpu_us_per_request")
    for name, figures in results.items():
        figures["chunks"] = chunks = figures["requests"] * CHUNKS
        if figures["cpu_us_per_request"] is not None:
            figures["cpu_us_per_chunk"] = round(figures["proxy_cpu_s"] / max(chunks, 1) * 1e6, 2)
        print(f"  streams   {name:14} {_line(figures)}")
    return results


def run_workers(ctx: Context) -> dict[str, Any]:
    """`serve --workers 2` on both cores (shared with wrk and the mock), if available."""
    if not servers.zrproxy_has_flag("--workers"):
        print("  workers mode not available")
        return {"available": False}
    both = f"{procs.PROXY_CPUS},{procs.LOAD_CPU}"
    flags = ("--workers", "2")
    proxy = servers.start_zrproxy(
        ctx.tmp, "zrproxy-workers2", ctx.mock, ctx.key_sha256, flags=flags, cpus=both
    )
    try:
        if len(proxy.pids()) < 3:  # the parent and two workers
            print("  workers mode not available (--workers 2 runs a single process)")
            return {"available": False}
        target = Target("zrproxy-workers2", proxy.host, proxy.port, proxy)
        results: dict[str, Any] = {"available": True, "cpus": both}
        for kind, workload in MAX.items():
            wide = dataclasses.replace(workload, connections=64)
            results[kind] = _median_run(ctx, [target], wide, "rps")[target.name]
            print(f"  {kind:9} workers=2       {_line(results[kind])}")
        return results
    finally:
        proxy.stop()


def _line(f: dict[str, Any]) -> str:
    return (
        f"{f['rps']:>8} req/s  cpu/req={f['cpu_us_per_request']} us  proxy={f['proxy_util']} "
        f"mock={f['mock_util']} wrk={f['wrk_util']} others={f['background_util']} "
        f"errors={f['errors']}  [{f['bottleneck']}]"
    )
