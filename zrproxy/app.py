"""The service: the API and admin listeners and their lifecycle (start, ready, drain, stop).

Logs lifecycle events only. The API listener is our own HTTP/1.1 server
(`zrproxy.server`); the admin listener is an aiohttp app on its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import prometheus_client
import uvloop
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from zrproxy.admin import AdminListener
from zrproxy.audit import AuditLog, Clock, utc_now
from zrproxy.config import Address, Config
from zrproxy.connection import check_http_parser
from zrproxy.errors import StartupError
from zrproxy.listener import AcceptErrors, PausableListener, fd_connection_cap, listening_socket
from zrproxy.metrics import NOT_KNOWN, Metrics
from zrproxy.policy import report, to_json
from zrproxy.proxy import Proxy, ServiceState
from zrproxy.request import Request
from zrproxy.response import Response, StreamingResponse
from zrproxy.routing import DayClock
from zrproxy.server import ApiServer
from zrproxy.upstream import Upstreams

log = logging.getLogger("zrproxy")

_GC_GEN0_THRESHOLD = 50_000
_TRIM_PERIOD_S = 1.0
_TRIM_AFTER_REQUESTS = 1000
# After the drain deadline, how long cancelled streams get to write their error event.
_CANCEL_GRACE_S = 2.0


def _drop_server_header(response: web.StreamResponse) -> None:
    # aiohttp adds `Server: Python/3.x aiohttp/3.x` to every response; it tells a scanner
    # which CVEs to try and nothing a client needs.
    response.headers.popall(hdrs.SERVER, None)


class Service:
    """One process's listeners. `start()`, then `drain()` and `stop()` on the way out."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        exposition_registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
        admin: bool = True,
        day_clock: DayClock | None = None,
        audit_clock: Clock = utc_now,
    ) -> None:
        self.config = config
        self.day_clock = day_clock if day_clock is not None else DayClock()
        self.metrics = metrics if metrics is not None else Metrics()
        self.state = ServiceState()
        self._exposition = exposition_registry or self.metrics.registry
        self._reuse_port = reuse_port
        self._with_admin = admin
        self._upstreams: Upstreams | None = None
        self._api_server: ApiServer | None = None
        self._api_site: PausableListener | None = None
        self._resuming: asyncio.Task[None] | None = None
        self._proxy: Proxy | None = None
        self._previous_handler: Any = None
        self._restarting: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._admin: AdminListener | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self.audit = AuditLog.from_config(config, self.metrics, audit_clock)
        self.api_address: Address | None = None
        self.admin_address: Address | None = None

    async def start(self) -> None:
        check_http_parser()
        server = self.config.server
        self._upstreams = Upstreams(self.config)
        if self.audit is not None:
            # Expired records go before we serve; the writer thread repeats this hourly.
            await asyncio.to_thread(self.audit.sweep)
            self.audit.start()
        proxy = self._proxy = Proxy(
            self.config, self._upstreams, self.metrics, self.state, self.day_clock, self.audit
        )
        max_connections = proxy.limits.max_connections
        fd_cap = fd_connection_cap()
        if fd_cap < max_connections:
            log.warning(
                "server.max_connections: %d per process do not fit the file-descriptor "
                "limit (two per proxied request); accepting at most %d",
                max_connections,
                fd_cap,
            )
            max_connections = fd_cap
        loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(AcceptErrors(self._accept_refused, self._previous_handler))
        api = self._api_server = ApiServer(
            self._handle,
            server,
            max_connections,
            self.metrics.child(self.metrics.rejections, "malformed", NOT_KNOWN, NOT_KNOWN).inc,
        )
        try:
            sock = listening_socket(
                server.listen.host, server.listen.port, reuse_port=self._reuse_port, backlog=1024
            )
        except OSError as exc:
            raise StartupError(f"server.listen: cannot listen ({exc.strerror})") from None
        site = self._api_site = PausableListener(
            api,
            sock,
            backlog=1024,
            on_pause=self.metrics.accept_pauses.inc,
            headroom=lambda: api.max_connections - api.open_connections,
        )
        # At max_connections the listener stops accepting (new connections wait in the
        # kernel's backlog) and starts again as soon as one closes.
        api.on_full = site.pause
        api.on_room = self._resume_accepting
        try:
            await site.start()
        except OSError as exc:
            sock.close()
            raise StartupError(f"server.listen: cannot listen ({exc.strerror})") from None
        self.api_address = Address(*site.address)
        if self._with_admin:
            # On its own thread and loop: API load must not make a busy pod look dead.
            self._admin = AdminListener(
                admin_app(self.state, self._exposition, self._policy),
                server.admin_listen,
                "server.admin_listen",
            )
            await self._admin.start()
            self.admin_address = self._admin.address
        self._trimmer = asyncio.create_task(trim_heap_when_idle(self.state))
        self.state.ready = True
        if self.admin_address is None:
            log.info("worker %d ready: api=http://%s", os.getpid(), self.api_address)
        else:
            log.info(
                "zrproxy ready: api=http://%s admin=http://%s", self.api_address, self.admin_address
            )

    def _resume_accepting(self) -> None:
        site = self._api_site
        if site is not None and site.paused and self._resuming is None:
            self._resuming = asyncio.get_running_loop().create_task(self._resume(site))

    async def _resume(self, site: PausableListener) -> None:
        try:
            await site.resume()
        finally:
            self._resuming = None

    async def _handle(self, request: Request) -> Response | StreamingResponse:
        # Read per request, so a reload applies to new requests on open connections too.
        assert self._proxy is not None
        return await self._proxy.handle(request)

    async def reload(self, config: Config) -> None:
        """Serve new requests with `config`; requests in flight finish on the old one."""
        old_proxy, old_upstreams = self._proxy, self._upstreams
        self._upstreams = Upstreams(config)
        self._proxy = Proxy(config, self._upstreams, self.metrics, self.state)
        self.config = config
        server = config.server
        api = self._api_server
        if api is not None:  # for connections accepted from now on
            api.server_config = server
            api.max_connections = min(self._proxy.limits.max_connections, fd_connection_cap())
        if old_proxy is not None and old_upstreams is not None:
            # Every request in flight now was taken by the old config.
            in_flight = set(self.state.handlers)
            retire = _retire(old_proxy, old_upstreams, in_flight)
            task = asyncio.get_running_loop().create_task(retire)
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _accept_refused(self, listener_closed: bool) -> None:
        self.metrics.refused_accepts.inc()
        site = self._api_site
        if listener_closed and site is not None and self._restarting is None:
            self._restarting = asyncio.get_running_loop().create_task(self._restart(site))

    async def _restart(self, site: PausableListener) -> None:
        try:
            await site.restart(after_s=1.0)
        finally:
            self._restarting = None

    async def drain(self) -> None:
        """Stop taking connections, let streams finish until the deadline, then end them."""
        state = self.state
        state.draining = True
        log.info("draining: %d requests in flight", len(state.handlers))
        if self._api_site is not None:
            await self._api_site.stop()
        if self._api_server is not None:
            self._api_server.drain()  # idle keep-alive connections close now
        await _wait_for(state.handlers, self.config.server.drain_timeout_s)
        if state.handlers:
            log.info("drain deadline: ending %d requests", len(state.handlers))
            state.drain_expired = True
            for task in list(state.handlers):
                task.cancel()
            await _wait_for(state.handlers, _CANCEL_GRACE_S)
        log.info("drained")

    async def stop(self) -> None:
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=_CANCEL_GRACE_S)
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
        if self._api_site is not None:
            await self._api_site.stop()
        if self._api_server is not None:
            await self._api_server.close(_CANCEL_GRACE_S)
        if self._admin is not None:
            await self._admin.stop()
        if self._upstreams is not None:
            await self._upstreams.close()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)  # writes what is still queued
        if self._proxy is not None:
            await self._proxy.limits.projects.close()
            asyncio.get_running_loop().set_exception_handler(self._previous_handler)
        log.info("stopped")

    def _policy(self) -> bytes:
        return to_json(report(self.config, self.metrics, self.day_clock.day()))


async def _retire(proxy: Proxy, upstreams: Upstreams, in_flight: set[asyncio.Task[object]]) -> None:
    """Once the requests a replaced config took have finished, close what it held."""
    if in_flight:
        await asyncio.wait(in_flight)
    await upstreams.close()
    await proxy.limits.projects.close()


async def _wait_for(tasks: set[asyncio.Task[object]], timeout_s: float) -> None:
    """Until the handler tasks in `tasks` (a live set) have all finished, or the timeout."""
    if tasks:
        await asyncio.wait(list(tasks), timeout=timeout_s)


def admin_app(
    state: ServiceState,
    registry: CollectorRegistry,
    policy: Callable[[], bytes] | None = None,
) -> web.Application:
    """/metrics, /healthz, /readyz and (given `policy`) /policy for operators."""

    async def metrics(_request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        if state.ready and not state.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n" if state.draining else "starting\n")

    async def no_server_header(_request: web.Request, response: web.StreamResponse) -> None:
        _drop_server_header(response)

    app = web.Application()
    app.on_response_prepare.append(no_server_header)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if policy is not None:

        async def policy_json(_request: web.Request) -> web.Response:
            return web.Response(body=policy(), content_type="application/json")

        app.router.add_get("/policy", policy_json)
    return app


def settle_heap() -> None:
    """Once a serving process has started: take everything allocated so far out of the
    collector's way and collect young objects less often.

    With ~10,000 open streams the default thresholds spent half of the CPU in the garbage
    collector (bench/README.md). Content never waits for the collector either way: the
    paths that build cycles through content break them where they arise, and the
    retention tests check without a collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, 20, 100)


async def trim_heap_when_idle(
    state: ServiceState,
    period_s: float = _TRIM_PERIOD_S,
    trim: Callable[[int], object] | None = None,
) -> None:
    """After a burst, once nothing is in flight, hand freed memory back to the system.

    After 10,000 streams closed, RSS stayed far above where it started (bench/README.md):
    closed connections leave cyclic garbage that the raised GC thresholds collect late,
    and glibc keeps freed memory in its arenas. Once idle after at least
    `_TRIM_AFTER_REQUESTS` requests, collect and `malloc_trim`; never under steady load.
    Once more a period later if still idle: the last handler ending is not the last of
    the burst's memory (its connections close over the next loop iterations), and one
    trim taken at that moment left 18 to 120 MiB behind in some bench runs.
    """
    if trim is None:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    trimmed_at = state.served
    again = False
    while True:
        await asyncio.sleep(period_s)
        if state.handlers:
            continue
        if state.served - trimmed_at >= _TRIM_AFTER_REQUESTS:
            trimmed_at = state.served
            again = True
        elif again:
            again = False
        else:
            continue
        gc.collect()
        if trim is not None:
            trim(0)


def run_loop(main: Callable[[], Coroutine[Any, Any, int]], scrub: bool) -> int:
    """Run `main` on uvloop, or on the stdlib loop in scrub mode."""
    # uvloop reads every connection into one shared buffer that keeps the last bytes
    # read; the stdlib loop allocates (and, in scrub mode, wipes) a buffer per read.
    factory = asyncio.new_event_loop if scrub else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def stop_requested() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
