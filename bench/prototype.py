"""`python -m bench.prototype`: nginx, zrproxy and the raw-Protocol prototype relay
(bench/prototype_relay.py, not production code; bare, and with `--zrproxy-pieces` as
"prototype-full") side by side, measured the way `python -m bench` measures: CPU per
request at the same fixed offered rates, requests/s on one core, and TTFB overhead at
low load. Prints a Markdown table; asserts and writes nothing.

TTFB also for a 2-chunk stream (`mock-n2`): the client shares CPU 1 with the mock, and
while the mock writes 64 chunks back to back it competes with the client for that CPU,
which blurs the proxy's own share of the 64-chunk figure (see bench/README.md).

About two minutes (`--quick`: about one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import client, latency, procs, servers, throughput, wrk
from bench.context import Context, Target
from zrproxy.auth import new_key

PROXIES = ("nginx", "zrproxy", "prototype", "prototype-full")
_READY = re.compile(r"prototype relay ready: http://(\S+):(\d+)")


def start_prototype(
    tmp: Path, mock: servers.Server, key_sha256: str, name: str = "prototype"
) -> servers.Server:
    log = tmp / f"{name}.log"
    cmd = [
        sys.executable, "-m", "bench.prototype_relay", "--listen", "127.0.0.1:0",
        "--upstream", f"{mock.host}:{mock.port}", "--key-sha256", key_sha256,
    ]  # fmt: skip
    if name == "prototype-full":
        cmd.append("--zrproxy-pieces")
    process = servers._spawn(cmd, log, procs.PROXY_CPUS)
    match = servers._wait_ready(process, log, _READY)
    return servers.Server(name, process, match.group(1), int(match.group(2)), log)


async def _smoke(ctx: Context) -> list[str]:
    """One exchange per target and workload: a 200, and 64 content events when streaming."""
    problems = []
    for target in ctx.targets:
        for model, stream in latency.WORKLOADS.values():
            raw = client.request(target.host, target.port, client.body(model, stream), ctx.key)
            conn = client.Connection(target.host, target.port)
            try:
                ex = await conn.exchange(raw, timeout_s=10)
            finally:
                await conn.close()
            events = len(ex.events) if stream else throughput.CHUNKS
            if ex.status != 200 or events != throughput.CHUNKS:
                problems.append(f"{target.name} stream={stream}: {ex.status}, {events} events")
    return problems


def _cpu(ctx: Context, workloads: dict[str, throughput.Workload], key: str) -> dict[str, Any]:
    proxies = dataclasses.replace(ctx, targets=ctx.pick(*PROXIES))
    out: dict[str, Any] = {}
    for kind, workload in workloads.items():
        background = procs.Background()
        out[kind] = throughput._median_run(proxies, proxies.targets, workload, key)
        for name, figures in out[kind].items():
            print(f"  {kind:9} {name:10} {throughput._line(figures)}  runs={figures['runs']}")
        print(f"  (others used {background.share():.2f} CPUs)", flush=True)
    return out


# bench's two latency workloads, plus the diagnostic short stream
LATENCY = {**latency.WORKLOADS, "stream-n2": ("mock-n2", True)}


def _latency(ctx: Context, count: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        out = {}
        for kind, (model, stream) in LATENCY.items():
            data = client.body(model, stream)
            out[kind] = await latency._sequential(ctx, kind, data, count)
        return out

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run())


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.1f}x" if value is not None and base else "-"


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, dict[str, float | None], int, str]] = []
    for kind, label in (("stream", "(a) stream, 64 chunks"), ("nonstream", "(c) non-stream")):
        workload = throughput.CPU[kind]
        figures = results["cpu"][kind]
        values = {n: figures[n]["cpu_us_per_request"] for n in PROXIES if n in figures}
        rows.append((f"{label}: CPU us/request at {workload.rate:,}/s", values, 0, "<= 2x nginx"))
    for kind, label in (("stream", "(a) stream"), ("nonstream", "(c) non-stream")):
        figures = results["max"][kind]
        values = {n: figures[n]["rps"] for n in PROXIES if n in figures}
        rows.append((f"{label}: requests/s, closed loop, one core [1]", values, 0, ""))
    lat = results["latency"]
    labels = (
        ("stream", "stream, 64 chunks", True),
        ("nonstream", "non-stream", True),
        ("stream-n2", "stream, 2 chunks [3]", False),
    )
    for kind, label, has_target in labels:
        for q, target in (("p50", "<= 0.3 ms"), ("p99", "<= 1 ms")):
            direct = lat[kind]["direct"]["ttfb_ms"][q]
            values = {n: lat[kind][n]["ttfb_ms"][q] - direct for n in PROXIES if n in lat[kind]}
            shown = target if has_target else ""
            rows.append((f"TTFB overhead {q}, {label} (ms) [2]", values, 3, shown))
    others = PROXIES[1:]
    head = "| figure | " + " | ".join(PROXIES) + " | "
    head += " | ".join(f"{n} / nginx" for n in others) + " | target |"
    lines = [head, "|---" * (2 * len(PROXIES) + 1) + "|"]
    for label, values, digits, target in rows:
        cells = [_cell(values.get(n), digits) for n in PROXIES]
        base = values.get("nginx")
        ratios = [_ratio(values.get(n), base) for n in others]
        lines.append(f"| {label} | " + " | ".join([*cells, *ratios, target]) + " |")
    lines.append(
        "\n[1] wrk + the mock share CPU 1: when they are the bottleneck, a figure is a lower"
        " bound for that proxy (see the run lines above).\n[2] bench's client (client.py):"
        " via the proxy minus direct to the mock, per percentile, sequential requests on one"
        " keep-alive connection each, round-robin over the targets.\n[3] diagnostic, no"
        " target: `mock-n2`, so the mock is not writing 64 chunks on the client's CPU."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prototype", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one run each, 100 requests")
    args = parser.parse_args(argv)
    if wrk.WRK is None or servers.nginx_version() == "not installed":
        print("needs wrk and nginx (make system-deps)")
        return 1
    procs.pin_self_to_load_cpu()  # the mock and wrk inherit it; proxies get CPU 0
    procs.raise_priority()
    fd_limit = procs.raise_fd_limit()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zrproto-") as tmp_dir:
        tmp = Path(tmp_dir)
        key, digest = new_key()
        mock = servers.start_mock(tmp)
        started: list[servers.Server] = []
        try:
            started.append(servers.start_nginx(tmp, mock))
            started.append(servers.start_zrproxy(tmp, "zrproxy", mock, digest))
            started.append(start_prototype(tmp, mock, digest))
            started.append(start_prototype(tmp, mock, digest, "prototype-full"))
            targets = [Target("direct", mock.host, mock.port, None)]
            targets += [Target(s.name, s.host, s.port, s) for s in started]
            ctx = Context(tmp, tmp, key, digest, mock, targets, args.quick, fd_limit)
            problems = asyncio.run(_smoke(ctx))
            if problems:
                print("smoke check failed:\n  " + "\n  ".join(problems))
                return 1
            results: dict[str, Any] = {}
            print("== cpu (fixed offered rate)", flush=True)
            results["cpu"] = _cpu(ctx, throughput.CPU, "cpu_us_per_request")
            print("== throughput (closed loop)", flush=True)
            results["max"] = _cpu(ctx, throughput.MAX, "rps")
            print("== latency (sequential)", flush=True)
            results["latency"] = _latency(ctx, ctx.budget(300, 100))
        finally:
            for server in reversed(started):
                server.stop()
            mock.stop()
    print(f"== done in {time.monotonic() - began:.0f} s\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
