"""Header filters in both directions, and the request id."""

from __future__ import annotations

import gzip
import re

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from zrproxy.headers import (
    REQUEST_ID,
    UPSTREAM_REQUEST_ID,
    RequestHeaders,
    client_response_fields,
    request_id,
    upstream_request_fields,
)
from zrproxy.usage import UsageTap


def proxy_of(items: list[tuple[str, str]]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


def client_response_headers(upstream: CIMultiDictProxy[str], rid: str) -> CIMultiDict[str]:
    """The response filter on the upstream's byte pairs, read back as text."""
    raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in upstream.items()]
    out = client_response_fields(raw, rid)
    return CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in out)


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], injected: dict[str, str]
) -> CIMultiDict[str]:
    """The request filter on the byte pairs our server hands it, read back as text."""
    raw = [(n.encode(), v.encode()) for n, v in incoming.items()]
    fields = tuple((n.encode(), v.encode()) for n, v in injected.items())
    out = upstream_request_fields(RequestHeaders(raw), fields)
    return CIMultiDict((n.decode(), v.decode()) for n, v in out)


HOP_BY_HOP = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
]
CLIENT_CREDENTIALS = [
    "Authorization",
    "X-Api-Key",
    "Cookie",
    "OpenAI-Organization",
    "OpenAI-Project",
    "Forwarded",
    "X-Forwarded-For",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Real-IP",
]


def test_request_drops_hop_by_hop_framing_and_credentials() -> None:
    dropped = [*HOP_BY_HOP, *CLIENT_CREDENTIALS, "Host", "Content-Length", "Expect"]
    kept = [
        ("Content-Type", "application/json"),
        ("Accept", "text/event-stream"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "a"),
        ("anthropic-beta", "b"),
        ("User-Agent", "sdk/1"),
    ]
    incoming = proxy_of([*((n, "secret-" + n) for n in dropped), *kept])
    # Case never matters.
    incoming = proxy_of([*incoming.items(), ("authorization", "Bearer x"), ("COOKIE", "c=1")])
    out = upstream_request_headers(incoming, {})
    assert list(out.items()) == kept
    assert not any("secret" in v for v in out.values())


def test_request_drops_headers_named_in_connection() -> None:
    # RFC 9110 7.6.1: what Connection lists is hop-by-hop for this message only.
    incoming = proxy_of(
        [
            ("Connection", "keep-alive, OpenAI-Beta"),
            ("connection", " anthropic-beta ,X-API-KEY"),
            ("OpenAI-Beta", "1"),
            ("anthropic-beta", "2"),
            ("Accept", "3"),
        ]
    )
    out = upstream_request_headers(incoming, {"x-api-key": "upstream-key"})
    assert list(out.items()) == [("Accept", "3"), ("x-api-key", "upstream-key")]


def test_response_drops_headers_named_in_connection() -> None:
    upstream = proxy_of(
        [("Connection", "Retry-After"), ("Retry-After", "1"), ("retry-after-ms", "2")]
    )
    out = client_response_headers(upstream, "rid")
    assert list(out.items()) == [("retry-after-ms", "2"), (REQUEST_ID, "rid")]


def test_request_asks_for_an_uncompressed_response() -> None:
    # The usage tap reads the response as it passes: a gzipped body hides the usage.
    incoming = proxy_of([("Accept-Encoding", "gzip, deflate, br"), ("Accept", "*/*")])
    out = upstream_request_headers(incoming, {})
    assert "accept-encoding" not in out
    assert out["Accept"] == "*/*"


def test_a_compressed_body_hides_usage_from_the_tap() -> None:
    # Why the header above must go: this is what the tap would see otherwise.
    body = b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}'
    tap = UsageTap()
    tap.feed(gzip.compress(body))
    assert (tap.tokens()["prompt"], tap.tokens()["completion"]) == (0, 0)
    tap.feed(body)
    assert (tap.tokens()["prompt"], tap.tokens()["completion"]) == (3, 4)


def test_injected_headers_override_client_ones() -> None:
    incoming = proxy_of(
        [
            ("anthropic-version", "2020-01-01"),
            ("Anthropic-Version", "2021-01-01"),
            ("Content-Type", "text/plain"),
            ("x-api-key", "client-key"),
        ]
    )
    injected = {"x-api-key": "upstream-key", "anthropic-version": "2023-06-01"}
    out = upstream_request_headers(incoming, injected)
    assert out.getall("anthropic-version") == ["2023-06-01"]
    assert out.getall("X-Api-Key") == ["upstream-key"]
    assert out["Content-Type"] == "text/plain"
    assert "client-key" not in out.values()


def test_injected_authorization_replaces_the_clients() -> None:
    incoming = proxy_of([("Authorization", "Bearer zr-client")])
    out = upstream_request_headers(incoming, {"Authorization": "Bearer sk-upstream"})
    assert out.getall("authorization") == ["Bearer sk-upstream"]


def test_response_filter() -> None:
    upstream = proxy_of(
        [
            *((n, "v") for n in HOP_BY_HOP),
            ("Set-Cookie", "session=abc"),
            ("set-cookie", "other=def"),
            ("Content-Length", "123"),
            ("Content-Type", "text/event-stream"),
            ("openai-processing-ms", "12"),
            ("x-ratelimit-remaining-requests", "99"),
            ("X-Request-Id", "req_upstream_1"),
        ]
    )
    out = client_response_headers(upstream, "ourid")
    assert list(out.items()) == [
        ("Content-Type", "text/event-stream"),
        ("openai-processing-ms", "12"),
        (UPSTREAM_REQUEST_ID, "req_upstream_1"),
        (REQUEST_ID, "ourid"),
    ]
    assert out.getall("x-request-id") == ["ourid"]
    assert "set-cookie" not in out and "content-length" not in out


def test_response_gets_our_request_id_without_an_upstream_one() -> None:
    out = client_response_headers(proxy_of([("Content-Type", "application/json")]), "rid-1")
    assert out.getall("X-Request-Id") == ["rid-1"]
    assert UPSTREAM_REQUEST_ID not in out


# --- request ids ----------------------------------------------------------------------

_ALLOWED = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_NEW_ID = re.compile(r"[0-9a-f]{32}")


def test_request_id_keeps_well_formed_ids() -> None:
    for rid in ["abc", "req_123", "a.b:c-d_e", "A" * 128, "0"]:
        assert request_id(rid) == rid


def test_request_id_replaces_missing_malformed_and_long_ids() -> None:
    for rid in [None, "", "A" * 129, "has space", "new\nline", "semi;colon", "é", "a/b"]:
        new = request_id(rid)
        assert _NEW_ID.fullmatch(new), rid
    assert request_id(None) != request_id(None)


@given(st.text(alphabet=st.sampled_from("abcXYZ019._:-"), min_size=1, max_size=128))
def test_any_allowed_id_is_kept(rid: str) -> None:
    assert request_id(rid) == rid


@given(st.text(max_size=200))
def test_any_other_text_is_replaced_by_32_hex(rid: str) -> None:
    new = request_id(rid)
    if _ALLOWED.fullmatch(rid):
        assert new == rid
    else:
        assert _NEW_ID.fullmatch(new)
        assert new != rid


@given(
    st.text(alphabet=st.sampled_from("abc019._:-"), max_size=60),
    st.text(min_size=1).filter(lambda s: not _ALLOWED.fullmatch(s)),
    st.text(alphabet=st.sampled_from("abc019._:-"), max_size=60),
)
def test_one_bad_character_anywhere_replaces_the_id(head: str, bad: str, tail: str) -> None:
    assert _NEW_ID.fullmatch(request_id(head + bad + tail))


def test_underscore_spellings_of_dropped_headers_are_dropped_too() -> None:
    incoming = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Transfer_Encoding", "chunked"),
                ("content_length", "5"),
                ("X_Api_Key", "client-key"),
                ("Content_Type", "text/plain"),
                ("Content-Type", "application/json"),
            ]
        )
    )
    out = upstream_request_headers(incoming, {})
    assert list(out.keys()) == ["Content-Type"]
