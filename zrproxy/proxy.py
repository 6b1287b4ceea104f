"""The request handlers: auth, body, routing, upstream, relay; and the one place that
turns errors into responses.

Never logs. Never copies request content into anything but the upstream request, and
drops every reference to it by the time the response ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import ClientResponse, web
from aiohttp.http_exceptions import HttpProcessingError

from zrproxy.auth import Authenticator
from zrproxy.caches import forget_request_urls
from zrproxy.config import Config
from zrproxy.dialects import (
    ENDPOINTS,
    MODELS_PATH,
    Dialect,
    Endpoint,
    UpstreamBodies,
    error_body,
    models_list,
    parse_request,
    sse_error_event,
)
from zrproxy.errors import (
    BodyTimeout,
    BodyTooLarge,
    BodyTooSlow,
    InvalidAuth,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ProxyError,
    ServiceDraining,
    UpstreamFailedMidStream,
    UpstreamTimeout,
)
from zrproxy.headers import REQUEST_ID, SSE_HEADERS, client_response_headers, request_id
from zrproxy.limits import Lease, Limits
from zrproxy.metrics import NONE, Metrics, status_class
from zrproxy.routing import Router
from zrproxy.streaming import relay
from zrproxy.upstream import Upstreams
from zrproxy.usage import UsageTap

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Retry-After of a 503 at a global cap: load of this kind clears within seconds.
_OVERLOAD_RETRY_S = 1
# Request targets that are our own fixed strings; any other target may carry content.
_PLAIN_TARGETS = frozenset([*ENDPOINTS, MODELS_PATH])


@dataclass(slots=True)
class ServiceState:
    """What the drain logic and the handlers share."""

    ready: bool = False
    draining: bool = False
    drain_expired: bool = False
    handlers: set[asyncio.Task[object]] = field(default_factory=set)
    served: int = 0  # requests handled so far (tells the idle heap trimmer there was work)


@dataclass(slots=True)
class _Exchange:
    """Metadata of one request/response: names, counts and times, never content."""

    started: float
    rid: str
    dialect: Dialect
    project: str = NONE
    route: str = NONE
    upstream: str = NONE
    stream: bool = False
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    chunks: int = 0
    first_byte_at: float = 0.0
    tap: UsageTap | None = None
    response: web.StreamResponse | None = None
    is_sse: bool = False
    expired: bool = False  # the total deadline cancelled the handler
    reading_body: bool = False  # a deadline now is the client's fault, not the upstream's
    lease: Lease | None = None  # the project's concurrency slot
    stream_slot: bool = False  # counted in limits.streams
    body_reserved: int = 0  # bytes held in limits.bodies


def _expire(ex: _Exchange, task: asyncio.Task[object]) -> None:
    ex.expired = True
    task.cancel()


class Proxy:
    """The API listener's request handler."""

    def __init__(
        self, config: Config, upstreams: Upstreams, metrics: Metrics, state: ServiceState
    ) -> None:
        # Held once: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._max_body = config.server.max_body_bytes
        self._total_timeout = config.server.total_timeout_s
        self._idle_timeout = config.server.idle_timeout_s
        self._body_timeout = config.server.body_timeout_s
        self.limits = Limits(config, metrics.set_limits_backend)
        self._auth = Authenticator(config.projects)
        self._router = Router(config)
        self._upstreams = upstreams
        self._metrics = metrics
        self._state = state

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = self._loop
        endpoint = ENDPOINTS.get(request.path)
        dialect: Dialect = (
            endpoint.dialect
            if endpoint is not None
            else "anthropic"
            if request.path.startswith("/v1/messages/")
            else "openai"
        )
        ex = _Exchange(loop.time(), request_id(request.headers.get(REQUEST_ID)), dialect)
        task: asyncio.Task[object] = asyncio.current_task(loop)  # type: ignore[assignment]
        limits = self.limits
        admitted = limits.in_flight.enter()
        self._state.handlers.add(task)
        self._state.served += 1
        self._metrics.in_flight.inc()
        # One timer per request for total_timeout_s, whatever phase it is in.
        deadline = loop.call_at(ex.started + self._total_timeout, _expire, ex, task)
        try:
            if not admitted:
                raise Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
            if endpoint is not None:
                return await self._proxy(request, endpoint, ex)
            if request.path == MODELS_PATH:
                return self._models(request, ex)
            raise NotFound()
        except ProxyError as exc:
            return await self._fail(request, ex, exc)
        except asyncio.CancelledError:
            # Our own deadlines cancel the handler too; only a client leaving propagates.
            if ex.expired:
                task.uncancel()
                late = BodyTimeout() if ex.reading_body else UpstreamTimeout()
                return await self._fail(request, ex, late)
            if not self._state.drain_expired:
                self._metrics.child(self._metrics.client_aborts, ex.route).inc()
                raise
            task.uncancel()
            return await self._fail(request, ex, ServiceDraining())
        finally:
            deadline.cancel()
            if admitted:
                limits.in_flight.leave()
            self._release(ex)
            self._state.handlers.discard(task)
            self._metrics.in_flight.dec()
            self._record(ex, loop.time())
            if request.raw_path not in _PLAIN_TARGETS:
                forget_request_urls()  # a query string or unknown path is content

    # --- the proxied endpoints ------------------------------------------------------------

    async def _proxy(
        self, request: web.BaseRequest, endpoint: Endpoint, ex: _Exchange
    ) -> web.StreamResponse:
        if request.method != "POST":
            raise MethodNotAllowed()
        if self._state.draining:
            raise ServiceDraining()
        project = self._auth.authenticate(request.headers)
        ex.project = project.name
        if self.limits.projects.limited(project.name):
            ex.lease = await self.limits.projects.admit(project.name)
        body = await self._read_body(request, ex)
        ex.bytes_in = len(body)
        parsed = parse_request(body)
        plan = self._router.plan(project, parsed.model)
        ex.route = plan.route.name
        ex.stream = parsed.stream
        if parsed.stream:
            if not self.limits.streams.enter():
                raise Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
            ex.stream_slot = True
        # We ask OpenAI-style streams for usage when the client did not, then drop that
        # event on the way back (the tap), so token counts work for every stream.
        ask_usage = endpoint.usage_on_request and parsed.stream and not parsed.client_wants_usage
        bodies = UpstreamBodies(body, parsed, plan.route.upstream_model, ask_usage)
        del body, parsed
        try:
            upstream, response = await self._upstreams.open(
                plan.upstreams, endpoint.path, request.headers, ex.rid, bodies, self._failed
            )
        finally:
            bodies.clear()  # the prompt is upstream now; don't hold it while streaming
            self.limits.bodies.release(ex.body_reserved)
            ex.body_reserved = 0
        ex.upstream = upstream.name
        if len(plan.upstreams) > 1 and upstream is not plan.upstreams[0]:
            self._metrics.child(self._metrics.failovers, ex.route).inc()
        ex.tap = UsageTap(strip_usage_event=ask_usage and upstream.kind == "openai")
        try:
            return await self._respond(request, response, ex)
        finally:
            response.close()

    async def _respond(
        self, request: web.BaseRequest, upstream: ClientResponse, ex: _Exchange
    ) -> web.StreamResponse:
        ex.is_sse = upstream.content_type == "text/event-stream"
        headers = client_response_headers(upstream.headers, ex.rid)
        if ex.is_sse:
            headers.update(SSE_HEADERS)
        out = web.StreamResponse(status=upstream.status, headers=headers)
        if not ex.is_sse and upstream.content_length is not None:
            out.content_length = upstream.content_length
        ex.status = upstream.status
        ex.response = out
        await out.prepare(request)
        if ex.is_sse:
            self._metrics.open_streams.inc()
        try:
            result = await relay(upstream.content, out, ex.tap, self._loop.time)
        finally:
            if ex.is_sse:
                self._metrics.open_streams.dec()
        ex.bytes_out, ex.chunks, ex.first_byte_at = (
            result.bytes_out,
            result.chunks,
            result.first_byte_at,
        )
        if result.outcome == "completed":
            return out
        if result.outcome == "client_gone":
            self._metrics.child(self._metrics.client_aborts, ex.route).inc()
            return out
        self._failed(ex.upstream, "timeout" if result.outcome == "upstream_timeout" else "reset")
        if result.outcome == "upstream_timeout":
            raise UpstreamTimeout()
        raise UpstreamFailedMidStream()

    async def _read_body(self, request: web.BaseRequest, ex: _Exchange) -> bytes:
        length = request.content_length
        if length is not None and length > self._max_body:
            raise BodyTooLarge()
        budget = self.limits.bodies
        # A declared length is reserved whole before a byte is read; a chunked body
        # chunk by chunk. Either way, over budget means 503 before reading more.
        if length is not None:
            if not budget.reserve(length):
                raise Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
            ex.body_reserved = length
        if request.headers.get("Expect", "").lower() == "100-continue":
            # The low-level server does not answer Expect itself. We do it only now, after
            # auth and the size check, which is the point of 100-continue.
            await request.writer.write(_CONTINUE)
        parts: list[bytes] = []
        size = 0
        content = request.content
        failure: ProxyError | None = None
        loop = self._loop
        # The whole body within body_timeout_s, and no gap between reads longer than
        # idle_timeout_s (a dribbling client, or chunked framing that broke: aiohttp then
        # never ends the body stream). Both are the client's fault: 408, never 504.
        whole_by = loop.time() + self._body_timeout
        ex.reading_body = True
        try:
            async with asyncio.timeout(min(whole_by, loop.time() + self._idle_timeout)) as dl:
                while True:
                    try:
                        chunk = await content.readany()
                    except HttpProcessingError:
                        failure = InvalidRequest()  # its text may quote the input: dropped here
                        break
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self._max_body:
                        failure = BodyTooLarge()
                        break
                    if size > ex.body_reserved:
                        if not budget.reserve(size - ex.body_reserved):
                            failure = Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
                            break
                        ex.body_reserved = size
                    parts.append(chunk)
                    dl.reschedule(min(whole_by, loop.time() + self._idle_timeout))
        except TimeoutError:
            failure = BodyTimeout() if loop.time() >= whole_by else BodyTooSlow()
        ex.reading_body = False
        chunk = b""
        if failure is not None:
            parts.clear()
            raise failure
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _models(self, request: web.BaseRequest, ex: _Exchange) -> web.StreamResponse:
        if request.method != "GET":
            raise MethodNotAllowed()
        project = self._auth.authenticate(request.headers)
        ex.project = project.name
        ex.status = 200
        body = models_list(self._router.visible_models(project))
        return web.Response(
            body=body, content_type="application/json", headers={REQUEST_ID: ex.rid}
        )

    # --- failures and metrics ---------------------------------------------------------------

    def _release(self, ex: _Exchange) -> None:
        """Give back every limit slot the request holds (idempotent)."""
        limits = self.limits
        if ex.body_reserved:
            limits.bodies.release(ex.body_reserved)
            ex.body_reserved = 0
        if ex.stream_slot:
            limits.streams.leave()
            ex.stream_slot = False
        if ex.lease is not None:
            limits.projects.release(ex.lease)
            ex.lease = None

    def _failed(self, upstream: str, kind: str) -> None:
        self._metrics.child(self._metrics.upstream_errors, upstream, kind).inc()

    async def _fail(
        self, request: web.BaseRequest, ex: _Exchange, error: ProxyError
    ) -> web.StreamResponse:
        """The one place that turns an error into what the client sees."""
        if error.reject_reason != "none":
            self._metrics.child(self._metrics.rejections, error.reject_reason).inc()
        if error.client_error != "none":
            self._metrics.child(self._metrics.client_errors, error.client_error).inc()
        started = ex.response
        if started is None or not started.prepared:
            ex.status = error.status
            headers = {REQUEST_ID: ex.rid}
            if error.retry_after_s is not None:
                headers["Retry-After"] = str(error.retry_after_s)
            response = web.Response(
                status=error.status,
                body=error_body(ex.dialect, error),
                content_type="application/json",
                headers=headers,
            )
            if (
                error.status in (408, 413)
                or error.reject_reason == "draining"
                or isinstance(error, InvalidAuth | Overloaded)
            ):
                # Don't read the rest of a body we refused; after refused credentials or
                # at a cap, don't keep the connection (or the headers it last carried).
                response.force_close()
            return response
        # The status line is gone: say it in-band if we can, then cut the connection
        # without the terminating chunk, so HTTP clients, load balancers and access logs
        # see a truncated transfer, never a whole one. Counted as failed.
        ex.status = error.status
        if ex.is_sse:
            try:
                await started.write(sse_error_event(ex.dialect, error))
            except ConnectionError:
                pass
        if request.transport is not None:
            request.transport.close()
        return started

    def _record(self, ex: _Exchange, finished: float) -> None:
        m = self._metrics
        status = ex.status or 499
        stream = "true" if ex.stream else "false"
        m.child(m.requests, ex.project, ex.route, ex.upstream, status_class(status), stream).inc()
        m.child(m.duration, ex.route).observe(finished - ex.started)
        if ex.first_byte_at:
            m.child(m.ttfb, ex.route).observe(ex.first_byte_at - ex.started)
        if ex.bytes_in:
            m.child(m.bytes_in, ex.project, ex.route).inc(ex.bytes_in)
        if ex.bytes_out:
            m.child(m.bytes_out, ex.project, ex.route).inc(ex.bytes_out)
        if ex.chunks and ex.is_sse:
            m.child(m.chunks, ex.route).inc(ex.chunks)
        tap = ex.tap
        if tap is not None:
            if ex.project != NONE:
                self.limits.projects.add_tokens(
                    ex.project, tap.prompt_tokens + tap.completion_tokens
                )
            if tap.prompt_tokens:
                m.child(m.tokens, ex.project, ex.route, "prompt").inc(tap.prompt_tokens)
            if tap.completion_tokens:
                m.child(m.tokens, ex.project, ex.route, "completion").inc(tap.completion_tokens)
            ex.tap = None
        ex.response = None
