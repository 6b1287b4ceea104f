"""dialects: error bodies in both formats, SSE error events, request parsing, body rewrites."""

from __future__ import annotations

import inspect
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zrproxy import errors
from zrproxy.dialects import (
    ENDPOINTS,
    MODELS_PATH,
    ParsedRequest,
    UpstreamBodies,
    auth_headers,
    error_body,
    model_object,
    models_list,
    parse_request,
    sse_error_event,
)
from zrproxy.errors import MalformedJSON, MissingModel, ProxyError

# Errors that take an argument, and the (fixed, ours) value a test builds them with.
_ARGS: dict[str, str] = {"MethodNotAllowed": "POST", "ZeroRetentionConflict": "store"}


def make(cls: type[ProxyError]) -> ProxyError:
    return cls(_ARGS[cls.__name__]) if cls.__name__ in _ARGS else cls()  # type: ignore[call-arg]


PROXY_ERRORS = sorted(
    (
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, ProxyError) and cls is not ProxyError
    ),
    key=lambda cls: cls.__name__,
)


# --- endpoints ------------------------------------------------------------------------------


def test_endpoints_and_their_dialects() -> None:
    got = {path: (e.dialect, e.usage_on_request, e.default_model) for path, e in ENDPOINTS.items()}
    assert got == {
        "/v1/chat/completions": ("openai", True, None),
        "/v1/completions": ("openai", True, None),
        "/v1/embeddings": ("openai", False, None),
        "/v1/responses": ("openai", False, None),
        "/v1/moderations": ("openai", False, "omni-moderation-latest"),
        "/v1/messages": ("anthropic", False, None),
        "/v1/messages/count_tokens": ("anthropic", False, None),
    }
    assert all(path == e.path for path, e in ENDPOINTS.items())
    assert MODELS_PATH == "/v1/models"


# --- error bodies ---------------------------------------------------------------------------


def test_the_error_reader_finds_the_classes() -> None:
    assert {MalformedJSON, MissingModel, errors.UpstreamFailedMidStream} <= set(PROXY_ERRORS)


@pytest.mark.parametrize("cls", PROXY_ERRORS, ids=lambda c: c.__name__)
def test_openai_error_body(cls: type[ProxyError]) -> None:
    error = make(cls)
    assert orjson.loads(error_body("openai", error)) == {
        "error": {
            "message": cls.message,
            "type": cls.error_type,
            "param": error.param,  # only ever one of our field names (retention_rules)
            "code": cls.code,
        }
    }


@pytest.mark.parametrize("cls", PROXY_ERRORS, ids=lambda c: c.__name__)
def test_anthropic_error_body(cls: type[ProxyError]) -> None:
    error = make(cls)
    body = error_body("anthropic", error)
    # Anthropic's format has no `param`: our fixed field name ends the message instead.
    message = cls.message if error.param is None else f"{cls.message} Field: {error.param}"
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": cls.error_type, "message": message},
    }
    assert b'"code"' not in body  # Anthropic errors have no code field


def test_error_bodies_are_exact_bytes() -> None:
    assert error_body("openai", MissingModel()) == (
        b'{"error":{"message":"The request body must name a model as a string in the '
        b'\'model\' field.","type":"invalid_request_error","param":null,'
        b'"code":"missing_model"}}'
    )
    assert error_body("anthropic", errors.UpstreamTimeout()) == (
        b'{"type":"error","error":{"type":"timeout_error",'
        b'"message":"The upstream did not answer in time."}}'
    )


@pytest.mark.parametrize("cls", PROXY_ERRORS, ids=lambda c: c.__name__)
def test_sse_error_events(cls: type[ProxyError]) -> None:
    error = make(cls)
    openai_event = sse_error_event("openai", error)
    assert openai_event == b"data: " + error_body("openai", error) + b"\n\n"
    anthropic_event = sse_error_event("anthropic", error)
    assert anthropic_event == b"event: error\ndata: " + error_body("anthropic", error) + b"\n\n"
    # Each is exactly one event, and its data line is the error document.
    for event in (openai_event, anthropic_event):
        assert event.count(b"\n\n") == 1 and event.endswith(b"\n\n")
        data = [line for line in event.split(b"\n") if line.startswith(b"data: ")]
        assert len(data) == 1
        orjson.loads(data[0][6:])


# --- parse_request ----------------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_parse_request_reads_model_stream_and_usage() -> None:
    parsed = parse_request(
        body(model="gpt-4o", stream=True, stream_options={"include_usage": True}, n=1)
    )
    assert parsed.model == "gpt-4o"
    assert parsed.stream is True
    assert parsed.client_wants_usage is True
    assert parsed.payload == {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
    }


@pytest.mark.parametrize("stream", [None, False, 1, "true", [True]])
def test_only_a_json_true_streams(stream: object) -> None:
    assert parse_request(body(model="m", stream=stream)).stream is False


@pytest.mark.parametrize(
    "options",
    [None, {}, {"include_usage": False}, {"include_usage": 1}, {"include_usage": "true"}, [True]],
)
def test_usage_is_wanted_only_when_include_usage_is_true(options: object) -> None:
    assert parse_request(body(model="m", stream_options=options)).client_wants_usage is False


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b'{"model": "m"',
        b"[]",
        b'[{"model": "m"}]',
        b'"m"',
        b"42",
        b"null",
        b'{"model": "m", "t": NaN}',
        b'{"model": "m", "t": Infinity}',
        b'{"model": "m", "t": -Infinity}',
        b'{"model": "m", "x": "\xff\xfe"}',
        b'{"model": "m"} trailing',
        b"[" * 100_000,
        b'{"a":' * 100_000,
    ],
    ids=lambda raw: repr(raw[:24]),
)
def test_malformed_bodies(raw: bytes) -> None:
    with pytest.raises(MalformedJSON) as caught:
        parse_request(raw)
    # The decode error (which holds the whole input in `.doc`) was dropped, not chained.
    assert caught.value.__context__ is None
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"messages": []},
        {"model": None},
        {"model": 5},
        {"model": True},
        {"model": ["m"]},
        {"model": {"id": "m"}},
        {"model": ""},
        {"model": "m" * 257},
    ],
    ids=repr,
)
def test_missing_or_bad_model(payload: dict[str, Any]) -> None:
    with pytest.raises(MissingModel) as caught:
        parse_request(json.dumps(payload).encode())
    assert caught.value.__context__ is None


def test_model_names_up_to_256_characters() -> None:
    assert parse_request(body(model="m" * 256)).model == "m" * 256
    assert parse_request(body(model="\u00e9" * 256)).model == "\u00e9" * 256


def test_duplicate_keys_the_last_wins() -> None:
    assert parse_request(b'{"model": "a", "model": "b"}').model == "b"


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_a_proxy_error(raw: bytes) -> None:
    try:
        parsed = parse_request(raw)
    except (MalformedJSON, MissingModel):
        return
    assert isinstance(parsed.payload, dict)
    assert isinstance(parsed.model, str) and 0 < len(parsed.model) <= 256


# --- UpstreamBodies ---------------------------------------------------------------------------


def bodies(
    raw: bytes, upstream_model: str | None = None, ask_usage: bool = False
) -> tuple[UpstreamBodies, ParsedRequest]:
    request = parse_request(raw)
    return UpstreamBodies(raw, request, upstream_model, ask_usage), request


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_untouched_body_is_the_clients_bytes(kind: str) -> None:
    raw = b'{"model":  "m",   "messages": [], "x": 1.50}'  # odd spacing survives
    b, _ = bodies(raw)
    assert b.for_upstream(kind, {}) is raw  # type: ignore[arg-type]


def test_usage_request_only_for_openai_upstreams() -> None:
    raw = body(model="m", stream=True)
    b, _ = bodies(raw, ask_usage=True)
    assert b.for_upstream("anthropic", {}) is raw
    assert orjson.loads(b.for_upstream("openai", {})) == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize("options", [{"continuous_usage_stats": True}, "junk", None])
def test_usage_request_keeps_other_stream_options(options: object) -> None:
    b, _ = bodies(body(model="m", stream_options=options), ask_usage=True)
    kept = options if isinstance(options, dict) else {}
    assert orjson.loads(b.for_upstream("openai", {}))["stream_options"] == {
        **kept,
        "include_usage": True,
    }


def test_upstream_model_and_overrides_are_applied() -> None:
    b, request = bodies(body(model="alias", store=True, messages=[]), upstream_model="real-1")
    sent = orjson.loads(b.for_upstream("openai", {"store": False, "metadata": {"a": "b"}}))
    assert sent == {"model": "real-1", "store": False, "messages": [], "metadata": {"a": "b"}}
    # The client's parsed request is not changed by a rewrite.
    assert request.payload == {"model": "alias", "store": True, "messages": []}


def test_upstream_model_wins_over_an_override() -> None:
    b, _ = bodies(body(model="alias"), upstream_model="real")
    assert orjson.loads(b.for_upstream("anthropic", {"model": "other"}))["model"] == "real"


def test_each_upstream_gets_its_own_rewrite() -> None:
    b, _ = bodies(body(model="m"), ask_usage=True)
    first = orjson.loads(b.for_upstream("openai", {"store": False}))
    second = orjson.loads(b.for_upstream("anthropic", {}))
    assert first == {"model": "m", "store": False, "stream_options": {"include_usage": True}}
    assert second == {"model": "m"}


def test_clear_drops_the_body_and_the_request() -> None:
    raw = body(model="m")
    b, _ = bodies(raw)
    b.clear()
    assert b.for_upstream("openai", {}) == b""
    with pytest.raises(AssertionError):
        b.for_upstream("openai", {"store": False})


# --- models list and credentials ----------------------------------------------------------------


def test_models_list() -> None:
    assert orjson.loads(models_list("openai", ["gpt-4o", "claude-x"])) == {
        "object": "list",
        "data": [
            {"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "zrproxy"},
            {"id": "claude-x", "object": "model", "created": 0, "owned_by": "zrproxy"},
        ],
    }
    assert orjson.loads(models_list("openai", [])) == {"object": "list", "data": []}
    created = "1970-01-01T00:00:00Z"
    assert orjson.loads(models_list("anthropic", ["claude-x"])) == {
        "data": [
            {"type": "model", "id": "claude-x", "display_name": "claude-x", "created_at": created}
        ],
        "has_more": False,
        "first_id": "claude-x",
        "last_id": "claude-x",
    }
    assert orjson.loads(models_list("anthropic", [])) == {
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
    assert orjson.loads(model_object("openai", "gpt-4o"))["id"] == "gpt-4o"


def test_auth_headers() -> None:
    assert auth_headers("openai", "sk-1") == {"Authorization": "Bearer sk-1"}
    assert auth_headers("anthropic", "sk-ant-1") == {"x-api-key": "sk-ant-1"}
    for kind in ("openai", "anthropic"):
        assert auth_headers(kind, None) == {}  # type: ignore[arg-type]
        assert auth_headers(kind, "") == {}  # type: ignore[arg-type]


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(
    extra=st.dictionaries(st.text(), _JSON_VALUES, max_size=4),
    before=st.sampled_from(["", " ", "\n\t"]),
    after=st.sampled_from(["", " ", "\r\n", " x", "{}", "\x00", ",", "\u00a0"]),
)
def test_the_fast_path_accepts_and_reads_exactly_what_json_loads_does(
    extra: dict[str, Any], before: str, after: str
) -> None:
    # parse_request scans a body opening with "{" itself: the verdict and the payload
    # must be the stdlib's own.
    raw = (before + json.dumps({**extra, "model": "m"}) + after).encode()
    try:
        expected = json.loads(raw)
    except ValueError:
        with pytest.raises(MalformedJSON):
            parse_request(raw)
        return
    assert parse_request(raw).payload == expected
