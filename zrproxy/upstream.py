"""Connections to upstreams: one pooled session each, and failover before the first byte.

Owns the client side of aiohttp. Foreign errors are translated here and dropped:
`repr()` of aiohttp client errors includes the request headers, i.e. our upstream key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import ClientResponse, ClientSession, ClientTimeout, DummyCookieJar, TCPConnector
from multidict import CIMultiDictProxy
from yarl import URL

from zrproxy.config import Config, UpstreamConfig
from zrproxy.dialects import ANTHROPIC_VERSION, ENDPOINTS, UpstreamBodies, auth_headers
from zrproxy.errors import UpstreamTimeout, UpstreamUnavailable, forget
from zrproxy.headers import upstream_request_headers

# How much of an upstream response aiohttp buffers before it stops reading the socket
# (it pauses at 2x this). Small, so a slow client holds little per stream; SSE events
# are far smaller than this, so it costs no extra reads.
READ_BUFSIZE = 16 * 1024
FailureKind = str  # one of metrics.UpstreamErrorKind; kept a plain str to stay a lower layer


@dataclass(slots=True)
class _Upstream:
    config: UpstreamConfig
    session: ClientSession
    injected_headers: dict[str, str]
    urls: dict[str, URL]


class Upstreams:
    """The pooled sessions of every configured upstream. Create inside the running loop."""

    def __init__(self, config: Config) -> None:
        server = config.server
        self._server = server
        self._by_name: dict[str, _Upstream] = {}
        for upstream in config.upstreams:
            session = ClientSession(
                connector=TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300),
                # total=None: completions may stream for many minutes; we keep our own
                # deadlines. sock_read covers the wait for response headers here and is
                # lowered to the idle timeout once they have arrived.
                timeout=ClientTimeout(
                    total=None,
                    sock_connect=server.connect_timeout_s,
                    sock_read=server.first_byte_timeout_s,
                ),
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
                cookie_jar=DummyCookieJar(),  # an upstream's cookies are state we don't keep
                trust_env=False,
                skip_auto_headers=("Accept-Encoding",),
            )
            # Uncompressed from the upstream, so usage can be read as the bytes pass.
            injected = {
                # The operator's header_overrides win over the client's headers (they are
                # set after filtering); config refuses overrides of the ones below.
                **upstream.header_overrides,
                **auth_headers(upstream.kind, upstream.api_key),
                "Accept-Encoding": "identity",
            }
            # Precomputed: a URL built per request would sit in yarl's caches.
            urls = {path: URL(upstream.base_url + path[3:]) for path in ENDPOINTS}
            self._by_name[upstream.name] = _Upstream(upstream, session, injected, urls)

    async def close(self) -> None:
        for upstream in self._by_name.values():
            await upstream.session.close()

    async def open(
        self,
        upstreams: tuple[UpstreamConfig, ...],
        path: str,
        incoming_headers: CIMultiDictProxy[str],
        request_id: str,
        bodies: UpstreamBodies,
        on_failure: Callable[[str, FailureKind], None],
    ) -> tuple[UpstreamConfig, ClientResponse]:
        """The first upstream response worth relaying, trying `upstreams` in order.

        Connect errors, timeouts before the response headers, 429 and 5xx move on to the
        next upstream (`on_failure(name, kind)` for every failed attempt). When all fail, the last
        upstream's own 429/5xx response is returned for relaying; without one, raises
        UpstreamTimeout or UpstreamUnavailable.
        """
        last_kind: FailureKind = "connect"
        for index, config in enumerate(upstreams):
            upstream = self._by_name[config.name]
            is_last = index == len(upstreams) - 1
            headers = upstream_request_headers(incoming_headers, upstream.injected_headers)
            headers["X-Request-Id"] = request_id
            if config.kind == "anthropic" and "anthropic-version" not in headers:
                headers["anthropic-version"] = ANTHROPIC_VERSION
            response: ClientResponse | None = None
            try:
                response = await upstream.session.post(
                    upstream.urls[path],
                    data=bodies.for_upstream(config.kind, config.overrides_for(path)),
                    headers=headers,
                    allow_redirects=False,  # a redirect target would be a new subprocessor
                )
            except TimeoutError as exc:
                forget(exc)
                last_kind = "timeout"
            except (aiohttp.ClientError, OSError) as exc:
                forget(exc)
                last_kind = "connect"
            if response is None:
                on_failure(config.name, last_kind)
                continue
            status = response.status
            if status == 429 or status >= 500:
                last_kind = "status_429" if status == 429 else "status_5xx"
                on_failure(config.name, last_kind)
                if is_last:
                    self._to_idle_timeout(response)
                    return config, response
                response.close()
                continue
            self._to_idle_timeout(response)
            return config, response
        if last_kind == "timeout":
            raise UpstreamTimeout()
        raise UpstreamUnavailable()

    def _to_idle_timeout(self, response: ClientResponse) -> None:
        # From here on the socket timeout means "silence between chunks".
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = self._server.idle_timeout_s
            connection.protocol.start_timeout()
