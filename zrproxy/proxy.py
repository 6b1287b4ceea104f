"""The request handlers: auth, body, routing, upstream, relay; and the one place that
turns errors into responses.

Never logs. Never copies request content into anything but the upstream request, and
drops every reference to it by the time the response ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

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
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    ServiceDraining,
    UpstreamFailedMidStream,
    UpstreamTimeout,
)
from zrproxy.headers import REQUEST_ID, SSE_HEADERS, client_response_headers, request_id
from zrproxy.http1 import Exchange
from zrproxy.metrics import NONE, Metrics, status_class
from zrproxy.outcomes import FailureKind, Outcome
from zrproxy.routing import Router
from zrproxy.streaming import StreamingResponse, relay, whole_body
from zrproxy.upstream import Upstreams
from zrproxy.usage import UsageTap

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
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
    outcome: Outcome | None = None  # decided once, by Proxy.handle or the relay's result


def _media_type(content_type: bytes) -> bytes:
    return content_type.partition(b";")[0].strip().lower()


def _header_view(raw: list[tuple[bytes, bytes]]) -> CIMultiDictProxy[str]:
    # latin-1 maps every byte; what the upstream sent is what the client gets.
    return CIMultiDictProxy(
        CIMultiDict([(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw])
    )


def _failure_outcome(ex: _Exchange, error: ProxyError) -> Outcome:
    if error.reject_reason != "none":
        return Outcome.REJECTED
    started = ex.response is not None and ex.response.prepared
    return (
        Outcome.UPSTREAM_FAILED_AFTER_FIRST_BYTE
        if started
        else Outcome.UPSTREAM_FAILED_BEFORE_FIRST_BYTE
    )


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
        self._send_timeout = config.server.send_timeout_s
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
        self._state.handlers.add(task)
        self._state.served += 1
        self._metrics.in_flight.inc()
        # One timer per request for total_timeout_s, whatever phase it is in.
        deadline = loop.call_at(ex.started + self._total_timeout, _expire, ex, task)
        try:
            if endpoint is not None:
                response = await self._proxy(request, endpoint, ex)
            elif request.path == MODELS_PATH:
                response = self._models(request, ex)
            else:
                raise NotFound()
            ex.outcome = ex.outcome or Outcome.COMPLETED
            return response
        except ProxyError as exc:
            ex.outcome = _failure_outcome(ex, exc)
            return await self._fail(request, ex, exc)
        except asyncio.CancelledError:
            # Our own deadlines cancel the handler too; only a client leaving propagates.
            if ex.expired:
                task.uncancel()
                ex.outcome = Outcome.DEADLINE
                return await self._fail(request, ex, UpstreamTimeout())
            if not self._state.drain_expired:
                ex.outcome = Outcome.CLIENT_GONE
                raise
            task.uncancel()
            ex.outcome = Outcome.DRAIN
            return await self._fail(request, ex, ServiceDraining())
        finally:
            deadline.cancel()
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
        body = await self._read_body(request)
        ex.bytes_in = len(body)
        parsed = parse_request(body)
        plan = self._router.plan(project, parsed.model)
        ex.route = plan.route.name
        ex.stream = parsed.stream
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
        ex.upstream = upstream.name
        if len(plan.upstreams) > 1 and upstream is not plan.upstreams[0]:
            self._metrics.child(self._metrics.failovers, ex.route).inc()
        ex.tap = UsageTap(strip_usage_event=ask_usage and upstream.kind == "openai")
        try:
            return await self._respond(request, response, ex)
        finally:
            if not response.finished:
                response.abandon()

    async def _respond(
        self, request: web.BaseRequest, upstream: Exchange, ex: _Exchange
    ) -> web.StreamResponse:
        ex.is_sse = _media_type(upstream.content_type) == b"text/event-stream"
        headers = client_response_headers(_header_view(upstream.headers), ex.rid)
        if ex.is_sse:
            headers.update(SSE_HEADERS)
        ex.status = upstream.status
        if upstream.ended and not ex.is_sse:
            # All of it is here (most non-streaming answers): one write for head and
            # body, where a StreamResponse writes its head on its own first. (Streams
            # stay chunked: their clients and any buffering in between expect it.)
            body, whole = whole_body(upstream, ex.tap, self._loop.time)
            ex.bytes_out, ex.chunks = whole.bytes_out, whole.chunks
            ex.first_byte_at = whole.first_byte_at
            ex.outcome = whole.outcome
            ex.response = web.Response(status=upstream.status, headers=headers, body=body)
            return ex.response
        out = StreamingResponse(status=upstream.status, headers=headers)
        if not ex.is_sse and upstream.content_length is not None:
            out.content_length = upstream.content_length
        ex.response = out
        await out.prepare(request)
        if ex.is_sse:
            self._metrics.open_streams.inc()
        try:
            result = await relay(
                upstream, request, out, ex.tap, self._loop.time, self._send_timeout
            )
        finally:
            if ex.is_sse:
                self._metrics.open_streams.dec()
        ex.bytes_out, ex.chunks, ex.first_byte_at = (
            result.bytes_out,
            result.chunks,
            result.first_byte_at,
        )
        if result.outcome is Outcome.COMPLETED or result.outcome is Outcome.CLIENT_GONE:
            ex.outcome = result.outcome
            return out
        if result.outcome is Outcome.CLIENT_STALLED:
            # The client stopped reading: its problem, not the upstream's. Cut it off.
            ex.outcome = result.outcome
            if request.transport is not None:
                request.transport.abort()
            return out
        kind = result.failure or "reset"
        self._failed(ex.upstream, kind)
        if kind == "timeout":
            raise UpstreamTimeout()
        raise UpstreamFailedMidStream()

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        length = request.content_length
        if length is not None and length > self._max_body:
            raise BodyTooLarge()
        if request.headers.get("Expect", "").lower() == "100-continue":
            # The low-level server does not answer Expect itself. We do it only now, after
            # auth and the size check, which is the point of 100-continue.
            await request.writer.write(_CONTINUE)
        parts: list[bytes] = []
        size = 0
        content = request.content
        failure: ProxyError | None = None
        loop = self._loop
        # A client that stops sending mid-body (or whose chunked framing broke: aiohttp
        # then never ends the body stream) must not hold a handler forever.
        try:
            async with asyncio.timeout(self._idle_timeout) as deadline:
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
                    parts.append(chunk)
                    deadline.reschedule(loop.time() + self._idle_timeout)
        except TimeoutError:
            failure = BodyTimeout()
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

    def _failed(self, upstream: str, kind: FailureKind) -> None:
        self._metrics.child(self._metrics.upstream_errors, upstream, kind).inc()

    async def _fail(
        self, request: web.BaseRequest, ex: _Exchange, error: ProxyError
    ) -> web.StreamResponse:
        """The one place that turns an error into what the client sees."""
        if error.reject_reason != "none":
            self._metrics.child(self._metrics.rejections, error.reject_reason).inc()
        started = ex.response
        if started is None or not started.prepared:
            ex.status = error.status
            response = web.Response(
                status=error.status,
                body=error_body(ex.dialect, error),
                content_type="application/json",
                headers={REQUEST_ID: ex.rid},
            )
            if error.status in (408, 413) or error.reject_reason == "draining":
                response.force_close()  # don't read the rest of a body we refused
            return response
        # The status line is gone: say it in-band if we can, else cut the connection so
        # the client can't take a truncated body for a whole one.
        if ex.is_sse:
            try:
                await started.write(sse_error_event(ex.dialect, error))
            except ConnectionError:
                pass
        elif request.transport is not None:
            request.transport.close()
        return started

    def _record(self, ex: _Exchange, finished: float) -> None:
        """Every metric of one request, once, from its outcome and counts."""
        m = self._metrics
        if ex.outcome is Outcome.CLIENT_GONE or ex.outcome is Outcome.CLIENT_STALLED:
            m.child(m.client_aborts, ex.route).inc()
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
            if tap.prompt_tokens:
                m.child(m.tokens, ex.project, ex.route, "prompt").inc(tap.prompt_tokens)
            if tap.completion_tokens:
                m.child(m.tokens, ex.project, ex.route, "completion").inc(tap.completion_tokens)
            ex.tap = None
        ex.response = None
