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
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import orjson
import uvloop
from aiohttp import web

from zrproxy.mock_wire import BUILDERS, JSON, MODELS_BODY, SSE, Api, Reply, error_body

__all__ = [
    "MOCK_STATS",
    "MockBehaviour",
    "MockStats",
    "RequestRecord",
    "create_mock_app",
    "main",
    "start_mock",
]

LOG = logging.getLogger("zrproxy.mock_upstream")

EndState = Literal["completed", "disconnected", "reset", "error"]
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
    )


# --- the request lifecycle ----------------------------------------------------------------


def _error(api: Api, status: int) -> web.Response:
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.Response(
        status=status, body=error_body(api, status), content_type=JSON, headers=headers
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
        return _error(api, b.error_status)
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


def _api_handler(api: Api) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        stats = request.app[MOCK_STATS]
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
                return _error(api, 400)
            behaviour = MockBehaviour.parse(body["model"])
            reply = Reply.build(api, body, behaviour.chunks, behaviour.chunk_bytes, stats.started)
            del body
            return await _respond(request, stats, rec, api, behaviour, reply)
        except asyncio.CancelledError:  # handler cancellation: the client disconnected
            stats.finish(rec, "disconnected")
            raise

    return handle


async def _models(request: web.Request) -> web.Response:
    stats = request.app[MOCK_STATS]
    stats.finish(
        stats.begin(request.headers.get("x-request-id"), _record(request, None)), "completed"
    )
    return web.Response(body=MODELS_BODY, content_type=JSON)


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


_ROUTES: Final[tuple[tuple[str, Api], ...]] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completions"),
    ("/v1/embeddings", "embeddings"),
    ("/v1/responses", "responses"),
    ("/v1/messages", "messages"),
)


def create_mock_app() -> web.Application:
    """The mock upstream application; its ``MockStats`` is at ``app[MOCK_STATS]``."""
    app = web.Application(client_max_size=_MAX_BODY_BYTES)
    app[MOCK_STATS] = MockStats()
    for path, api in _ROUTES:
        app.router.add_post(path, _api_handler(api))
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_post("/v1/moderations", _moderations)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_mock/stats", _stats)
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def start_mock(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Start the mock on ``host:port`` (0 = any free port).

    Returns the runner (call ``cleanup()`` to stop) and the base URL ``http://HOST:PORT/v1``.
    """
    # A short shutdown_timeout: a mock mid-`hang` must not hold cleanup for a minute.
    runner = web.AppRunner(
        create_mock_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return runner, f"http://{_url_host(host)}:{bound_port}/v1"


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def _serve(host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        runner, url = await start_mock(host, port)
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
    """``python -m zrproxy.mock_upstream [--listen HOST:PORT]``; exits 0 on SIGTERM/SIGINT."""
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return uvloop.run(_serve(*args.listen))
    except KeyboardInterrupt:  # SIGINT before the handler was installed
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
