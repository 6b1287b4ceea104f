"""`python -m bench`: start the mock, zrproxy (default and --scrub-memory) and nginx, run
the scenarios side by side, and write bench/results/latest.{md,json,png}.

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from bench import audit, latency, procs, profile, report, servers, streams, throughput, wrk
from bench.context import Context, Target
from zrproxy.auth import new_key

RESULTS = Path(__file__).parent / "results"
TARGETS = ("direct", "nginx", "zrproxy", "zrproxy-scrub", "zrproxy-pymalloc")
# zrproxy-pymalloc (server.allocator = "pymalloc") runs when named in --targets.
DEFAULT_TARGETS = TARGETS[:-1]
# scenario -> (which targets it compares, how to run it)
SCENARIOS: dict[str, tuple[tuple[str, ...], Callable[[Context], Any]]] = {
    "cpu": (TARGETS, throughput.run_cpu),
    "throughput": (TARGETS, throughput.run_max),
    "streams": (TARGETS, throughput.run_streams),
    "latency": (TARGETS, lambda ctx: _async(latency.run(ctx))),
    "pacing": (TARGETS[:3], lambda ctx: _async(latency.pacing(ctx))),
    "abort": (TARGETS[:3], lambda ctx: _async(streams.abort(ctx))),
    "memory": (TARGETS[1:], lambda ctx: _async(streams.memory(ctx))),
    "workers": ((), throughput.run_workers),
    "audit": ((), audit.run),
    "profile": (("zrproxy",), profile.run),
}
DEFAULT = tuple(s for s in SCENARIOS if s != "profile")  # profile: only when asked for


def _async(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about 2 minutes)")
    parser.add_argument(
        "--only",
        help=f"comma-separated scenarios: {','.join(SCENARIOS)} (default: all but profile)",
    )
    parser.add_argument("--profile", action="store_true", help="also run the profile scenario")
    parser.add_argument("--targets", help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return parser


def _names(
    value: str | None, known: tuple[str, ...], what: str, default: tuple[str, ...] = ()
) -> list[str]:
    names = value.split(",") if value else list(default or known)
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(sorted(unknown))}")
    return [n for n in known if n in names]


def _start(tmp: Path, names: list[str], mock: servers.Server, digest: str) -> list[Target]:
    targets = []
    for name in names:
        if name == "direct":
            targets.append(Target(name, mock.host, mock.port, None))
            continue
        if name == "nginx":
            proxy = servers.start_nginx(tmp, mock)
        else:
            flags = {
                "zrproxy-scrub": ("--scrub-memory",),
                "zrproxy-pymalloc": ("--allocator", "pymalloc"),
            }.get(name, ())
            proxy = servers.start_zrproxy(tmp, name, mock, digest, flags=flags)
        targets.append(Target(name, proxy.host, proxy.port, proxy))
    return targets


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scenarios = _names(args.only, tuple(SCENARIOS), "scenario") if args.only else list(DEFAULT)
    if args.profile and "profile" not in scenarios:
        scenarios.append("profile")
    wanted = _names(args.targets, TARGETS, "target", DEFAULT_TARGETS)
    needs_wrk = ("cpu", "throughput", "streams", "workers", "profile", "audit")
    if wrk.WRK is None and set(needs_wrk) & set(scenarios):
        print(f"wrk not found: skipping {', '.join(needs_wrk)}")
        scenarios = [s for s in scenarios if s not in needs_wrk]
    if "nginx" in wanted and servers.nginx_version() == "not installed":
        print("nginx not found: no nginx column")
        wanted.remove("nginx")
    if not procs.can_pin():
        print("fewer than 2 CPUs or no taskset: nothing is pinned")
    procs.pin_self_to_load_cpu()  # the mock and wrk inherit it; proxies get CPU 0
    results: dict[str, Any] = {"machine": report.machine(), "quick": args.quick}
    results["niceness"] = procs.raise_priority()
    results["fd_limit"] = fd_limit = procs.raise_fd_limit()
    idle = procs.Background()
    time.sleep(2)
    results["background_cpu"] = {"before start": round(idle.share(), 2)}
    if idle.share() > 0.25:
        print(f"WARNING: other processes are using {idle.share():.1f} CPUs: expect noisy figures")
    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zrbench-") as tmp_dir:
        tmp = Path(tmp_dir)
        key, digest = new_key()
        mock = servers.start_mock(tmp)
        targets: list[Target] = []
        try:
            targets = _start(tmp, wanted, mock, digest)
            ctx = Context(tmp, args.out, key, digest, mock, targets, args.quick, fd_limit)
            for name in scenarios:
                names, runner = SCENARIOS[name]
                print(f"== {name}", flush=True)
                started, background = time.monotonic(), procs.Background()
                results[name] = runner(dataclasses.replace(ctx, targets=ctx.pick(*names)))
                results["background_cpu"][name] = share = round(background.share(), 2)
                print(f"   ({time.monotonic() - started:.0f} s; others used {share} CPUs)")
        finally:
            for target in reversed(targets):
                if target.proxy is not None:
                    target.proxy.stop()
            mock.stop()
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    print(f"== done in {results['elapsed_s']} s")
    report.write(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
