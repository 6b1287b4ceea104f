"""Bundled mock LLM upstream: the server, its behaviour chosen by model string.

Owns the fake endpoints used by ``make run``, the tests and the benchmark, the
model-string grammar (``MockBehaviour``) and ``MockStats``; the bytes it sends come from
``mock_wire``. It imports nothing else from zrproxy, and never keeps prompt or
completion content once a response has ended: not in stats, logs, exceptions or caches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import orjson
import uvloop
from aiohttp import web

from zrproxy.mock_wire import (
    ANTHROPIC_MODELS_BODY,
    BUILDERS,
    JSON,
    MODELS_BODY,
    SSE,
    Api,
    ErrorStyle,
    Reply,
    error_body,
    unknown_path_body,
)

__all__ = [
    "MOCK_KINDS",
    "MOCK_STATS",
    "MockBehaviour",
    "MockKind",
    "MockStats",
    "RequestRecord",
    "create_mock_app",
    "main",
    "start_mock",
]

LOG = logging.getLogger("zrproxy.mock_upstream")

EndState = Literal["completed", "disconnected", "reset", "error"]
# Which provider the mock plays: it answers only that provider's paths (404 in its format
# otherwise). None: every path of every kind, for one mock behind upstreams of each kind.
MockKind = Literal["openai", "anthropic", "azure_openai"]
MOCK_KINDS: Final[tuple[MockKind, ...]] = ("openai", "anthropic", "azure_openai")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_RECORDS: Final = 10_000
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024
# name -> (field, lowest, highest): clamped so a model string cannot ask for absurd work.
_INT_TOKENS: Final = {
    "n": ("chunks", 1, 1_000_000),
    "d": ("delay_ms", 0, 600_000),
    "f": ("first_byte_ms", 0, 600_000),
    "s": ("chunk_bytes", 0, 1 << 20),
    "r": ("reset_after", 0, 1_000_000),
}


@dataclass(frozen=True, slots=True)
class MockBehaviour:
    """What one request does, parsed from the dash-separated tokens after ``mock``.

    ``n<int>`` content chunks (1..1e6), ``d<int>`` ms between chunks (non-stream: n*d ms
    before the headers), ``f<int>`` ms before the headers, ``s<int>`` bytes per filler
    chunk (0 = one word), ``e<400..599>`` fail with that status, ``r<int>`` TCP RST after
    that many chunks (``r0``: before any byte; non-stream: after half the body),
    ``hang`` never answers, ``hangbody`` sends the first chunk then nothing. Unknown or
    malformed tokens are ignored; a later token overrides an earlier one.
    """

    chunks: int = 8
    delay_ms: int = 0
    first_byte_ms: int = 0
    chunk_bytes: int = 0
    error_status: int | None = None
    reset_after: int | None = None
    hang: bool = False
    hang_body: bool = False

    @classmethod
    def parse(cls, model: str) -> MockBehaviour:
        tokens = model.split("-")
        if "mock" not in tokens:
            return cls()
        values: dict[str, Any] = {}
        for token in tokens[tokens.index("mock") + 1 :]:
            if token == "hang":
                values["hang"] = True
            elif token == "hangbody":
                values["hang_body"] = True
            else:
                key, digits = token[:1], token[1:]
                # isdigit() alone accepts non-ASCII digits; 9 digits keeps int() cheap.
                if not (0 < len(digits) <= 9 and digits.isascii() and digits.isdigit()):
                    continue
                number = int(digits)
                if key == "e" and 400 <= number <= 599:
                    values["error_status"] = number
                elif key in _INT_TOKENS:
                    name, low, high = _INT_TOKENS[key]
                    values[name] = min(max(number, low), high)
        return cls(**values)


@dataclass(slots=True)
class RequestRecord:
    """Metadata about one request: never its content."""

    path: str
    model: str
    stream: bool
    started_at: float
    header_names: tuple[str, ...]
    authorization: str | None
    x_api_key: str | None
    body_keys: tuple[str, ...]
    store: Any = None
    stream_options: Any = None
    # Azure's api-version query parameter, as sent (None: not sent).
    api_version: str | None = None
    api_key: str | None = None
    ended_at: float | None = None
    end: EndState | None = None


@dataclass(slots=True)
class MockStats:
    """Counters plus the last ``max_records`` records keyed by the ``x-request-id`` header."""

    started: int = 0
    completed: int = 0
    disconnected: int = 0
    reset: int = 0
    errored: int = 0
    requests: dict[str, RequestRecord] = field(default_factory=dict)
    max_records: int = MAX_RECORDS

    def begin(self, request_id: str | None, record: RequestRecord) -> RequestRecord:
        """Count a request; keep its record if it has an id (the newest id wins)."""
        self.started += 1
        if request_id is not None:
            self.requests.pop(request_id, None)
            self.requests[request_id] = record
            if len(self.requests) > self.max_records:
                del self.requests[next(iter(self.requests))]
        return record

    def finish(self, record: RequestRecord, end: EndState) -> None:
        """Record how a request ended; only the first call per record counts."""
        if record.end is not None:
            return
        record.end, record.ended_at = end, time.monotonic()
        if end == "completed":
            self.completed += 1
        elif end == "disconnected":
            self.disconnected += 1
        elif end == "reset":
            self.reset += 1
        else:
            self.errored += 1

    def snapshot(self) -> dict[str, Any]:
        """The JSON served at ``/_mock/stats``."""
        counts = ("started", "completed", "disconnected", "reset", "errored")
        out: dict[str, Any] = {name: getattr(self, name) for name in counts}
        out["requests"] = {rid: asdict(rec) for rid, rec in self.requests.items()}
        return out


MOCK_STATS: Final[web.AppKey[MockStats]] = web.AppKey("mock_stats", MockStats)
MOCK_KIND: Final[web.AppKey[MockKind | None]] = web.AppKey("mock_kind")


def _record(request: web.Request, body: dict[str, Any] | None) -> RequestRecord:
    body = body or {}
    model = body.get("model")
    return RequestRecord(
        path=request.path,
        model=model if isinstance(model, str) else "",
        stream=body.get("stream") is True,
        started_at=time.monotonic(),
        header_names=tuple(name.lower() for name in request.headers),
        authorization=request.headers.get("authorization"),
        x_api_key=request.headers.get("x-api-key"),
        body_keys=tuple(body),
        store=body.get("store"),
        stream_options=body.get("stream_options"),
        api_version=request.query.get("api-version"),
        api_key=request.headers.get("api-key"),
    )


# --- the request lifecycle ----------------------------------------------------------------


def _error(api: Api, status: int, style: ErrorStyle | None = None) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.Response(
        status=status, body=error_body(api, status, style), content_type=JSON, headers=headers
    )


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


def _reset(request: web.Request) -> None:
    """Send a real TCP RST: SO_LINGER (on, 0s) makes close() discard and reset."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _respond(
    request: web.Request,
    stats: MockStats,
    rec: RequestRecord,
    api: Api,
    b: MockBehaviour,
    reply: Reply,
    style: ErrorStyle | None,
) -> web.StreamResponse:
    wait_ms = b.first_byte_ms + (0 if reply.stream else b.delay_ms * b.chunks)
    if wait_ms:
        await asyncio.sleep(wait_ms / 1000)
    if b.hang:
        await _forever()
    if b.reset_after == 0:
        stats.finish(rec, "reset")
        _reset(request)
        return web.StreamResponse()  # aiohttp's own write to the dead socket fails quietly
    if b.error_status is not None:
        stats.finish(rec, "error")
        return _error(api, b.error_status, style)
    plan = BUILDERS[api](reply)
    del reply
    headers = {"Content-Type": plan.content_type}
    if plan.content_type == SSE:
        headers["Cache-Control"] = "no-cache"
    response = web.StreamResponse(headers=headers)
    response.content_length = plan.content_length
    delay = b.delay_ms / 1000
    try:
        await response.prepare(request)
        if plan.head:
            await response.write(plan.head)
        for i, frame in enumerate(plan.chunks):
            if i == b.reset_after:
                break
            if i == 1 and b.hang_body:
                await _forever()
            if i and delay:
                await asyncio.sleep(delay)
            await response.write(frame)
        if b.reset_after is not None:  # asked for more chunks than there are: cut the tail
            stats.finish(rec, "reset")
            _reset(request)
            return response
        if b.hang_body:
            await _forever()
        await response.write(plan.tail)
        await response.write_eof()
    except ConnectionError:  # aiohttp's ClientConnectionResetError: the client went away
        stats.finish(rec, "disconnected")
        return response
    stats.finish(rec, "completed")
    return response


def _api_handler(api: Api, style: ErrorStyle | None = None) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        stats = request.app[MOCK_STATS]
        if style == "azure":
            refused = _azure_refusal(request)
            if refused is not None:
                await request.content.read()
                return refused
        # Not request.read(): it caches the body on the request, which a keep-alive
        # connection keeps alive until its next request.
        raw = await request.content.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None  # the error and its .doc (the raw body) die here
        del raw
        if not isinstance(body, dict):
            body = None
        rec = stats.begin(request.headers.get("x-request-id"), _record(request, body))
        try:
            if body is None or not isinstance(body.get("model"), str):
                stats.finish(rec, "error")
                return _error(api, 400, style)
            behaviour = MockBehaviour.parse(body["model"])
            reply = Reply.build(api, body, behaviour.chunks, behaviour.chunk_bytes, stats.started)
            del body
            return await _respond(request, stats, rec, api, behaviour, reply, style)
        except asyncio.CancelledError:  # handler cancellation: the client disconnected
            stats.finish(rec, "disconnected")
            raise

    return handle


async def _models(request: web.Request) -> web.Response:
    stats = request.app[MOCK_STATS]
    stats.finish(
        stats.begin(request.headers.get("x-request-id"), _record(request, None)), "completed"
    )
    anthropic = "anthropic-version" in request.headers or request.app[MOCK_KIND] == "anthropic"
    return web.Response(body=ANTHROPIC_MODELS_BODY if anthropic else MODELS_BODY, content_type=JSON)


# Azure's dated API versions: YYYY-MM-DD, or YYYY-MM-DD-preview.
_AZURE_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?")
_AZURE_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)


def _azure_refusal(request: web.Request) -> web.Response | None:
    """Azure's answers to a request without an api-key header (401) or api-version (404,
    as Azure answers a path without it), or with a version it does not know (400)."""
    if not request.headers.get("api-key"):
        body = orjson.dumps({"error": {"code": "401", "message": _AZURE_DENIED}})
        return web.Response(status=401, body=body, content_type=JSON)
    version = request.query.get("api-version")
    if version is None:
        return web.Response(status=404, body=unknown_path_body("azure", "", ""), content_type=JSON)
    if not _AZURE_API_VERSION.fullmatch(version):
        error = {"code": "BadRequest", "message": "API version not supported"}
        return web.Response(status=400, body=orjson.dumps({"error": error}), content_type=JSON)
    return None


def _not_found(style: ErrorStyle) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        await request.content.read()
        body = unknown_path_body(style, request.method, request.path)
        return web.Response(status=404, body=body, content_type=JSON)

    return handle


async def _count_tokens(request: web.Request) -> web.Response:
    """Anthropic's token count: one token per 4 bytes of body (deterministic for tests)."""
    stats = request.app[MOCK_STATS]
    size = len(await request.content.read())
    stats.finish(
        stats.begin(request.headers.get("x-request-id"), _record(request, None)), "completed"
    )
    return web.Response(body=orjson.dumps({"input_tokens": size // 4}), content_type=JSON)


async def _moderations(request: web.Request) -> web.Response:
    """OpenAI's moderation result: nothing flagged."""
    stats = request.app[MOCK_STATS]
    await request.content.read()
    stats.finish(
        stats.begin(request.headers.get("x-request-id"), _record(request, None)), "completed"
    )
    result = {"flagged": False, "categories": {}, "category_scores": {}}
    body = {"id": "modr-mock", "model": "omni-moderation-latest", "results": [result]}
    return web.Response(body=orjson.dumps(body), content_type=JSON)


async def _stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[MOCK_STATS].snapshot()), content_type=JSON)


_OPENAI_ROUTES: Final[tuple[tuple[str, Api], ...]] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/responses", "responses"),
)
# Azure OpenAI's deployment paths (the dated API): chat, completions, embeddings.
_AZURE_ROUTES: Final[tuple[tuple[str, Api], ...]] = (
    ("/openai/deployments/{deployment}/chat/completions", "chat"),
    ("/openai/deployments/{deployment}/completions", "completions"),
    ("/openai/deployments/{deployment}/embeddings", "embeddings"),
)


def create_mock_app(
    kind: MockKind | None = None, stats: MockStats | None = None
) -> web.Application:
    """The mock upstream application; its ``MockStats`` (``stats``, or its own) is at
    ``app[MOCK_STATS]``.

    ``kind`` names the provider it plays: only that provider's paths answer, any other
    gets the provider's own 404 (None: every kind's paths, OpenAI's 404)."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[MOCK_STATS] = MockStats() if stats is None else stats
    app[MOCK_KIND] = kind
    if kind in (None, "openai"):
        for path, api in _OPENAI_ROUTES:
            app.router.add_post(path, _api_handler(api))
        app.router.add_post("/v1/moderations", _moderations)
    if kind in (None, "anthropic"):
        app.router.add_post("/v1/messages", _api_handler("messages"))
        app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    if kind in (None, "openai", "anthropic"):
        app.router.add_get("/v1/models", _models)
    if kind in (None, "azure_openai"):
        for path, api in _AZURE_ROUTES:
            app.router.add_post(path, _api_handler(api, "azure"))
    app.router.add_get("/_mock/stats", _stats)
    style: ErrorStyle = (
        "anthropic" if kind == "anthropic" else "azure" if kind == "azure_openai" else "openai"
    )
    app.router.add_route("*", "/{tail:.*}", _not_found(style))
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def start_mock(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    kind: MockKind | None = None,
    ssl_context: ssl.SSLContext | None = None,
    stats: MockStats | None = None,
) -> tuple[web.AppRunner, str]:
    """Start the mock on ``host:port`` (0 = any free port), as `kind` (see
    `create_mock_app`), over TLS with ``ssl_context``.

    Returns the runner (call ``cleanup()`` to stop) and the base URL
    ``http(s)://HOST:PORT/v1`` (for kind azure_openai, without ``/v1``: Azure's paths
    start at ``/openai``).
    """
    # A short shutdown_timeout: a mock mid-`hang` must not hold cleanup for a minute.
    runner = web.AppRunner(
        create_mock_app(kind, stats),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    scheme = "https" if ssl_context is not None else "http"
    suffix = "" if kind == "azure_openai" else "/v1"
    return runner, f"{scheme}://{_url_host(host)}:{bound_port}{suffix}"


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _serve(
    host: str, port: int, kind: MockKind | None, ssl_context: ssl.SSLContext | None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, url = await start_mock(host, port, kind=kind, ssl_context=ssl_context)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else "bind failed"
        LOG.error("mock upstream cannot listen on %s:%d: %s", host, port, reason)
        return 1
    LOG.info("mock upstream listening on %s", url.removesuffix("/v1"))
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zrproxy.mock_upstream [--listen HOST:PORT] [--kind KIND] [--tls-cert
    FILE --tls-key FILE]``; exits 0 on SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="zrproxy mock-upstream", description="Run the bundled mock LLM upstream."
    )
    parser.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 9999),
        metavar="HOST:PORT",
        help="address to bind (default 127.0.0.1:9999)",
    )
    parser.add_argument(
        "--kind",
        choices=MOCK_KINDS,
        default=None,
        help="play one provider: answer only its paths (default: every kind's paths)",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve https with this certificate")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    args = parser.parse_args(argv)
    context = None
    if args.tls_cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, port = args.listen
        return uvloop.run(_serve(host, port, args.kind, context))
    except KeyboardInterrupt:  # SIGINT before the handler was installed
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
