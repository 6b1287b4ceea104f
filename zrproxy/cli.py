"""The `zrproxy` command: serve, check-config, keygen, mock-upstream.

`main(argv) -> int` is the whole program, so tests run it in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from zrproxy import hardening, mock_upstream
from zrproxy.app import Service, run_loop, settle_heap, stop_requested
from zrproxy.auth import new_key
from zrproxy.config import (
    Config,
    embedded_default,
    load_config,
    parse_address,
    process_environment,
)
from zrproxy.connection import check_http_parser
from zrproxy.errors import ConfigError, StartupError
from zrproxy.reload import reload_on_sighup
from zrproxy.workers import Supervisor

log = logging.getLogger("zrproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zrproxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML config file (default: embedded demo config)")
    serve.add_argument("--listen", help="override server.listen (HOST:PORT)")
    serve.add_argument("--admin-listen", help="override server.admin_listen (HOST:PORT)")
    serve.add_argument("--workers", type=int, help="override server.workers")
    serve.add_argument("--scrub-memory", action="store_true", help="set server.scrub_memory")
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    keygen = commands.add_parser("keygen", help="print a new API key and its key_sha256")
    keygen.add_argument("--project", default="my-project")
    mock = commands.add_parser("mock-upstream", help="run the bundled mock upstream")
    mock.add_argument("--listen", default="127.0.0.1:9999")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "keygen":
            return _keygen(args.project)
        if args.command == "mock-upstream":
            return mock_upstream.main(["--listen", args.listen])
        return _serve(args, argv)
    except ConfigError as exc:
        sys.stderr.write(f"config error: {exc}\n")
        return 2
    except (StartupError, hardening.HardeningError) as exc:
        sys.stderr.write(f"startup error: {exc}\n")
        return 2


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


def _check_config(path: str) -> int:
    config = load_config(path)
    lines = [
        f"config ok: {path}",
        f"  listen {config.server.listen}, admin {config.server.admin_listen}",
        f"  {len(config.upstreams)} upstreams: " + ", ".join(u.name for u in config.upstreams),
        f"  {len(config.routes)} routes: " + ", ".join(r.name for r in config.routes),
        f"  {len(config.projects)} projects: " + ", ".join(p.name for p in config.projects),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _keygen(project: str) -> int:
    key, digest = new_key()
    sys.stdout.write(
        f"API key (shown once, store it now): {key}\n"
        f'Add to [[projects]] name = "{project}":\n'
        f'key_sha256 = ["{digest}"]\n'
    )
    return 0


def _server_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`[server]` settings given on the command line, validated like the file's."""
    changes: dict[str, Any] = {}
    if args.listen:
        changes["listen"] = parse_address("--listen", args.listen)
    if args.admin_listen:
        changes["admin_listen"] = parse_address("--admin-listen", args.admin_listen)
    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError("--workers", "must be a positive integer")
        changes["workers"] = args.workers
    if args.scrub_memory:
        changes["scrub_memory"] = True
    return changes


def _with(config: Config, changes: dict[str, Any]) -> Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **changes))


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    check_http_parser()
    environ = process_environment()
    # Every mistake is reported before the process changes anything about itself.
    changes = _server_overrides(args)
    config = _with(load_config(args.config), changes) if args.config else None
    scrub = args.scrub_memory or (config is not None and config.server.scrub_memory)
    if scrub and not hardening.is_scrubbed(environ):
        log.info("scrub mode: restarting with a wiping allocator")
        hardening.reexec_scrubbed(argv, environ)
    harden = functools.partial(_harden, config is not None and config.server.mlock)
    harden()
    if config is not None:
        path = args.config

        def load() -> Config:
            return _with(load_config(path), changes)

        return run_loop(lambda: _serve_config(config, harden, load=load), scrub)
    return run_loop(lambda: _serve_embedded(changes, harden), scrub)


def _harden(mlock: bool) -> None:
    """Process hardening, in the parent and again in every worker process."""
    hardening.disable_core_dumps()
    log.info("file descriptors: limit %d per process", hardening.raise_fd_limit())
    if mlock:
        hardening.lock_memory()
    elif hardening.swap_enabled():
        log.warning("swap is on and server.mlock is off: in-flight requests may be swapped to disk")


async def _serve_config(
    config: Config,
    harden: Callable[[], None],
    banner: Callable[[str], None] | None = None,
    load: Callable[[], Config] | None = None,
) -> int:
    stop = stop_requested()
    if load is None:  # the embedded demo config has no file to read again
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: log.info("SIGHUP: no config file to reload")
        )
    if config.server.workers > 1:
        supervisor = Supervisor(config, harden)
        try:
            await supervisor.start()
            if load is not None:
                reload_on_sighup(lambda: supervisor.configured, load, supervisor.reload)
            if banner is not None:
                banner(f"http://{supervisor.api_address}")
            await supervisor.supervise(stop)
            await supervisor.drain()
        finally:
            await supervisor.stop()
        return 0
    service = Service(config)
    try:
        await service.start()
        settle_heap()
        if load is not None:
            reload_on_sighup(lambda: service.config, load, service.reload)
        if banner is not None:
            banner(f"http://{service.api_address}")
        await stop.wait()
        await service.drain()
    finally:
        await service.stop()
    return 0


async def _serve_embedded(changes: dict[str, Any], harden: Callable[[], None]) -> int:
    mock_runner, mock_url = await mock_upstream.start_mock("127.0.0.1", 0)
    key, digest = new_key()
    config = _with(embedded_default(mock_url, bytes.fromhex(digest)), changes)

    def banner(api: str) -> None:
        sys.stdout.write(
            "\nzrproxy is running on its embedded demo config: every model goes to the\n"
            f"bundled mock upstream at {mock_url}.\n"
            f"Demo API key (new at every start): {key}\n\nTry:\n"
            f"  curl -N {api}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            '-d \'{"model":"mock-n16-d100","stream":true,'
            '"messages":[{"role":"user","content":"Hello zrproxy"}]}\'\n\n'
        )
        sys.stdout.flush()

    try:
        return await _serve_config(config, harden, banner)
    finally:
        await mock_runner.cleanup()
