"""Which HTTP headers cross the proxy, in each direction. Precomputed, no per-request work.

Never copies a header value into anything but the outgoing request or response.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict, CIMultiDictProxy

from zrproxy.ids import new_id

# RFC 9110 7.6.1 hop-by-hop headers, plus the framing headers aiohttp recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_FRAMING = frozenset({"content-length", "host", "expect"})

# The client's credentials and identity never reach the upstream: we inject our own key.
_CLIENT_CREDENTIALS = frozenset(
    {
        "authorization",
        "x-api-key",
        "cookie",
        "openai-organization",
        "openai-project",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
# The usage tap reads response bytes as they pass, so they must arrive uncompressed
# (SDKs send Accept-Encoding: gzip; a gzipped body would count zero tokens): upstreams
# are asked for identity instead. aiohttp's server has already decompressed a request
# body sent with Content-Encoding, so that header no longer describes what we forward.
_ENCODING = frozenset({"accept-encoding", "content-encoding"})
DROP_FROM_REQUEST = HOP_BY_HOP | _FRAMING | _CLIENT_CREDENTIALS | _ENCODING

# The upstream's cookies and its own request id do not reach the client: the client gets
# ours (the upstream's is renamed so support tickets can still quote it).
DROP_FROM_RESPONSE = HOP_BY_HOP | frozenset({"content-length", "set-cookie", "x-request-id"})
UPSTREAM_REQUEST_ID = "x-upstream-request-id"

REQUEST_ID = "X-Request-Id"
# A client-chosen id is passed through only if it is short and plain; anything else is
# replaced, so an id can never smuggle content into our logs or the upstream's.
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Streaming responses must not be buffered by anything between us and the client.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def request_id(incoming: str | None) -> str:
    """The client's request id when it is well-formed, else a new random one."""
    if incoming is not None and _REQUEST_ID_OK.fullmatch(incoming):
        return incoming
    return new_id()


def _connection_named(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> frozenset[str]:
    """`drop` plus the headers this message's Connection lists (hop-by-hop, RFC 9110 7.6.1)."""
    listed = headers.getall("Connection", ())
    if not listed:
        return drop
    return drop | {token.strip().lower() for value in listed for token in value.split(",")}


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], injected: dict[str, str]
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and credentials, plus the upstream's own headers."""
    out: CIMultiDict[str] = CIMultiDict()
    drop = _connection_named(incoming, DROP_FROM_REQUEST)
    for name, value in incoming.items():
        # `Transfer_Encoding` is not a framing header to us, but some servers read
        # underscores as dashes: a request-smuggling vector. Such names are dropped.
        lower = name.lower()
        if lower not in drop and lower.replace("_", "-") not in drop:
            out.add(name, value)
    for name, value in injected.items():
        out[name] = value
    return out


def client_response_headers(upstream: CIMultiDictProxy[str], rid: str) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop and cookies, plus our request id."""
    out: CIMultiDict[str] = CIMultiDict()
    drop = _connection_named(upstream, DROP_FROM_RESPONSE)
    for name, value in upstream.items():
        lower = name.lower()
        if lower == "x-request-id":
            out.add(UPSTREAM_REQUEST_ID, value)
        elif lower not in drop:
            out.add(name, value)
    out[REQUEST_ID] = rid
    return out
