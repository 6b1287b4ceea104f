"""The bundled mock's wire formats: the bytes of each OpenAI and Anthropic response.

Builds what `mock_upstream` sends (its server) from a request body: a `Plan` of frames per
API, and error documents with fixed messages. Imports nothing from zrproxy and holds
nothing once a `Reply` and its `Plan` are dropped.

Goals: realistic enough that the official SDKs parse it, and cheap enough per chunk that
the benchmark measures the proxy, not the mock.
Strategy: each request's body is read once into a `Reply`, every frame it will send is
built up front (one JSON encoding per *kind* of frame, never per chunk), then the body is
dropped.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Final, Literal

import orjson

__all__ = [
    "ANTHROPIC_MODELS_BODY",
    "BUILDERS",
    "EMBEDDING",
    "JSON",
    "MODELS_BODY",
    "SSE",
    "Api",
    "ErrorStyle",
    "Plan",
    "Reply",
    "error_body",
    "unknown_path_body",
]

Api = Literal["chat", "completions", "embeddings", "responses", "messages"]
# Whose error documents: OpenAI's, Anthropic's, or Azure OpenAI's ({"error": {"code", ...}}).
ErrorStyle = Literal["openai", "anthropic", "azure"]

_ECHO_CHARS: Final = 64
_PROMPT_KEYS: Final = ("messages", "system", "prompt", "input", "instructions")
_FILLER_TEXT: Final = " lorem ipsum dolor sit amet, consectetur adipiscing elit,"
SSE: Final = "text/event-stream; charset=utf-8"
JSON: Final = "application/json"
EMBEDDING: Final = (0.0125, -0.025, 0.05, -0.1, 0.2, -0.4, 0.8, -0.0625)
_EMBEDDING_B64: Final = base64.b64encode(struct.pack("<8f", *EMBEDDING)).decode()
_MOCK_MODELS: Final = ("mock", "mock-n32-d20", "mock-f2000", "mock-e503")
MODELS_BODY: Final = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1735689600, "owned_by": "zrproxy-mock"}
            for m in _MOCK_MODELS
        ],
    }
)
# Anthropic's list format (GET /v1/models with anthropic-version).
ANTHROPIC_MODELS_BODY: Final = orjson.dumps(
    {
        "data": [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in _MOCK_MODELS
        ],
        "has_more": False,
        "first_id": _MOCK_MODELS[0],
        "last_id": _MOCK_MODELS[-1],
    }
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
class Reply:
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
    def build(
        cls, api: Api, body: dict[str, Any], chunks: int, chunk_bytes: int, seq: int
    ) -> Reply:
        """`chunks` content chunks of `chunk_bytes` filler each (0: one word); `seq` makes
        the response id."""
        filler = (_FILLER_TEXT * (chunk_bytes // len(_FILLER_TEXT) + 1))[:chunk_bytes]
        filler = filler or " lorem"
        options = body.get("stream_options")
        return cls(
            model=body["model"],
            first=_last_user_text(api, body)[:_ECHO_CHARS] or filler,
            filler=filler,
            n=chunks,
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
class Plan:
    """Bytes to send: ``head``, then ``chunks`` (delays, resets and hangs go between them),
    then ``tail``. A non-stream body is split in two halves so ``r``/``hangbody`` can cut it."""

    head: bytes
    chunks: Iterator[bytes]
    tail: bytes
    content_type: str = SSE
    content_length: int | None = None


def _whole(body: dict[str, Any], *, indent: bool = False) -> Plan:
    data = orjson.dumps(body, option=orjson.OPT_INDENT_2 if indent else 0)
    half = len(data) // 2
    return Plan(b"", iter((data[:half],)), data[half:], JSON, len(data))


def _data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps({"type": name, **obj}))


def _frames(first: bytes, filler: bytes, n: int) -> Iterator[bytes]:
    return chain((first,), repeat(filler, n - 1))


def _openai_usage(r: Reply) -> dict[str, int]:
    p, c = r.prompt_tokens, r.n
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _openai_end(r: Reply, base: dict[str, Any]) -> bytes:
    """After the finish chunk: the usage chunk (with no choices) if asked for, then [DONE]."""
    usage = _data({**base, "choices": [], "usage": _openai_usage(r)}) if r.include_usage else b""
    return usage + b"data: [DONE]\n\n"


def _chat(r: Reply) -> Plan:
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
    return Plan(head, chunks, chunk({}, "stop") + _openai_end(r, base))


def _completions(r: Reply) -> Plan:
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
    return Plan(b"", chunks, chunk("", "stop") + _openai_end(r, base))


def _embeddings(r: Reply) -> Plan:
    vector: Any = _EMBEDDING_B64 if r.base64 else EMBEDDING
    data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(r.inputs)]
    usage = {"prompt_tokens": r.prompt_tokens, "total_tokens": r.prompt_tokens}
    return _whole({"object": "list", "data": data, "model": r.model, "usage": usage})


def _responses(r: Reply) -> Plan:
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
    return Plan(head, chunks, tail)


def _messages(r: Reply) -> Plan:
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
    return Plan(head, _frames(delta(r.first), delta(r.filler), r.n), tail)


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
BUILDERS: Final[dict[Api, Callable[[Reply], Plan]]] = {
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


def _style(api: Api, style: ErrorStyle | None) -> ErrorStyle:
    return style if style is not None else "anthropic" if api == "messages" else "openai"


def error_body(api: Api, status: int, style: ErrorStyle | None = None) -> bytes:
    """The API's own error document for `status`, with a fixed message (`style`: whose
    format, by default the one `api` belongs to).

    A 404 is each provider's "model not found" answer (OpenAI's code `model_not_found`,
    Anthropic's `not_found_error` whose message starts with "model:", Azure's
    `DeploymentNotFound`), which a proxy must tell from its "unknown URL" answer
    (`unknown_path_body`)."""
    style = _style(api, style)
    if status == 400:
        message = "Malformed request: the body must be a JSON object with a string 'model'."
    elif status == 404:
        message = "The model was not found (the mock upstream was asked to fail with 404)."
    else:
        message = f"The mock upstream was asked to fail with status {status}."
    if style == "anthropic":
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        error: dict[str, Any] = {"type": _ANTHROPIC_TYPES.get(status, fallback)}
        if status == 404:
            message = "model: " + message
        return orjson.dumps({"type": "error", "error": {**error, "message": message}})
    if style == "azure":
        azure_code = "DeploymentNotFound" if status == 404 else str(status)
        return orjson.dumps({"error": {"code": azure_code, "message": message}})
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code: str | None = None
    if status == 429:
        kind, code = "requests", "rate_limit_exceeded"
    elif status == 404:
        code = "model_not_found"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def unknown_path_body(style: ErrorStyle, method: str, path: str) -> bytes:
    """What each provider answers (status 404) for a path it does not serve: OpenAI
    quotes the method and path back, Anthropic and Azure say "not found"."""
    if style == "anthropic":
        error = {"type": "not_found_error", "message": "Not Found"}
        return orjson.dumps({"type": "error", "error": error})
    if style == "azure":
        return orjson.dumps({"error": {"code": "404", "message": "Resource not found"}})
    message = f"Invalid URL ({method} {path})"
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    )
