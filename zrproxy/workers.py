"""Several worker processes on one port: spawn, supervise, restart, drain, sum metrics.

# Goals
Use every core of a machine with one port (SO_REUSEPORT: the kernel spreads new
connections over the workers' listening sockets), one admin listener whose /metrics is
the sum over all workers, and one SIGTERM that drains them all.

# Strategy
The parent binds the API port first without listening, so a configured port 0 becomes
one concrete port every worker can join. Workers are `spawn`ed (fresh interpreters:
nothing of the parent's heap is inherited) and run the ordinary single-process Service
without an admin listener. Metrics use prometheus-client's multiprocess mode: each
worker writes its counters to mmap'ed files in a fresh directory on /dev/shm (a
memory-backed tmpfs, removed at exit); those files hold metric names, config-derived
label values and numbers, never content. The parent serves /metrics by merging them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.process import BaseProcess

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import multiprocess as prometheus_multiprocess

from zrproxy import hardening, logs
from zrproxy.app import Service, admin_app, run_loop, settle_heap, stop_requested
from zrproxy.config import Address, Config, export_metrics_dir
from zrproxy.errors import StartupError
from zrproxy.metrics import Metrics
from zrproxy.policy import report, to_json
from zrproxy.proxy import ServiceState
from zrproxy.routing import utc_today

log = logging.getLogger("zrproxy")
_SHM = "/dev/shm"
_SUPERVISE_EVERY_S = 0.2
_RESTART_BACKOFF_S = 1.0
_START_TIMEOUT_S = 60.0
# What the kernel sends a worker when its parent dies (PR_SET_PDEATHSIG).
_ORPHANED = signal.SIGUSR2


def _worker_main(
    config: Config,
    ready: multiprocessing.synchronize.Event,
    harden: Callable[[], None],
    worker: int,
    parent_pid: int,
    metrics_dir: str,
) -> None:
    """A worker process: the ordinary Service with the shared port and no admin listener."""
    # A worker never outlives the parent. If the parent dies (even by SIGKILL), the kernel
    # sends _ORPHANED: the worker removes the metrics directory the parent can no longer
    # remove, drains and exits. Its own signal, because the kernel sends it again as each
    # of the dying parent's threads ends, and because SIGTERM means an ordinary stop.
    orphaned = threading.Event()
    signal.signal(_ORPHANED, lambda _sig, _frame: orphaned.set())
    hardening.die_with_parent(_ORPHANED, parent_pid)
    # A reload is the parent's business (it replaces the workers): a SIGHUP sent to the
    # whole process group must not end a worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logs.setup(config.server.log_format, worker)
    harden()

    async def serve() -> int:
        # Before ready: a signal right after it (a drain, or the parent's death) must find
        # our handler, not the default action that ends the process on the spot.
        stop = stop_requested()
        loop = asyncio.get_running_loop()

        def on_orphaned() -> None:
            orphaned.set()
            stop.set()

        loop.add_signal_handler(_ORPHANED, on_orphaned)
        if orphaned.is_set():
            stop.set()
        service = Service(config, reuse_port=True, admin=False)
        try:
            await service.start()
            settle_heap()
            ready.set()
            await stop.wait()
            if orphaned.is_set():
                # The others' mapped files stay valid until they exit.
                shutil.rmtree(metrics_dir, ignore_errors=True)
            await service.drain()
        finally:
            await service.stop()
        return 0

    try:
        code = run_loop(serve, config.server.scrub_memory)
    finally:
        # The loop's handlers are gone: a late repeat of the signal must not cut the exit.
        signal.signal(_ORPHANED, signal.SIG_IGN)
        if orphaned.is_set():
            shutil.rmtree(metrics_dir, ignore_errors=True)
    raise SystemExit(code)


class Supervisor:
    """The parent: owns the admin listener, the metrics directory and the workers."""

    def __init__(self, config: Config, harden: Callable[[], None]) -> None:
        self.config = config
        self.configured = config  # as given (self.config has the resolved port)
        self._harden = harden
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[BaseProcess, multiprocessing.synchronize.Event]] = []
        self._state = ServiceState()
        self._placeholder: socket.socket | None = None
        self._metrics_dir = ""
        self._admin_runner: web.AppRunner | None = None
        self.api_address: Address | None = None
        self.admin_address: Address | None = None

    async def start(self) -> None:
        # The metric definitions /policy describes: made before the multiprocess setup,
        # they count nothing and write no file.
        definitions = Metrics()
        self._metrics_dir = tempfile.mkdtemp(prefix="zrproxy-metrics-", dir=_SHM)
        # Read by prometheus-client in each spawned worker, before its first metric.
        export_metrics_dir(self._metrics_dir)
        listen = self.config.server.listen
        self._placeholder = _reserve_port(listen)
        self.api_address = Address(listen.host, self._placeholder.getsockname()[1])
        server = replace(self.config.server, listen=self.api_address)
        self.config = replace(self.config, server=server)
        for index in range(server.workers):
            self._workers.append(self._spawn(index + 1))
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        # The workers' process_* series can't be summed: these are the supervisor's.
        ProcessCollector(registry=registry)
        self._admin_runner = web.AppRunner(
            admin_app(
                self._state,
                registry,
                lambda: to_json(report(self.config, definitions, utc_today())),
            ),
            access_log=None,
            handle_signals=False,
        )
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, server.admin_listen.host, server.admin_listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"server.admin_listen: cannot listen ({exc.strerror})") from None
        host, port = self._admin_runner.addresses[0][:2]
        self.admin_address = Address(host, port)
        await _until_ready(self._workers)
        self._state.ready = True
        log.info(
            "zrproxy ready: api=http://%s admin=http://%s workers=%d",
            self.api_address,
            self.admin_address,
            len(self._workers),
        )

    async def reload(self, config: Config) -> None:
        """New workers on `config` join the port; once they are ready the old ones drain
        (they stop accepting and finish their requests) and exit."""
        assert self.api_address is not None
        server = replace(config.server, listen=self.api_address)
        fresh_config = replace(config, server=server)
        previous = self.config
        self.config = fresh_config
        fresh = [self._spawn(index + 1) for index in range(server.workers)]
        try:
            await _until_ready(fresh)
        except StartupError as exc:
            log.error("config reload: new workers did not start (%s); the old ones serve on", exc)
            for process, _ in fresh:
                process.kill()
                process.join(timeout=5)
            self.config = previous
            return
        old, self._workers = self._workers, fresh
        self.configured = config
        for process, _ in old:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        patience = previous.server.drain_timeout_s + 5.0
        await asyncio.gather(*(asyncio.to_thread(p.join, patience) for p, _ in old))
        for process, _ in old:
            if process.is_alive():
                process.kill()
                process.join(timeout=1)
            if process.pid is not None:
                prometheus_multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _spawn(self, worker: int) -> tuple[BaseProcess, multiprocessing.synchronize.Event]:
        """Start worker number `worker` (1..N; a restarted worker keeps its number)."""
        ready = self._context.Event()
        process = self._context.Process(
            target=_worker_main,
            args=(self.config, ready, self._harden, worker, os.getpid(), self._metrics_dir),
            daemon=False,
        )
        process.start()
        return process, ready

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart crashed workers until `stop` is set."""
        while not stop.is_set():
            for index, (process, _) in enumerate(self._workers):
                if not process.is_alive() and not stop.is_set():
                    log.warning(
                        "worker %s exited with %s; restarting", process.pid, process.exitcode
                    )
                    if process.pid is not None:
                        prometheus_multiprocess.mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
                    await asyncio.sleep(_RESTART_BACKOFF_S)
                    self._workers[index] = self._spawn(index + 1)
            try:
                await asyncio.wait_for(stop.wait(), _SUPERVISE_EVERY_S)
            except TimeoutError:
                pass

    async def drain(self) -> None:
        """SIGTERM to every worker; each drains itself. Wait past their drain deadline."""
        self._state.draining = True
        for process, _ in self._workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        # Each worker ends its own streams at drain_timeout_s; allow a little past that.
        patience = self.config.server.drain_timeout_s + 5.0
        await asyncio.gather(*(asyncio.to_thread(p.join, patience) for p, _ in self._workers))
        for process, _ in self._workers:
            if process.is_alive():
                log.warning("worker %s did not stop; killing it", process.pid)
                process.kill()
                process.join(timeout=1)

    async def stop(self) -> None:
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._placeholder is not None:
            self._placeholder.close()
        if self._metrics_dir:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("stopped")


async def _until_ready(
    workers: list[tuple[BaseProcess, multiprocessing.synchronize.Event]],
) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _START_TIMEOUT_S
    while not all(ready.is_set() for _, ready in workers):
        await asyncio.sleep(0.05)
        if any(not p.is_alive() for p, _ in workers):
            raise StartupError("a worker process exited during start-up")
        if loop.time() > give_up:
            raise StartupError("workers did not become ready in time")


def _reserve_port(listen: Address) -> socket.socket:
    """Bind (not listen) the API address with SO_REUSEPORT so workers can join it."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"server.listen: cannot bind ({exc.strerror})") from None
    return sock
