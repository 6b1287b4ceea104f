"""The request handlers: auth, body, routing, upstream, relay; and `Proxy._fail`, which
turns every `ProxyError` into what the client sees (HTTP our server cannot parse is
answered before any handler runs, by `server.HttpProtocol`, with fixed bodies).

Never logs. Never copies request content into anything but the upstream request, and
drops every reference to it by the time the response ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from zrproxy.audit import RETENTION_HEADER, AuditLog, AuditRecord, RecordingTap, retention_mode
from zrproxy.auth import Authenticator
from zrproxy.caches import forget_request_urls
from zrproxy.config import Config, ProjectConfig
from zrproxy.dialects import (
    ENDPOINTS,
    MODELS_PATH,
    Dialect,
    Endpoint,
    UpstreamBodies,
    error_body,
    model_object,
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
    ModelNotFound,
    Overloaded,
    ProxyError,
    ServiceDraining,
    StoringEndpoint,
    UnknownPath,
    UnsupportedEndpoint,
    UpstreamFailedMidStream,
    UpstreamRedirected,
    UpstreamTimeout,
    ZeroRetentionConflict,
)
from zrproxy.exchange import Exchange
from zrproxy.headers import REQUEST_ID, SSE_FIELDS, client_response_fields, request_id
from zrproxy.limits import Lease, Limits
from zrproxy.metrics import NOT_KNOWN, Metrics
from zrproxy.outcomes import FailureKind, Outcome
from zrproxy.policy import project_report, to_json
from zrproxy.request import Request
from zrproxy.response import Response, StreamingResponse
from zrproxy.retention_rules import conflict, forced_fields, is_storing_endpoint
from zrproxy.routing import DayClock, Router
from zrproxy.streaming import relay, whole_body
from zrproxy.upstream import Upstreams
from zrproxy.upstream_health import UpstreamHealth
from zrproxy.usage import UsageTap

_MODEL_PREFIX = MODELS_PATH + "/"
# Statuses whose Location sends the client elsewhere (304 Not Modified is relayed).
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# A customer's view of its project's data handling (zrproxy.policy).
POLICY_PATH = "/v1/policy"
# Retry-After of a 503 at a global cap: load of this kind clears within seconds.
_OVERLOAD_RETRY_S = 1
# Request targets that are our own fixed strings; any other target may carry content.
_PLAIN_TARGETS = frozenset([*ENDPOINTS, MODELS_PATH, POLICY_PATH])
_RETENTION_FIELD = RETENTION_HEADER.encode()


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
    project: str = NOT_KNOWN
    route: str = NOT_KNOWN
    upstream: str = NOT_KNOWN
    stream: bool = False
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    chunks: int = 0
    first_byte_at: float = 0.0
    tap: UsageTap | None = None
    response: Response | StreamingResponse | None = None
    is_sse: bool = False
    expired: bool = False  # the total deadline cancelled the handler
    proxied: bool = False  # a call to a proxied endpoint (not /v1/models, not a 404 path)
    retention: str | None = None  # the ZR-Data-Retention value, once the project is known
    audit: AuditRecord | None = None  # only for projects with an audit log
    reading_body: bool = False  # a deadline now is the client's fault, not the upstream's
    lease: Lease | None = None  # the project's concurrency slot
    stream_slot: bool = False  # counted in limits.streams
    body_reserved: int = 0  # bytes held in limits.bodies
    outcome: Outcome | None = None  # decided once, by Proxy.handle or the relay's result


def _media_type(content_type: bytes) -> bytes:
    return content_type.partition(b";")[0].strip().lower()


def _failure_outcome(ex: _Exchange, error: ProxyError) -> Outcome:
    if error.reject_reason is not None:
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
        self,
        config: Config,
        upstreams: Upstreams,
        metrics: Metrics,
        state: ServiceState,
        clock: DayClock | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        # Held once: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._max_body = config.server.max_body_bytes
        self._total_timeout = config.server.total_timeout_s
        self._idle_timeout = config.server.idle_timeout_s
        self._body_timeout = config.server.body_timeout_s
        self.limits = Limits(config, metrics.set_limits_backend)
        self._send_timeout = config.server.send_timeout_s
        self._auth = Authenticator(config.projects)
        # "Today" for announced subprocessors (injectable for tests).
        self.clock = clock if clock is not None else DayClock()
        self._router = Router(config, self.clock)
        self._config = config
        self._upstreams = upstreams
        self._deadlines = upstreams.deadlines
        self._metrics = metrics
        self._state = state
        self._health = UpstreamHealth(self._loop.time)
        self._audit = audit
        self._retention = {p.name: retention_mode(p) for p in config.projects}
        for p in config.projects:
            zero, logged = str(p.zero_retention).lower(), str(p.audit_log is not None).lower()
            metrics.project_info.labels(p.name, zero, logged).set(1)

    async def handle(self, request: Request) -> Response | StreamingResponse:
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
        self._metrics.in_flight_now.add(1.0)
        # One deadline per request for total_timeout_s, whatever phase it is in.
        deadline = self._deadlines.at(ex.started + self._total_timeout, _expire, ex, task)
        try:
            if not admitted:
                raise Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
            if endpoint is not None:
                response = await self._proxy(request, endpoint, ex)
            elif request.path == MODELS_PATH or request.path.startswith(_MODEL_PREFIX):
                response = self._models(request, ex)
            elif request.path == POLICY_PATH:
                response = self._policy(request, ex)
            else:
                if request.path.startswith("/v1/"):
                    # An unknown API path says so only to a caller with a valid key.
                    self._authenticate(request, ex)
                if is_storing_endpoint(request.path):
                    raise StoringEndpoint()
                raise UnknownPath()
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
                late = BodyTimeout() if ex.reading_body else UpstreamTimeout()
                return await self._fail(request, ex, late)
            if not self._state.drain_expired:
                ex.outcome = Outcome.CLIENT_GONE
                raise
            task.uncancel()
            ex.outcome = Outcome.DRAIN
            return await self._fail(request, ex, ServiceDraining())
        finally:
            deadline.cancel()
            if admitted:
                limits.in_flight.leave()
            self._release(ex)
            handlers = self._state.handlers
            handlers.discard(task)
            if not handlers:
                handlers.clear()  # gives back the table a burst grew (see Pool.lost)
            self._metrics.in_flight_now.add(-1.0)
            self._record(ex, loop.time())
            if ex.audit is not None:
                self._submit_audit(ex, loop.time())
            if request.raw_path not in _PLAIN_TARGETS:
                forget_request_urls()  # a query string or unknown path is content

    # --- the proxied endpoints ------------------------------------------------------------

    async def _proxy(
        self, request: Request, endpoint: Endpoint, ex: _Exchange
    ) -> Response | StreamingResponse:
        ex.proxied = True
        if request.method != "POST":
            raise MethodNotAllowed("POST")
        if self._state.draining:
            raise ServiceDraining()
        project = self._authenticate(request, ex)
        if self.limits.projects.limited(project.name):
            ex.lease = await self.limits.projects.admit(project.name)
        if project.audit_log is not None and self._audit is not None:
            ex.audit = self._audit.record(project.name, ex.rid)
        body = await self._read_body(request, ex)
        ex.bytes_in = len(body)
        if ex.audit is not None:
            ex.audit.request(body)
        parsed = parse_request(body, endpoint.default_model)
        forced = None
        if project.zero_retention:
            # Refused, never rewritten: a client that asked for state must learn it won't
            # get it. Before routing, so no upstream is contacted.
            rule = conflict(endpoint.path, parsed.payload)
            if rule is not None:
                self._metrics.child(self._metrics.zero_retention_refusals, rule.param).inc()
                raise ZeroRetentionConflict(rule.param)
            forced = forced_fields(endpoint.path)
        plan = self._router.plan(project, parsed.model)
        ex.route = plan.route.name
        # Only upstreams that speak this endpoint's API: never a path the upstream lacks.
        upstreams = plan.by_endpoint.get(endpoint.path, ())
        if not upstreams:
            raise UnsupportedEndpoint()
        ex.stream = parsed.stream
        if parsed.stream:
            if not self.limits.streams.enter():
                raise Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
            ex.stream_slot = True
        # We ask OpenAI-style streams for usage when the client did not, then drop that
        # event on the way back (the tap), so token counts work for every stream.
        ask_usage = endpoint.usage_on_request and parsed.stream and not parsed.client_wants_usage
        bodies = UpstreamBodies(body, parsed, plan.route.upstream_model, ask_usage, forced)
        del body, parsed
        try:
            upstream, response = await self._upstreams.open(
                upstreams, endpoint.path, request.headers, ex.rid, bodies, self._failed
            )
        finally:
            bodies.clear()  # the prompt is upstream now; don't hold it while streaming
            self.limits.bodies.release(ex.body_reserved)
            ex.body_reserved = 0
        ex.upstream = upstream.name
        served = response.status < 500 and response.status != 429
        if served:
            self._health.succeeded(upstream.name)
        if served and upstream is not upstreams[0]:
            # A failover is a request a later upstream served: relaying the last one's
            # 429/5xx after every upstream failed is no failover.
            self._metrics.child(self._metrics.failovers, ex.route).inc()
        strip = ask_usage and upstream.dialect == "openai"
        ex.tap = UsageTap(strip) if ex.audit is None else RecordingTap(ex.audit, strip)
        try:
            return await self._respond(request, response, ex)
        finally:
            if not response.finished:
                response.abandon()

    async def _respond(
        self, request: Request, upstream: Exchange, ex: _Exchange
    ) -> Response | StreamingResponse:
        if upstream.status in _REDIRECTS:
            # Not followed (upstream.py) and not relayed: its Location would send the
            # client, key and prompt included, to a host that is no subprocessor of ours.
            raise UpstreamRedirected()
        ex.is_sse = _media_type(upstream.content_type) == b"text/event-stream"
        # The upstream's bytes as they came (llhttp refused line breaks in them).
        fields = client_response_fields(upstream.headers, ex.rid)
        if ex.is_sse:
            fields += SSE_FIELDS
        if ex.retention is not None:
            fields.append((_RETENTION_FIELD, ex.retention.encode("ascii")))
        ex.status = upstream.status
        if upstream.ended and not ex.is_sse:
            # All of it is here (most non-streaming answers): one write for head and
            # body, where a StreamResponse writes its head on its own first. (Streams
            # stay chunked: their clients and any buffering in between expect it.)
            body, whole = whole_body(upstream, ex.tap, self._loop.time)
            ex.bytes_out, ex.chunks = whole.bytes_out, whole.chunks
            ex.first_byte_at = whole.first_byte_at
            ex.outcome = whole.outcome
            if ex.audit is not None:
                ex.audit.sent(whole.bytes_out)
            ex.response = Response(upstream.status, body, fields=fields)
            return ex.response
        length = None if ex.is_sse else upstream.content_length
        out = StreamingResponse(upstream.status, fields, length)
        ex.response = out
        if ex.is_sse:
            self._metrics.open_streams_now.add(1.0)
        try:
            result = await relay(
                upstream, request, out, ex.tap, self._loop.time, self._send_timeout
            )
        finally:
            if ex.is_sse:
                self._metrics.open_streams_now.add(-1.0)
        ex.bytes_out, ex.chunks, ex.first_byte_at = (
            result.bytes_out,
            result.chunks,
            result.first_byte_at,
        )
        if ex.audit is not None:
            ex.audit.sent(result.bytes_out)
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

    async def _read_body(self, request: Request, ex: _Exchange) -> bytes:
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
        # Only now, after auth and the size check, which is the point of 100-continue.
        request.send_continue()
        whole = request.take_whole_body()
        if whole is not None:
            # It all came with the head (most requests): no reads to wait for, no timer.
            failure = self._over_limits(ex, len(whole))
            if failure is not None:
                whole = b""  # the traceback keeps this frame: not the body with it
                raise failure
            return whole
        parts: list[bytes] = []
        size = 0
        failure = None
        loop = self._loop
        # The whole body within body_timeout_s, and no gap between reads longer than
        # idle_timeout_s (a dribbling client). Both are the client's fault: 408, never 504.
        whole_by = loop.time() + self._body_timeout
        ex.reading_body = True
        try:
            async with asyncio.timeout(min(whole_by, loop.time() + self._idle_timeout)) as dl:
                while True:
                    try:
                        chunk = await request.read_chunk()
                    except InvalidRequest:
                        failure = InvalidRequest()  # the body's framing broke
                        break
                    if not chunk:
                        break
                    size += len(chunk)
                    failure = self._over_limits(ex, size)
                    if failure is not None:
                        break
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

    def _over_limits(self, ex: _Exchange, size: int) -> ProxyError | None:
        """None once a body `size` bytes long so far is within max_body_bytes and held in
        the body budget (reserving what it has not reserved yet); else the refusal."""
        if size > self._max_body:
            return BodyTooLarge()
        if size > ex.body_reserved:
            if not self.limits.bodies.reserve(size - ex.body_reserved):
                return Overloaded(retry_after_s=_OVERLOAD_RETRY_S)
            ex.body_reserved = size
        return None

    def _authenticate(self, request: Request, ex: _Exchange) -> ProjectConfig:
        """The caller's project (InvalidAuth otherwise); from here on the exchange names
        it, and every response says how its data is handled."""
        project = self._auth.authenticate(request.headers)
        ex.project = project.name
        ex.retention = self._retention[project.name]
        return project

    def _models(self, request: Request, ex: _Exchange) -> Response | StreamingResponse:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("GET, HEAD")
        project = self._authenticate(request, ex)
        # The Anthropic SDK sends anthropic-version on every call: answer in its format.
        dialect: Dialect = "anthropic" if "anthropic-version" in request.headers else "openai"
        ex.dialect = dialect
        if request.path == MODELS_PATH:
            body = models_list(dialect, self._router.visible_models(project))
        else:
            listed = self._router.listed_model(project, request.path[len(_MODEL_PREFIX) :])
            if listed is None:
                raise ModelNotFound()
            body = model_object(dialect, listed)
        ex.status = 200
        # HEAD: the server sends the headers (Content-Length included) and no body.
        return Response(
            body=body,
            content_type="application/json",
            headers={REQUEST_ID: ex.rid, RETENTION_HEADER: self._retention[project.name]},
        )

    def _policy(self, request: Request, ex: _Exchange) -> Response | StreamingResponse:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed("GET, HEAD")
        project = self._authenticate(request, ex)
        ex.status = 200
        body = to_json(project_report(self._config, project, self._metrics, self.clock.day()))
        return Response(
            body=body,
            content_type="application/json",
            headers={REQUEST_ID: ex.rid, RETENTION_HEADER: self._retention[project.name]},
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

    def _failed(self, upstream: str, kind: FailureKind, reason: str | None = None) -> None:
        self._metrics.child(self._metrics.upstream_errors, upstream, kind).inc()
        self._health.failed(upstream, kind, reason)

    async def _fail(
        self, request: Request, ex: _Exchange, error: ProxyError
    ) -> Response | StreamingResponse:
        """A `ProxyError` as the client sees it: a status and error body before the first
        byte; after it, an in-band SSE error event, or a cut connection."""
        if error.reject_reason is not None:
            rejections = self._metrics.rejections
            self._metrics.child(rejections, error.reject_reason, ex.project, ex.route).inc()
        if error.client_error is not None:
            self._metrics.child(self._metrics.client_errors, error.client_error).inc()
        started = ex.response
        if not isinstance(started, StreamingResponse) or not started.prepared:
            ex.status = error.status
            body = error_body(ex.dialect, error)
            headers = {REQUEST_ID: ex.rid, **error.response_headers()}
            if ex.retention is not None:  # not before the project is known (e.g. 401)
                headers[RETENTION_HEADER] = ex.retention
            if ex.audit is not None:
                ex.audit.response(body)
            response = Response(error.status, body, headers, "application/json")
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
            # After a blank line: the cut may have come inside an event, which the SDK
            # must end (and fail on) alone, not read our event's lines into it.
            event = b"\n\n" + sse_error_event(ex.dialect, error)
            if started.write(event) and ex.audit is not None:
                ex.audit.response(event)
        if request.transport is not None:
            request.transport.close()
        return started

    def _submit_audit(self, ex: _Exchange, finished: float) -> None:
        assert ex.audit is not None and self._audit is not None
        self._audit.submit(
            ex.audit,
            route=ex.route,
            upstream=ex.upstream,
            status=ex.status or 499,
            duration_s=round(finished - ex.started, 6),
            stream=ex.stream,
        )
        ex.audit = None

    def _record(self, ex: _Exchange, finished: float) -> None:
        """Every metric of one request, once, from its outcome and counts."""
        m = self._metrics
        if ex.outcome is Outcome.CLIENT_GONE or ex.outcome is Outcome.CLIENT_STALLED:
            m.child(m.client_aborts, ex.route).inc()
        if ex.outcome is Outcome.CLIENT_STALLED:
            # It stopped reading past send_timeout_s: the client's fault, not the upstream's.
            m.child(m.client_errors, "slow_read").inc()
        if not ex.proxied:
            return  # /v1/models and unknown paths are not proxied requests
        series = m.series(ex.project, ex.route, ex.upstream, ex.status or 499, ex.stream)
        series.requests.add(1.0)
        series.duration.observe(finished - ex.started)
        if ex.first_byte_at:
            series.ttfb.observe(ex.first_byte_at - ex.started)
        if ex.bytes_in:
            series.bytes_in.add(ex.bytes_in)
        if ex.bytes_out:
            series.bytes_out.add(ex.bytes_out)
        if ex.chunks and ex.is_sse:
            series.chunks.add(ex.chunks)
        tap = ex.tap
        if tap is not None:
            tokens = tap.tokens()
            if ex.project != NOT_KNOWN:
                self.limits.projects.add_tokens(ex.project, sum(tokens.values()))
            counters = series.tokens
            for kind, count in tokens.items():
                if count:
                    counters[kind].add(count)
            ex.tap = None
        ex.response = None
