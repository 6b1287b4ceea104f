"""Which HTTP headers cross the proxy, in each direction.

The filters are frozensets built at import. Per request: one pass over each header
list, plus the names its Connection header lists, and a request id. Request headers are
filtered as the byte pairs llhttp gave our server, never decoded or copied into a
multidict.

Never copies a header value into anything but the outgoing request or response.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from multidict import CIMultiDictProxy

from zrproxy.ids import new_id

# Both directions pass an allowlist: a header nobody listed does not cross, whatever its
# name. A denylist let the operator's account state (openai-organization, openai-project,
# the shared x-ratelimit-* counters, anthropic-organization-id) reach every tenant, and a
# client's arbitrary X-* headers reach the provider.

# Client -> upstream: what the APIs read from a client. The upstream's own credentials
# (its kind's auth header), Accept-Encoding: identity (so the usage tap sees plain bytes)
# and our X-Request-Id are added by the upstream client on top of these.
REQUEST_ALLOWLIST = frozenset(
    {
        "content-type",
        "accept",
        "user-agent",
        "anthropic-version",
        "anthropic-beta",
        "openai-beta",
    }
)
_REQUEST_ALLOWED = frozenset(name.encode() for name in REQUEST_ALLOWLIST)

# Upstream -> client: what a client or SDK acts on. Framing (Content-Length,
# Transfer-Encoding) is recomputed by our server; streaming responses get SSE_FIELDS.
RESPONSE_ALLOWLIST = frozenset(
    {
        "content-type",
        "content-encoding",  # only if an upstream ignores our identity request
        "retry-after",
        "retry-after-ms",  # the OpenAI SDKs read it before retry-after
        "x-should-retry",  # both providers' SDKs obey it
        "openai-processing-ms",
    }
)
# The upstream's request id, which support tickets quote: OpenAI's x-request-id and
# Anthropic's request-id, returned under their own name so ours stays X-Request-Id.
UPSTREAM_REQUEST_IDS = frozenset({"x-request-id", "request-id"})
UPSTREAM_REQUEST_ID = "x-upstream-request-id"
_NO_BYTES: frozenset[bytes] = frozenset()


class RequestHeaders:
    """A request's header fields as llhttp gave them (name and value bytes), looked up
    case-insensitively. Values are decoded as aiohttp's server did (UTF-8, undecodable
    bytes kept as surrogates), so what the client sent is what goes upstream.

    `lowered` is the fields' names in lower case, in the same order (our server has them
    already: it looked at every name as it arrived); a lookup is then one list search in
    C instead of a lower-casing loop per lookup."""

    __slots__ = ("_lowered", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]], lowered: list[bytes] | None = None) -> None:
        self._raw = raw
        self._lowered = lowered if lowered is not None else [n.lower() for n, _ in raw]

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        lowered = self._lowered
        if key not in lowered:
            return default
        return self._raw[lowered.index(key)][1].decode("utf-8", "surrogateescape")

    def getall(self, name: str, default: Iterable[str] = ()) -> list[str]:
        key = name.lower().encode("latin-1")
        found = [
            v.decode("utf-8", "surrogateescape")
            for n, (_, v) in zip(self._lowered, self._raw, strict=True)
            if n == key
        ]
        return found or list(default)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name.lower().encode("latin-1") in self._lowered

    def items(self) -> Iterator[tuple[str, str]]:
        for n, v in self._raw:
            yield n.decode("latin-1"), v.decode("utf-8", "surrogateescape")

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        return self._raw

    @property
    def lowered(self) -> list[bytes]:
        return self._lowered

    def clear(self) -> None:
        self._raw.clear()
        self._lowered.clear()


# What `presented_key` and `request_id` read a request's headers through.
IncomingHeaders = RequestHeaders | CIMultiDictProxy[str]

REQUEST_ID = "X-Request-Id"
# A client-chosen id is passed through only if it is short and plain; anything else is
# replaced, so an id can never smuggle content into our logs or the upstream's.
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Streaming responses must not be buffered by anything between us and the client.
SSE_FIELDS = ((b"Cache-Control", b"no-cache"), (b"X-Accel-Buffering", b"no"))


def request_id(incoming: str | None) -> str:
    """The client's request id when it is well-formed, else a new random one."""
    if incoming is not None and _REQUEST_ID_OK.fullmatch(incoming):
        return incoming
    return new_id()


def upstream_request_fields(
    incoming: RequestHeaders, injected: tuple[tuple[bytes, bytes], ...]
) -> list[tuple[bytes, bytes]]:
    """The client's allowlisted fields, then the upstream's own (`injected`, which
    replace the client's of the same name)."""
    raw, lowered = incoming.raw, incoming.lowered
    hop = _NO_BYTES
    if b"connection" in lowered:
        for lower, (_, value) in zip(lowered, raw, strict=True):
            if lower == b"connection":
                hop = hop | {token.strip().lower() for token in value.split(b",")}
    replaced = {name.lower() for name, _ in injected}
    out = [
        field
        for lower, field in zip(lowered, raw, strict=True)
        # Exact names only: `Content_Type` is not `Content-Type` to us, but some servers
        # read underscores as dashes, so such spellings never pass.
        if lower in _REQUEST_ALLOWED and lower not in hop and lower not in replaced
    ]
    out.extend(injected)
    return out


_RESPONSE_ALLOWED = frozenset(name.encode() for name in RESPONSE_ALLOWLIST)
_UPSTREAM_REQUEST_IDS = frozenset(name.encode() for name in UPSTREAM_REQUEST_IDS)
_UPSTREAM_REQUEST_ID = UPSTREAM_REQUEST_ID.encode()
_REQUEST_ID = REQUEST_ID.encode()


def client_response_fields(
    upstream: list[tuple[bytes, bytes]], rid: str
) -> list[tuple[bytes, bytes]]:
    """The upstream's allowlisted fields (as its byte pairs), its request id renamed,
    plus our request id."""
    hop = _NO_BYTES
    for name, value in upstream:
        if name.lower() == b"connection":
            hop = hop | {token.strip().lower() for token in value.split(b",")}
    out: list[tuple[bytes, bytes]] = []
    for name, value in upstream:
        lower = name.lower()
        if lower in hop:
            continue
        if lower in _RESPONSE_ALLOWED:
            out.append((name, value))
        elif lower in _UPSTREAM_REQUEST_IDS:
            out.append((_UPSTREAM_REQUEST_ID, value))
    out.append((_REQUEST_ID, rid.encode("ascii")))
    return out
