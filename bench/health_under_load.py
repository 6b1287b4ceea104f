"""`python -m bench.health_under_load [--streams N] [--probes N] [--extra N]`: how fast
/healthz and /readyz answer while N streams (5,000 by default) are open through zrproxy
with `max_streams = N`, and how the cap answers the streams asked for beyond it.

The admin listener has its own thread and event loop (zrproxy/admin.py); this measures
what a Kubernetes probe would see. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import uvloop

from bench import client, procs, servers
from zrproxy.auth import new_key

SLOW_MODEL = "mock-n600-d1000"  # a chunk a second for ten minutes
_BATCH = 100  # below the mock's listen backlog (see bench/streams.py)


def _probe_ms(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


async def _probes(admin: str, count: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"/healthz": [], "/readyz": []}
    for _ in range(count):
        for path, values in figures.items():
            values.append(await asyncio.to_thread(_probe_ms, admin + path))
        await asyncio.sleep(0.05)
    return figures


async def _beyond_the_cap(
    host: str, port: int, raw: bytes, count: int
) -> tuple[dict[int, int], list[float]]:
    """Streams asked for beyond the cap, one connection each: statuses and ms to answer."""
    statuses: dict[int, int] = {}
    times: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        times.append((time.perf_counter() - started) * 1000)
        status = int(head.split(b" ", 2)[1])
        statuses[status] = statuses.get(status, 0) + 1
        writer.close()
    return statuses, times


def _summary(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):7.2f} ms  p99 {p99:7.2f} ms  max {ordered[-1]:7.2f} ms"


async def run(streams: int, probes: int, extra: int) -> None:
    procs.raise_fd_limit()
    key, digest = new_key()
    with tempfile.TemporaryDirectory() as tmp:
        mock = servers.start_mock(Path(tmp))
        caps = {"max_streams": streams, "max_in_flight": streams + extra + 100}
        proxy = servers.start_zrproxy(Path(tmp), "zrproxy", mock, digest, caps=caps)
        try:
            log = proxy.log.read_text()
            admin = "http://" + log.split("admin=http://", 1)[1].split()[0]
            idle = await _probes(admin, probes)
            raw = client.request(proxy.host, proxy.port, client.body(SLOW_MODEL, True), key)
            loop = asyncio.get_running_loop()
            holders = await client.open_streams(
                proxy.host, proxy.port, [raw] * streams, batch=_BATCH, deadline=loop.time() + 180
            )
            await asyncio.sleep(2)  # steady state: every stream relays a chunk a second
            loaded = await _probes(admin, probes)
            refused, refusal_ms = await _beyond_the_cap(proxy.host, proxy.port, raw, extra)
            for holder in holders:
                holder.close()
        finally:
            proxy.stop()
            mock.stop()
    print(f"health probes, {probes} each, zrproxy with {len(holders)} of {streams} streams open")
    for path in ("/healthz", "/readyz"):
        print(f"  {path:9} idle:   {_summary(idle[path])}")
        print(f"  {path:9} loaded: {_summary(loaded[path])}")
    print(f"{extra} streams asked for beyond max_streams = {streams}: statuses {refused}")
    print(f"  answered in (connect to status line): {_summary(refusal_ms)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.health_under_load")
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--extra", type=int, default=200, help="streams asked beyond the cap")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(args.streams, args.probes, args.extra))


if __name__ == "__main__":
    main()
