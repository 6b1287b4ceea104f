"""Bundled mock LLM upstream: OpenAI and Anthropic wire formats, behaviour chosen by model string.

Owns the fake endpoints used by ``make run``, the tests and the benchmark, and ``MockStats``.
It must never import from zrproxy, and never keep prompt or completion content once a
response has ended: not in stats, logs, exceptions or caches.

Goals: realistic enough that the official SDKs parse it, and cheap enough per chunk that
the benchmark measures the proxy, not the mock.
Strategy: each request parses its body once, builds every frame it will send up front
(one JSON encoding per *kind* of frame, never per chunk), then drops the body.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain, repeat
from typing import Any, Final, Literal

import orjson
import uvloop
from aiohttp import web

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

Api = Literal["chat", "completions", "embeddings", "responses", "messages"]
EndState = Literal["completed", "disconnected", "reset", "error"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_RECORDS: Final = 10_000
_ECHO_CHARS: Final = 64
_MAX_BODY_BYTES: Final = 64 * 1024 * 1024
_PROMPT_KEYS: Final = ("messages", "system", "prompt", "input", "instructions")
_FILLER_TEXT: Final = " lorem ipsum dolor sit amet, consectetur adipiscing elit,"
_SSE: Final = "text/event-stream; charset=utf-8"
_JSON: Final = "application/json"
_EMBEDDING: Final = (0.0125, -0.025, 0.05, -0.1, 0.2, -0.4, 0.8, -0.0625)
_EMBEDDING_B64: Final = base64.b64encode(struct.pack("<8f", *_EMBEDDING)).decode()
_MODELS_BODY: Final = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1735689600, "owned_by": "zrproxy-mock"}
            for m in ("mock", "mock-n32-d20", "mock-f2000", "mock-e503")
        ],
    }
)
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


# --- what to say ------------------------------------------------------------------------


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(api: Api, body: dict[str, Any]) -> str:
    if api == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt:
            prompt = prompt[-1]
        return prompt if isinstance(prompt, str) else ""
    items = body.get("input" if api == "responses" else "messages")
    if isinstance(items, str):
        return items
    if isinstance(items, list):
        for item in reversed(items):
            if isinstance(item, dict) and item.get("role") == "user":
                return _text_of(item.get("content"))
    return ""


def _prompt_chars(body: dict[str, Any]) -> int:
    # Iterative: a deeply nested body must not hit the recursion limit.
    total, stack = 0, [body.get(key) for key in _PROMPT_KEYS]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return total


def _batch_size(inputs: object) -> int:
    """An embeddings input is a string, a token list, or a list of either."""
    if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int):
        return len(inputs)
    return 1


@dataclass(slots=True)
class _Reply:
    """Everything a response builder needs; holds the echo, so it dies with the request."""

    model: str
    first: str
    filler: str
    n: int
    prompt_tokens: int
    rid: str
    created: int
    stream: bool
    include_usage: bool
    inputs: int
    base64: bool
    store: bool

    @classmethod
    def build(cls, api: Api, body: dict[str, Any], b: MockBehaviour, seq: int) -> _Reply:
        filler = (_FILLER_TEXT * (b.chunk_bytes // len(_FILLER_TEXT) + 1))[: b.chunk_bytes]
        filler = filler or " lorem"
        options = body.get("stream_options")
        return cls(
            model=body["model"],
            first=_last_user_text(api, body)[:_ECHO_CHARS] or filler,
            filler=filler,
            n=b.chunks,
            prompt_tokens=_prompt_chars(body) // 4 + 1,
            rid=f"mock{seq:012d}",
            created=int(time.time()),
            stream=body.get("stream") is True and api != "embeddings",
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            inputs=_batch_size(body.get("input")),
            base64=body.get("encoding_format") == "base64",
            store=body.get("store") is not False,
        )

    @property
    def text(self) -> str:
        return self.first + self.filler * (self.n - 1)


# --- how to say it: one builder per API ---------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """Bytes to send: ``head``, then ``chunks`` (delays, resets and hangs go between them),
    then ``tail``. A non-stream body is split in two halves so ``r``/``hangbody`` can cut it."""

    head: bytes
    chunks: Iterator[bytes]
    tail: bytes
    content_type: str = _SSE
    content_length: int | None = None


def _whole(body: dict[str, Any], *, indent: bool = False) -> _Plan:
    data = orjson.dumps(body, option=orjson.OPT_INDENT_2 if indent else 0)
    half = len(data) // 2
    return _Plan(b"", iter((data[:half],)), data[half:], _JSON, len(data))


def _data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps({"type": name, **obj}))


def _frames(first: bytes, filler: bytes, n: int) -> Iterator[bytes]:
    return chain((first,), repeat(filler, n - 1))


def _openai_usage(r: _Reply) -> dict[str, int]:
    p, c = r.prompt_tokens, r.n
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _openai_end(r: _Reply, base: dict[str, Any]) -> bytes:
    """After the finish chunk: the usage chunk (with no choices) if asked for, then [DONE]."""
    usage = _data({**base, "choices": [], "usage": _openai_usage(r)}) if r.include_usage else b""
    return usage + b"data: [DONE]\n\n"


def _chat(r: _Reply) -> _Plan:
    base: dict[str, Any] = {"id": f"chatcmpl-{r.rid}", "object": "chat.completion.chunk"}
    base |= {"created": r.created, "model": r.model, "system_fingerprint": "fp_mock"}
    if not r.stream:
        message: dict[str, Any] = {"role": "assistant", "content": r.text, "refusal": None}
        message["annotations"] = []
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        body = {**base, "object": "chat.completion", "choices": [choice]}
        return _whole({**body, "usage": _openai_usage(r), "service_tier": "default"}, indent=True)
    usage: dict[str, Any] = {"usage": None} if r.include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data({**base, "choices": [choice], **usage})

    head = chunk({"role": "assistant", "content": "", "refusal": None})
    chunks = _frames(chunk({"content": r.first}), chunk({"content": r.filler}), r.n)
    return _Plan(head, chunks, chunk({}, "stop") + _openai_end(r, base))


def _completions(r: _Reply) -> _Plan:
    base: dict[str, Any] = {"id": f"cmpl-{r.rid}", "object": "text_completion"}
    base |= {"created": r.created, "model": r.model, "system_fingerprint": "fp_mock"}
    if not r.stream:
        choice = {"text": r.text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        return _whole({**base, "choices": [choice], "usage": _openai_usage(r)}, indent=True)
    usage: dict[str, Any] = {"usage": None} if r.include_usage else {}

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return _data({**base, "choices": [choice], **usage})

    chunks = _frames(chunk(r.first), chunk(r.filler), r.n)
    return _Plan(b"", chunks, chunk("", "stop") + _openai_end(r, base))


def _embeddings(r: _Reply) -> _Plan:
    vector: Any = _EMBEDDING_B64 if r.base64 else _EMBEDDING
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(r.inputs)]
    usage = {"prompt_tokens": r.prompt_tokens, "total_tokens": r.prompt_tokens}
    return _whole({"object": "list", "data": data, "model": r.model, "usage": usage})


def _responses(r: _Reply) -> _Plan:
    msg_id, text, p, c = f"msg_{r.rid}", r.text, r.prompt_tokens, r.n
    usage = {**_RESPONSE_USAGE, "input_tokens": p, "output_tokens": c, "total_tokens": p + c}
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item: dict[str, Any] = {"id": msg_id, "type": "message", "status": "completed"}
    item |= {"content": [part], "role": "assistant"}

    def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        head = {"id": f"resp_{r.rid}", "object": "response", "created_at": r.created}
        tail = {"model": r.model, "output": output, "store": r.store, "usage": usage}
        return {**head, "status": status, **_RESPONSE_FIELDS, **tail}

    if not r.stream:
        return _whole(response("completed", [item], usage), indent=True)

    def event(name: str, seq: int, **fields: Any) -> bytes:
        return _event(f"response.{name}", {"sequence_number": seq, **fields})

    at = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    started = response("in_progress", [], None)
    head = (
        event("created", 0, response=started)
        + event("in_progress", 1, response=started)
        + event("output_item.added", 2, output_index=0, item={**item, "content": []})
        + event("content_part.added", 3, **at, part={**part, "text": ""})
    )
    # Deltas differ only in sequence_number: splice it between precomputed pieces.
    pre = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta"'
    mid = b"," + orjson.dumps(at)[1:-1] + b',"delta":'
    first, filler = orjson.dumps(r.first), orjson.dumps(r.filler)
    chunks = (
        b'%s,"sequence_number":%d%s%s,"logprobs":[]}\n\n'
        % (pre, 4 + i, mid, filler if i else first)
        for i in range(r.n)
    )
    seq = 4 + r.n
    tail = (
        event("output_text.done", seq, **at, text=text, logprobs=[])
        + event("content_part.done", seq + 1, **at, part=part)
        + event("output_item.done", seq + 2, output_index=0, item=item)
        + event("completed", seq + 3, response=response("completed", [item], usage))
    )
    return _Plan(head, chunks, tail)


def _messages(r: _Reply) -> _Plan:
    usage = {**_ANTHROPIC_USAGE, "input_tokens": r.prompt_tokens, "output_tokens": r.n}
    message: dict[str, Any] = {"id": f"msg_{r.rid}", "type": "message", "role": "assistant"}
    message["model"] = r.model
    content = [{"type": "text", "text": r.text}]
    if not r.stream:
        return _whole({**message, "content": content, **_ANTHROPIC_END, "usage": usage})
    start: dict[str, Any] = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 1}

    def delta(text: str) -> bytes:
        return _event(
            "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}}
        )

    head = _event("message_start", {"message": start}) + _ANTHROPIC_HEAD
    end = {"delta": _ANTHROPIC_END, "usage": {"output_tokens": r.n}}
    tail = _ANTHROPIC_BLOCK_STOP + _event("message_delta", end) + _ANTHROPIC_STOP
    return _Plan(head, _frames(delta(r.first), delta(r.filler), r.n), tail)


# Constant parts of the wire objects, as the APIs send them.
_RESPONSE_USAGE: Final = orjson.loads(
    b'{"input_tokens":0,"input_tokens_details":{"cached_tokens":0},"output_tokens":0,'
    b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":0}'
)
_RESPONSE_FIELDS: Final = orjson.loads(
    b'{"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,'
    b'"parallel_tool_calls":true,"previous_response_id":null,'
    b'"reasoning":{"effort":null,"summary":null},"temperature":1.0,'
    b'"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,'
    b'"truncation":"disabled","user":null,"metadata":{}}'
)
_ANTHROPIC_USAGE: Final = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
_ANTHROPIC_END: Final = {"stop_reason": "end_turn", "stop_sequence": None}
_ANTHROPIC_HEAD: Final = (
    _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    + b'event: ping\ndata: {"type": "ping"}\n\n'
)
_ANTHROPIC_BLOCK_STOP: Final = _event("content_block_stop", {"index": 0})
_ANTHROPIC_STOP: Final = _event("message_stop", {})
_BUILDERS: Final[dict[Api, Callable[[_Reply], _Plan]]] = {
    "chat": _chat,
    "completions": _completions,
    "embeddings": _embeddings,
    "responses": _responses,
    "messages": _messages,
}

# --- errors, in the API's own format, with fixed messages ---------------------------------

_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _error(api: Api, status: int) -> web.Response:
    if status == 400:
        message = "Malformed request: the body must be a JSON object with a string 'model'."
    else:
        message = f"The mock upstream was asked to fail with status {status}."
    if api == "messages":
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        error: dict[str, Any] = {"type": _ANTHROPIC_TYPES.get(status, fallback)}
        body = orjson.dumps({"type": "error", "error": {**error, "message": message}})
    else:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        kind, code = ("requests", "rate_limit_exceeded") if status == 429 else (kind, None)
        body = orjson.dumps(
            {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


# --- the request lifecycle ----------------------------------------------------------------


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
    reply: _Reply,
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
    plan = _BUILDERS[api](reply)
    del reply
    headers = {"Content-Type": plan.content_type}
    if plan.content_type == _SSE:
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
            reply = _Reply.build(api, body, behaviour, stats.started)
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
    return web.Response(body=_MODELS_BODY, content_type=_JSON)


async def _count_tokens(request: web.Request) -> web.Response:
    """Anthropic's token count: one token per 4 bytes of body (deterministic for tests)."""
    stats = request.app[MOCK_STATS]
    size = len(await request.content.read())
    stats.finish(
        stats.begin(request.headers.get("x-request-id"), _record(request, None)), "completed"
    )
    return web.Response(body=orjson.dumps({"input_tokens": size // 4}), content_type=_JSON)


async def _moderations(request: web.Request) -> web.Response:
    """OpenAI's moderation result: nothing flagged."""
    stats = request.app[MOCK_STATS]
    await request.content.read()
    stats.finish(
        stats.begin(request.headers.get("x-request-id"), _record(request, None)), "completed"
    )
    result = {"flagged": False, "categories": {}, "category_scores": {}}
    body = {"id": "modr-mock", "model": "omni-moderation-latest", "results": [result]}
    return web.Response(body=orjson.dumps(body), content_type=_JSON)


async def _stats(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app[MOCK_STATS].snapshot()), content_type=_JSON)


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
