"""The `zrproxy` command: serve, check-config, keygen, mock-upstream, policy, audit.

`main(argv) -> int` is the whole program, so tests run it in-process. The texts `--help`
shows are written for users (`_DESCRIPTION`, `_EPILOG`), not taken from this docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import getpass
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from zrproxy import __version__, auditcli, hardening, logs, mock_upstream
from zrproxy.app import Service, run_loop, settle_heap, stop_requested
from zrproxy.auth import key_digest, new_key
from zrproxy.checks import config_warnings
from zrproxy.config import (
    PLACEHOLDER_ENV,
    Config,
    ServerConfig,
    embedded_default,
    load_config,
    parse_address,
    process_environment,
)
from zrproxy.connection import check_http_parser
from zrproxy.errors import ConfigError, StartupError
from zrproxy.metrics import Metrics
from zrproxy.policy import policy_warnings, register_lines, report, to_json, to_text
from zrproxy.reload import reload_on_sighup
from zrproxy.routing import utc_today
from zrproxy.workers import Supervisor

log = logging.getLogger("zrproxy")


_DESCRIPTION = """\
zrproxy is a streaming reverse proxy for LLM APIs (OpenAI and Anthropic style) that
keeps no content: prompts and completions pass through memory only, and are never
logged or written to disk. Clients use their zrproxy key; the proxy adds the
provider's key, picks the upstream by model, and fails over before the first byte."""

_EPILOG = """\
examples:
  zrproxy serve                          a demo: bundled mock upstream, prints a key
                                         and a curl command to try
  zrproxy keygen --project acme          a new client key and its key_sha256 line
  zrproxy check-config config.toml       every error and warning in a config file
  zrproxy check-config --no-env config.toml
                                         the same, without the provider keys (CI)
  OPENAI_API_KEY=sk-... zrproxy serve --config config.toml

The README describes every config key; `zrproxy COMMAND --help` the options of each
command."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zrproxy",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zrproxy {__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    serve = commands.add_parser(
        "serve",
        help="run the proxy (no --config: a demo on a bundled mock)",
        description="Run the proxy. Without --config it serves an embedded demo config "
        "that sends every model to a bundled mock upstream and prints a fresh demo key.",
    )
    serve.add_argument("--config", help="TOML config file (default: embedded demo config)")
    serve.add_argument("--listen", help="override server.listen (HOST:PORT)")
    serve.add_argument("--admin-listen", help="override server.admin_listen (HOST:PORT)")
    serve.add_argument("--workers", type=int, help="override server.workers")
    serve.add_argument("--scrub-memory", action="store_true", help="set server.scrub_memory")
    serve.add_argument("--allocator", choices=("malloc", "pymalloc"), help="set server.allocator")
    check = commands.add_parser(
        "check-config",
        help="validate a config: every error and warning",
        description="Validate a config file. Prints a summary on stdout and warnings on "
        "stderr (exit 0), or every error found (exit 2). Errors name the key, never its value.",
    )
    check.add_argument("file", help="the TOML config file")
    check.add_argument(
        "--no-env",
        action="store_true",
        help="do not require the api_key_env variables to be set (for CI without secrets)",
    )
    keygen = commands.add_parser(
        "keygen",
        help="make a client API key and its key_sha256",
        description="Print a new random client API key once, and the key_sha256 line for "
        "its [[projects]] entry. The config holds only the digest. With --hash, read an "
        "existing key on stdin instead and print only its key_sha256.",
    )
    keygen.add_argument("--project", default="my-project", help="project name for the hint")
    keygen.add_argument(
        "--hash",
        action="store_true",
        help="read an existing key on stdin and print its key_sha256 (the key is not echoed)",
    )
    mock = commands.add_parser(
        "mock-upstream",
        help="run the bundled mock upstream on its own",
        description="Run the bundled mock upstream on its own, for trying zrproxy out.",
    )
    mock.add_argument("--listen", default="127.0.0.1:9999", help="HOST:PORT to listen on")
    mock.add_argument(
        "--kind",
        choices=mock_upstream.MOCK_KINDS,
        help="play one provider: answer only its paths (default: every kind's paths)",
    )
    policy = commands.add_parser(
        "policy",
        help="print what is kept per request and where traffic goes",
        description="Print, per project, what is kept per request, zero retention and the "
        "audit log, regions, every upstream it can reach with its subprocessor, and the "
        "subprocessor register (current and announced).",
    )
    policy.add_argument("--config", help="TOML config file (default: embedded demo config)")
    policy.add_argument("--project", help="only this project")
    policy.add_argument("--format", choices=("text", "json"), default="text")
    auditcli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logs.setup()
    try:
        if args.command == "check-config":
            return _check_config(args.file, args.no_env)
        if args.command == "keygen":
            return _hash_key() if args.hash else _keygen(args.project)
        if args.command == "mock-upstream":
            kind = ["--kind", args.kind] if args.kind else []
            return mock_upstream.main(["--listen", args.listen, *kind])
        if args.command == "policy":
            return _policy(args.config, args.project, args.format)
        if args.command == "audit":
            return auditcli.main(args)
        return _serve(args, argv)
    except ConfigError as exc:
        for error in getattr(exc, "errors", (exc,)):
            sys.stderr.write(f"config error: {error}\n")
        return 2
    except (StartupError, hardening.HardeningError) as exc:
        sys.stderr.write(f"startup error: {exc}\n")
        return 2


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _warnings(config: Config) -> list[str]:
    """Everything suspicious about a config that still loads: mistakes (checks) and
    policy gaps (projects a route can never serve, no subprocessor register)."""
    return [str(w) for w in config_warnings(config, _cpus())] + policy_warnings(config, utc_today())


def _check_config(path: str, no_env: bool) -> int:
    config = load_config(path, PLACEHOLDER_ENV if no_env else None)
    for warning in _warnings(config):
        sys.stderr.write(f"warning: {warning}\n")
    lines = [
        f"config ok: {path}",
        f"  listen {config.server.listen}, admin {config.server.admin_listen}",
        f"  {len(config.upstreams)} upstreams: " + ", ".join(u.name for u in config.upstreams),
        f"  {len(config.routes)} routes: " + ", ".join(r.name for r in config.routes),
        f"  {len(config.projects)} projects: " + ", ".join(p.name for p in config.projects),
    ]
    sys.stdout.write("\n".join([*lines, *register_lines(config, utc_today())]) + "\n")
    return 0


def _policy(path: str | None, project: str | None, fmt: str) -> int:
    if path is not None:
        config = load_config(path)
    else:
        config = embedded_default("http://127.0.0.1:9999/v1", bytes(32))
    if project is not None and all(p.name != project for p in config.projects):
        raise ConfigError("--project", "no such project in the config")
    data = report(config, Metrics(), utc_today(), project)
    sys.stdout.write(to_json(data).decode() + "\n" if fmt == "json" else to_text(data))
    return 0


def _hash_key() -> int:
    """`keygen --hash`: the key_sha256 of a key read on stdin (one line; never echoed)."""
    # At a terminal, read without echo: the key should not stay on the screen either.
    key = (getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline()).strip()
    if not key:
        sys.stderr.write("keygen --hash: no key on stdin\n")
        return 2
    sys.stdout.write(f'key_sha256 = ["{key_digest(key)}"]\n')
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
    if args.allocator is not None:
        changes["allocator"] = args.allocator
    return changes


def _with_server(changes: dict[str, Any]) -> ServerConfig:
    return dataclasses.replace(ServerConfig(), **changes)


def _with(config: Config, changes: dict[str, Any]) -> Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **changes))


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    check_http_parser()
    environ = process_environment()
    # Every mistake is reported before the process changes anything about itself.
    changes = _server_overrides(args)
    config = _with(load_config(args.config), changes) if args.config else None
    if config is not None:
        logs.setup(config.server.log_format)
        for warning in _warnings(config):
            log.warning("config: %s", warning)
    scrub = args.scrub_memory or (config is not None and config.server.scrub_memory)
    if scrub and not hardening.is_scrubbed(environ):
        log.info("scrub mode: restarting with a wiping allocator")
        hardening.reexec_scrubbed(argv, environ)
    allocator = (config.server if config is not None else _with_server(changes)).allocator
    if allocator == "malloc" and environ.get("PYTHONMALLOC") != "malloc":
        log.info("server.allocator malloc: restarting on glibc's allocator")
        hardening.reexec_on_malloc(argv, environ)
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
    environ = process_environment()
    log.info(
        hardening.summary(hardening.is_scrubbed(environ), hardening.started_allocator(environ))
    )


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
    # The mock plays the embedded config's one upstream kind, openai: its paths only.
    mock_runner, mock_url = await mock_upstream.start_mock("127.0.0.1", 0, kind="openai")
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
            "What is kept and where it goes (the subprocessor register is the mock):\n"
            f"  curl {api}/v1/policy -H 'Authorization: Bearer {key}'\n\n"
        )
        sys.stdout.flush()

    try:
        return await _serve_config(config, harden, banner)
    finally:
        await mock_runner.cleanup()
