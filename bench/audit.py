"""Scenario `audit`: what the content audit log costs, next to zero retention, in one run.

# Strategy
One zrproxy process (pinned to CPU 0 like every proxy here) holds two projects: `zr`
(zero retention) and `beta` (an audit log sealed to a throwaway age recipient, written
to the run's scratch directory). The two keys take turns on the same process, so both
see the same machine: per-chunk CPU at the paced `mock-n64` stream rate of the `cpu`
scenario (the writer thread's sealing and file writes run in the proxy process, so they
are in its CPU), then TTFB of requests sent one at a time, alternating keys. Also prints
how many records were written and dropped. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import urllib.request
from typing import Any

import uvloop
from pyrage import x25519

from bench import client, servers, throughput
from bench.context import Context, Target
from bench.latency import percentiles
from zrproxy.auth import new_key

PROJECTS = ("zr", "beta")


def _config(ctx: Context, digests: dict[str, str], admin_port: int) -> str:
    recipient = str(x25519.Identity.generate().to_public())  # nobody keeps the identity
    mock = ctx.mock
    return (
        "[server]\n"
        f'listen = "127.0.0.1:{servers.free_port()}"\n'
        f'admin_listen = "127.0.0.1:{admin_port}"\n'
        "[audit]\n"
        f'dir = "{ctx.tmp / "audit"}"\n'
        "[[upstreams]]\n"
        'name = "mock"\nkind = "openai"\nzero_data_retention = true\n'
        f'base_url = "http://{mock.host}:{mock.port}/v1"\n'
        "[[routes]]\n"
        'model = "*"\nupstreams = ["mock"]\n'
        "[[projects]]\n"
        f'name = "zr"\nkey_sha256 = ["{digests["zr"]}"]\n'
        "[[projects]]\n"
        f'name = "beta"\nkey_sha256 = ["{digests["beta"]}"]\nzero_retention = false\n'
        f'audit_log = {{ recipient = "{recipient}", retention_days = 1 }}\n'
    )


def run(ctx: Context) -> dict[str, Any]:
    keys, digests = {}, {}
    for name in PROJECTS:
        keys[name], digests[name] = new_key()
    admin_port = servers.free_port()
    config = _config(ctx, digests, admin_port)
    proxy = servers.start_zrproxy(ctx.tmp, "zrproxy-audit", ctx.mock, "", config_text=config)
    try:
        target = Target("zrproxy-audit", proxy.host, proxy.port, proxy)
        results: dict[str, Any] = {"cpu": _cpu(ctx, target, keys)}
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results["ttfb"] = runner.run(_ttfb(ctx, target, keys))
        results["records"] = _records(admin_port)
    finally:
        proxy.stop()
    for name in PROJECTS:
        cpu, ttfb = results["cpu"][name], results["ttfb"]
        print(
            f"  {name:5} cpu/chunk={cpu['cpu_us_per_chunk']} us (runs {cpu['runs']})  "
            f"ttfb p50/p99 stream={ttfb['stream'][name]['p50']}/{ttfb['stream'][name]['p99']} ms "
            f"nonstream={ttfb['nonstream'][name]['p50']}/{ttfb['nonstream'][name]['p99']} ms"
        )
    print(f"  audit records: {results['records']}")
    print("  (taken on a machine shared with other work: compare the two rows, not runs)")
    return results


def _cpu(ctx: Context, target: Target, keys: dict[str, str]) -> dict[str, Any]:
    """Per-chunk CPU at the `cpu` scenario's paced stream rate, the keys taking turns."""
    workload = throughput.CPU["stream"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PROJECTS}
    for rep in range(ctx.budget(throughput.REPEATS, 1)):
        for name in PROJECTS:
            keyed = dataclasses.replace(ctx, key=keys[name])
            runs[name].append(throughput._measure(keyed, target, workload, warm_up=rep == 0))
    out = {}
    for name, figures in runs.items():
        per_chunk = [
            round(f["proxy_cpu_s"] / max(f["requests"] * throughput.CHUNKS, 1) * 1e6, 3)
            for f in figures
        ]
        middle = sorted(range(len(figures)), key=per_chunk.__getitem__)[len(figures) // 2]
        out[name] = {**figures[middle], "cpu_us_per_chunk": per_chunk[middle], "runs": per_chunk}
    return out


async def _ttfb(ctx: Context, target: Target, keys: dict[str, str]) -> dict[str, Any]:
    """TTFB percentiles per project, requests one at a time, the keys alternating."""
    out: dict[str, Any] = {}
    count = ctx.budget(300, 60)
    for kind, stream in (("stream", True), ("nonstream", False)):
        data = client.body("mock-n64", stream)
        conns = {n: client.Connection(target.host, target.port) for n in PROJECTS}
        raw = {n: client.request(target.host, target.port, data, keys[n]) for n in PROJECTS}
        samples: dict[str, list[float]] = {n: [] for n in PROJECTS}
        for i in range(20 + count):
            for name in PROJECTS if i % 2 else PROJECTS[::-1]:
                exchange = await conns[name].exchange(raw[name])
                if i >= 20 and exchange.status == 200:  # the first 20: warm-up
                    samples[name].append(exchange.ttfb)
        for conn in conns.values():
            await conn.close()
        out[kind] = {
            n: {"n": len(s), **percentiles(s), "mean": round(statistics.fmean(s) * 1000, 4)}
            for n, s in samples.items()
        }
    return out


def _records(admin_port: int) -> dict[str, float]:
    """zrproxy_audit_records_total by outcome, from the proxy's /metrics."""
    url = f"http://127.0.0.1:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("zrproxy_audit_records_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = found.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return found
