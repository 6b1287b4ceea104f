"""Wire formats: which endpoints exist, how each API spells errors, and request rewrites.

Owns the request side of the OpenAI- and Anthropic-style formats and every error body a
handler sends (`usage` reads the response side's usage objects; `app` answers HTTP it
cannot parse with two fixed OpenAI-style bodies). It builds error bodies from fixed
messages and never copies request content into them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from zrproxy.errors import MalformedJSON, MissingModel, ProxyError

# The API style of a client endpoint, and the one an upstream speaks.
Dialect = Literal["openai", "anthropic"]
DIALECTS: tuple[Dialect, ...] = ("openai", "anthropic")
# An upstream's config `kind`: who serves it. Azure OpenAI speaks OpenAI's dialect on its
# own paths (/openai/deployments/{deployment}/..., ?api-version=), with its own key header.
Kind = Literal["openai", "anthropic", "azure_openai"]
KINDS: tuple[Kind, ...] = ("openai", "anthropic", "azure_openai")
KIND_DIALECT: Mapping[Kind, Dialect] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure_openai": "openai",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    dialect: Dialect
    # Chat and text completions stream usage only when asked (stream_options.include_usage).
    usage_on_request: bool
    # The model routed on when the body names none (the API's own default), else required.
    default_model: str | None = None


ENDPOINTS: Mapping[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint("/v1/chat/completions", "openai", True),
        Endpoint("/v1/completions", "openai", True),
        Endpoint("/v1/embeddings", "openai", False),
        Endpoint("/v1/responses", "openai", False),
        Endpoint("/v1/moderations", "openai", False, "omni-moderation-latest"),
        Endpoint("/v1/messages", "anthropic", False),
        Endpoint("/v1/messages/count_tokens", "anthropic", False),
    )
}
MODELS_PATH = "/v1/models"
ANTHROPIC_VERSION = "2023-06-01"
# The endpoints each kind of upstream serves. Azure OpenAI's deployment API (dated
# api-versions) has chat completions, completions and embeddings; its Responses API lives
# only on the v1 API (/openai/v1/responses, no deployment in the path), which is an
# OpenAI-compatible base URL: configure that as kind "openai". Azure has no moderations.
KIND_ENDPOINTS: Mapping[Kind, frozenset[str]] = {
    "openai": frozenset(p for p, e in ENDPOINTS.items() if e.dialect == "openai"),
    "anthropic": frozenset(p for p, e in ENDPOINTS.items() if e.dialect == "anthropic"),
    "azure_openai": frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}),
}
# Whether the fields the proxy forces on zero-retention requests (`store: false`) go to
# this kind. Azure OpenAI rejects `store` on api-versions that predate stored completions
# ("Unknown parameter: 'store'") and stores a completion only when asked (`store: true`,
# which zero-retention projects are refused before routing): it gets the body without it.
SENDS_FORCED_FIELDS: Mapping[Kind, bool] = {
    "openai": True,
    "anthropic": True,
    "azure_openai": False,
}
_NO_FIELDS: Mapping[str, Any] = {}


def error_body(dialect: Dialect, error: ProxyError) -> bytes:
    """The API's own JSON error document for `error` (fixed text only)."""
    if dialect == "anthropic":
        # Anthropic's format has no `param`: the (fixed) field name goes in the message.
        message = error.message if error.param is None else f"{error.message} Field: {error.param}"
        return orjson.dumps(
            {"type": "error", "error": {"type": error.error_type, "message": message}}
        )
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.error_type,
                "param": error.param,
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


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# The decoder's C scanner: clears its key memo when each call returns, so no key of one
# body outlives its parse.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_JSON_WHITESPACE = " \t\n\r"


@dataclass(slots=True)
class ParsedRequest:
    """What the proxy needs from a request body; `payload` is dropped with the request."""

    payload: dict[str, Any]
    model: str
    stream: bool
    # The client asked for usage in the stream itself, so its usage chunk must reach it.
    client_wants_usage: bool


def parse_request(body: bytes, default_model: str | None = None) -> ParsedRequest:
    """Parse a JSON request body once.

    Uses the stdlib parser: orjson keeps a process-wide cache of object keys up to 64
    bytes, so a key that carries content would outlive the request. The stdlib decoder
    memoises keys per call only (its scanner clears the memo when a call returns), so
    one decoder serves every request: `json.loads` with a keyword argument built a
    decoder and scanner per call (3 µs, and objects that outlived a burst).
    """
    try:
        if body[:1] == b"{" and body[1:2] != b"\0":
            # What detect_encoding says of a body opening with "{" (no BOM, no NUL after
            # it), so the scanner is called at once: json.loads's wrappers and their
            # whitespace regexes cost more than scanning a short body.
            text = body.decode("utf-8", "surrogatepass")
            payload, end = _SCAN(text, 0)
            if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
                payload = None  # data after the document
        else:
            # What json.loads does with bytes: UTF-8, -16 or -32 by the first bytes.
            payload = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except (ValueError, RecursionError, StopIteration):
        # The decode error keeps the whole input in `.doc` (StopIteration: the scanner's
        # "nothing here"): let it die here, then raise.
        payload = None
    if not isinstance(payload, dict):
        raise MalformedJSON()
    model = payload.get("model", default_model)
    if not isinstance(model, str) or not model or len(model) > 256:
        raise MissingModel()
    options = payload.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ParsedRequest(payload, model, payload.get("stream") is True, wants_usage)


# The 404 codes that name something the client chose: OpenAI's unknown model, Azure's
# unknown deployment (the deployment comes from the model the client asked for).
_MODEL_404_CODES = frozenset({"model_not_found", "DeploymentNotFound"})


def names_a_model(kind: Kind, body: bytes) -> bool:
    """Whether an upstream's 404 body is its provider's answer about the model the client
    asked for (relayed), as opposed to its "unknown URL" answer or anything else, which
    means the endpoint is not where base_url says: OpenAI's code `model_not_found`,
    Azure's `DeploymentNotFound`, Anthropic's `not_found_error` with a message other
    than its unknown-path "Not Found" (it says "model: claude-..."). Parsed with the
    stdlib, then dropped."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None  # the decode error holds the body: it dies here
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        return False
    if kind == "anthropic":
        return error.get("type") == "not_found_error" and error.get("message") != "Not Found"
    return error.get("code") in _MODEL_404_CODES


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, overrides winning at every depth: nested tables
    are merged key by key, any other value replaces the client's."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = merge_overrides(current, value)
        else:
            merged[key] = value
    return merged


def _is_set(payload: Mapping[str, Any], forced: Mapping[str, Any]) -> bool:
    for key, value in forced.items():
        # `type(...) is` too: False == 0, and a client `store: 0` is not `store: false`.
        current = payload.get(key, _MISSING)
        if type(current) is not type(value) or current != value:
            return False
    return True


_MISSING = object()
_JSON_SPACE = frozenset(b" \t\r\n")
# The serialised form of each set of forced fields, built once (a handful of them).
_HEADS: dict[tuple[tuple[str, Any], ...], bytes] = {}


def _with_leading_fields(body: bytes, fields: Mapping[str, Any]) -> bytes | None:
    """`body` with `fields` spliced in as its object's first keys, or None when the body
    does not start with `{` (e.g. UTF-16 JSON). Only for fields absent from the body, so
    no key appears twice; the body has "model", so a comma always follows."""
    start = 0
    if body[:1] != b"{":
        while start < len(body) and body[start] in _JSON_SPACE:
            start += 1
        if body[start : start + 1] != b"{":
            return None
    key = tuple(fields.items())
    head = _HEADS.get(key)
    if head is None:
        head = _HEADS[key] = b"{" + b"".join(
            orjson.dumps(k) + b":" + orjson.dumps(v) + b"," for k, v in key
        )
    return b"".join((head, memoryview(body)[start + 1 :]))


class UpstreamBodies:
    """The body each upstream gets: the client's bytes untouched unless something must
    change. `clear()` drops the prompt once an upstream has taken the request.

    What goes out: the client's fields, then the upstream's `request_overrides` merged
    over them (winning, nested keys included), then `forced`: fields the proxy itself
    sets (`store: false` for zero-retention projects), winning over both.
    """

    __slots__ = ("_ask_usage", "_body", "_forced", "_forced_as_sent", "_request", "_upstream_model")

    def __init__(
        self,
        body: bytes,
        request: ParsedRequest,
        upstream_model: str | None,
        ask_usage: bool,
        forced: Mapping[str, Any] | None = None,
    ) -> None:
        self._body = body
        self._request: ParsedRequest | None = request
        self._upstream_model = upstream_model
        self._ask_usage = ask_usage
        self._forced: Mapping[str, Any] = forced or {}
        # The client already sent them so: its bytes can go as they are.
        self._forced_as_sent = _is_set(request.payload, self._forced)

    @property
    def model(self) -> str:
        """The model the upstream is asked for (the route's upstream_model, else the
        client's): Azure's deployment is looked up by it."""
        if self._upstream_model is not None:
            return self._upstream_model
        assert self._request is not None, "body used after clear()"
        return self._request.model

    def for_upstream(self, kind: Kind, overrides: Mapping[str, Any]) -> bytes:
        ask_usage = self._ask_usage and KIND_DIALECT[kind] == "openai"
        forced = self._forced if SENDS_FORCED_FIELDS[kind] else _NO_FIELDS
        if not overrides and self._upstream_model is None and not ask_usage:
            if self._forced_as_sent or not forced:
                return self._body
            assert self._request is not None, "body used after clear()"
            if not any(key in self._request.payload for key in forced):
                # The common zero-retention case: one copy, no re-serialisation.
                spliced = _with_leading_fields(self._body, forced)
                if spliced is not None:
                    return spliced
        assert self._request is not None, "body used after clear()"
        payload = merge_overrides(self._request.payload, overrides)
        payload.update(forced)
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


def _model_object(dialect: Dialect, model_id: str) -> dict[str, Any]:
    if dialect == "anthropic":
        created = "1970-01-01T00:00:00Z"
        return {"type": "model", "id": model_id, "display_name": model_id, "created_at": created}
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "zrproxy"}


def models_list(dialect: Dialect, model_ids: list[str]) -> bytes:
    """The API's list format for GET /v1/models (ids are config strings, never input)."""
    data = [_model_object(dialect, m) for m in model_ids]
    if dialect == "anthropic":
        first, last = (model_ids[0], model_ids[-1]) if model_ids else (None, None)
        return orjson.dumps({"data": data, "has_more": False, "first_id": first, "last_id": last})
    return orjson.dumps({"object": "list", "data": data})


def model_object(dialect: Dialect, model_id: str) -> bytes:
    """The API's format for GET /v1/models/{id}."""
    return orjson.dumps(_model_object(dialect, model_id))


def auth_headers(kind: Kind, api_key: str | None) -> dict[str, str]:
    """The headers that carry an upstream's own credentials, in its kind's style."""
    headers: dict[str, str] = {}
    if kind == "anthropic":
        if api_key:
            headers["x-api-key"] = api_key
    elif kind == "azure_openai":
        if api_key:
            headers["api-key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
