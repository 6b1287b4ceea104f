"""Wire formats: which endpoints exist, how each API spells errors, and request rewrites.

Owns the request side of the OpenAI- and Anthropic-style formats and every error body a
handler sends (`usage` reads the response side's usage objects; `app` answers HTTP it
cannot parse with two fixed OpenAI-style bodies). It builds error bodies from fixed
messages and never copies request content into them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from zrproxy.errors import MalformedJSON, MissingModel, ProxyError

# The API style of a client endpoint and of an upstream (its config `kind`).
Dialect = Literal["openai", "anthropic"]
DIALECTS: tuple[Dialect, ...] = ("openai", "anthropic")


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    dialect: Dialect
    # Chat and text completions stream usage only when asked (stream_options.include_usage).
    usage_on_request: bool


ENDPOINTS: Mapping[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint("/v1/chat/completions", "openai", True),
        Endpoint("/v1/completions", "openai", True),
        Endpoint("/v1/embeddings", "openai", False),
        Endpoint("/v1/responses", "openai", False),
        Endpoint("/v1/messages", "anthropic", False),
    )
}
MODELS_PATH = "/v1/models"
ANTHROPIC_VERSION = "2023-06-01"


def error_body(dialect: Dialect, error: ProxyError) -> bytes:
    """The API's own JSON error document for `error` (fixed text only)."""
    if dialect == "anthropic":
        return orjson.dumps(
            {"type": "error", "error": {"type": error.error_type, "message": error.message}}
        )
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.error_type,
                "param": None,
                "code": error.code,
            }
        }
    )


def sse_error_event(dialect: Dialect, error: ProxyError) -> bytes:
    """An in-band error for a stream that has already started (status can't change)."""
    if dialect == "anthropic":
        return b"event: error\ndata: " + error_body(dialect, error) + b"\n\n"
    return b"data: " + error_body(dialect, error) + b"\n\n"


def _reject_constant(_name: str) -> Any:
    raise ValueError


@dataclass(slots=True)
class ParsedRequest:
    """What the proxy needs from a request body; `payload` is dropped with the request."""

    payload: dict[str, Any]
    model: str
    stream: bool
    # The client asked for usage in the stream itself, so its usage chunk must reach it.
    client_wants_usage: bool


def parse_request(body: bytes) -> ParsedRequest:
    """Parse a JSON request body once.

    Uses the stdlib parser: orjson keeps a process-wide cache of object keys up to 64
    bytes, so a key that carries content would outlive the request. The stdlib decoder
    memoises keys per call only.
    """
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # The decode error keeps the whole input in `.doc`: let it die here, then raise.
        payload = None
    if not isinstance(payload, dict):
        raise MalformedJSON()
    model = payload.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise MissingModel()
    options = payload.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ParsedRequest(payload, model, payload.get("stream") is True, wants_usage)


class UpstreamBodies:
    """The body each upstream gets: the client's bytes untouched unless something must
    change. `clear()` drops the prompt once an upstream has taken the request."""

    __slots__ = ("_ask_usage", "_body", "_request", "_upstream_model")

    def __init__(
        self, body: bytes, request: ParsedRequest, upstream_model: str | None, ask_usage: bool
    ) -> None:
        self._body = body
        self._request: ParsedRequest | None = request
        self._upstream_model = upstream_model
        self._ask_usage = ask_usage

    def for_upstream(self, kind: Dialect, overrides: Mapping[str, Any]) -> bytes:
        ask_usage = self._ask_usage and kind == "openai"
        if not overrides and self._upstream_model is None and not ask_usage:
            return self._body
        assert self._request is not None, "body used after clear()"
        payload = dict(self._request.payload)
        payload.update(overrides)
        if self._upstream_model is not None:
            payload["model"] = self._upstream_model
        if ask_usage:
            options = payload.get("stream_options")
            payload["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return orjson.dumps(payload)

    def clear(self) -> None:
        self._body = b""
        self._request = None


def models_list(model_ids: Iterable[str]) -> bytes:
    """OpenAI's list format for GET /v1/models."""
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "zrproxy"} for m in model_ids
            ],
        }
    )


def auth_headers(kind: Dialect, api_key: str | None) -> dict[str, str]:
    """The headers that carry an upstream's own credentials, in its kind's style."""
    headers: dict[str, str] = {}
    if kind == "anthropic":
        if api_key:
            headers["x-api-key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
