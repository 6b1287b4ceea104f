"""The service: the API and admin listeners and their lifecycle (start, ready, drain, stop).

Logs lifecycle events only. aiohttp's access log is off, and its request handler is
replaced where it would log or echo raw request bytes (parser errors, tracebacks).
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
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry

from zrproxy.admin import AdminListener
from zrproxy.audit import AuditLog, Clock, utc_now
from zrproxy.config import Address, Config, ServerConfig
from zrproxy.connection import (
    HeadTooLarge,
    LimitedRequestHandler,
    check_http_parser,
    handler_limits,
)
from zrproxy.errors import StartupError
from zrproxy.listener import AcceptErrors, PausableSite, fd_connection_cap, listening_socket
from zrproxy.metrics import NOT_KNOWN, Metrics
from zrproxy.policy import report, to_json
from zrproxy.proxy import Proxy, ServiceState
from zrproxy.routing import DayClock
from zrproxy.upstream import Upstreams

log = logging.getLogger("zrproxy")

_BAD_HTTP = (
    b'{"error":{"message":"Malformed HTTP request.","type":"invalid_request_error",'
    b'"param":null,"code":"bad_http_request"}}'
)
_INTERNAL = (
    b'{"error":{"message":"Internal proxy error.","type":"api_error",'
    b'"param":null,"code":"internal_error"}}'
)
_HEADERS_TOO_LARGE = (
    b'{"error":{"message":"The request headers exceed the configured limits.",'
    b'"type":"invalid_request_error","param":null,"code":"request_header_fields_too_large"}}'
)
_URI_TOO_LONG = (
    b'{"error":{"message":"The request line exceeds the configured limit.",'
    b'"type":"invalid_request_error","param":null,"code":"uri_too_long"}}'
)
# aiohttp's parser error for more than max_headers fields (a fixed text, no input in it).
_TOO_MANY_HEADERS = "Too many headers received"
_LINGER_S = 1.0
_GC_GEN0_THRESHOLD = 50_000
_TRIM_PERIOD_S = 1.0
_TRIM_AFTER_REQUESTS = 1000
# After the drain deadline, how long cancelled streams get to write their error event.
_CANCEL_GRACE_S = 2.0


class _ContentFreeRequestHandler(LimitedRequestHandler):
    """aiohttp's connection handler, minus everything that could log or echo content.

    Its parser errors carry the raw bytes that failed to parse, and it would log them
    with a traceback and put them in the 400 body. We answer with a fixed body and log
    only the error's type.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if exc is not None:
            # A parser error's traceback holds the frame that parsed the raw bytes, and
            # that frame holds the error (a cycle): break it so the bytes die now, not at
            # the next garbage collection.
            exc.__traceback__ = exc.__context__ = None
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if isinstance(exc, HeadTooLarge):
            status = exc.status
        elif isinstance(exc, LineTooLong) or (
            exc is not None and getattr(exc, "message", None) == _TOO_MANY_HEADERS
        ):
            status = 431  # a request line too long was refused as 414 before parsing
        if status >= 500:
            log.error("request handling failed (%s)", type(exc).__name__)
        else:
            manager = self._manager
            if isinstance(manager, _ApiServer):
                manager.on_bad_request()
        body = (
            _INTERNAL
            if status >= 500
            else _HEADERS_TOO_LARGE
            if status == 431
            else _URI_TOO_LONG
            if status == 414
            else _BAD_HTTP
        )
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        log.error("connection handling failed (%s)", type(exc).__name__ if exc else "unknown")

    def log_debug(self, *args: Any, **kw: Any) -> None:
        pass  # aiohttp's debug lines carry exceptions whose text may quote request bytes


def _drop_server_header(response: web.StreamResponse) -> None:
    # aiohttp adds `Server: Python/3.x aiohttp/3.x` to every response; it tells a scanner
    # which CVEs to try and nothing a client needs.
    response.headers.popall(hdrs.SERVER, None)


class _ApiRequest(web.BaseRequest):
    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # Runs after aiohttp has filled in its default headers, before they are written.
        _drop_server_header(response)


class _ApiServer(web.Server):
    def __init__(
        self,
        *args: Any,
        on_bad_request: Callable[[], None],
        max_connections: int,
        server_config: ServerConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.server_config = server_config
        self.on_bad_request = on_bad_request
        self.max_connections = max_connections
        self.open_connections = 0
        self.site: PausableSite | None = None
        self._resuming: asyncio.Task[None] | None = None

    # At max_connections the listener stops accepting (new connections wait in the
    # kernel's backlog) and starts again as soon as one closes.
    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1
        if self.open_connections >= self.max_connections and self.site is not None:
            self.site.pause()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open_connections -= 1
        site = self.site
        if (
            site is not None
            and site.paused
            and self.open_connections < self.max_connections
            and self._resuming is None
        ):
            self._resuming = asyncio.get_running_loop().create_task(self._resume(site))

    async def _resume(self, site: PausableSite) -> None:
        try:
            await site.resume()
        finally:
            self._resuming = None

    def __call__(self) -> RequestHandler:
        return _ContentFreeRequestHandler(
            self, loop=self._loop, server_config=self.server_config, **self._kwargs
        )

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return _ApiRequest(message, payload, protocol, writer, task, self._loop)


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
        self._api_server: _ApiServer | None = None
        self._api_runner: web.ServerRunner | None = None
        self._api_site: PausableSite | None = None
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
        self._api_server = _ApiServer(
            self._handle,
            on_bad_request=self.metrics.child(
                self.metrics.rejections, "malformed", NOT_KNOWN, NOT_KNOWN
            ).inc,
            max_connections=max_connections,
            server_config=server,
            **handler_limits(server),
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            access_log=None,
            keepalive_timeout=server.keepalive_timeout_s,
            # After an error answered before the body was read, aiohttp reads and drops
            # the rest for this long (so closing doesn't reset the connection under our
            # answer). Its default of 10 s holds a refused client far too long.
            lingering_time=_LINGER_S,
        )
        self._api_runner = web.ServerRunner(self._api_server, handle_signals=False)
        await self._api_runner.setup()
        try:
            sock = listening_socket(
                server.listen.host, server.listen.port, reuse_port=self._reuse_port, backlog=1024
            )
        except OSError as exc:
            raise StartupError(f"server.listen: cannot listen ({exc.strerror})") from None
        api_server = self._api_server
        self._api_site = PausableSite(
            self._api_runner,
            sock,
            backlog=1024,
            on_pause=self.metrics.accept_pauses.inc,
            headroom=lambda: api_server.max_connections - api_server.open_connections,
        )
        self._api_server.site = self._api_site
        await _bind(self._api_site, "server.listen")
        self.api_address = _bound(self._api_runner)
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

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
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
            api._kwargs.update(
                keepalive_timeout=server.keepalive_timeout_s, **handler_limits(server)
            )
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

    async def _restart(self, site: PausableSite) -> None:
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
            self._api_server.pre_shutdown()  # idle keep-alive connections close now
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
        if self._api_runner is not None:
            await self._api_runner.cleanup()
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


async def _bind(site: web.BaseSite, key: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"{key}: cannot listen ({exc.strerror})") from None


def _bound(runner: web.BaseRunner) -> Address:
    host, port = runner.addresses[0][:2]
    return Address(host, port)


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


async def trim_heap_when_idle(state: ServiceState, period_s: float = _TRIM_PERIOD_S) -> None:
    """After a burst, once nothing is in flight, hand freed memory back to the system.

    After 10,000 streams closed, RSS stayed far above where it started (bench/README.md):
    closed connections leave cyclic garbage that the raised GC thresholds collect late,
    and glibc keeps freed memory in its arenas. Once idle after at least
    `_TRIM_AFTER_REQUESTS` requests, collect and `malloc_trim`; never under steady load.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    trimmed_at = state.served
    while True:
        await asyncio.sleep(period_s)
        if not state.handlers and state.served - trimmed_at >= _TRIM_AFTER_REQUESTS:
            trimmed_at = state.served
            gc.collect()
            if trim is not None:  # glibc only
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
