"""Requests to upstreams: one connection pool each, and failover before the first byte.

Owns the request side of HTTP/1.1 to upstreams (`http1` owns the response side). Foreign
errors (connect failures, TLS errors) are dropped where they are caught: their text names
only our own configured hosts, but their tracebacks hold the frames that held the request.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from zrproxy.config import Config, UpstreamConfig
from zrproxy.dialects import ANTHROPIC_VERSION, ENDPOINTS, UpstreamBodies, auth_headers
from zrproxy.errors import (
    InvalidRequest,
    UpstreamAuthFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
    forget,
)
from zrproxy.headers import RequestHeaders, upstream_request_fields
from zrproxy.http1 import Exchange
from zrproxy.outcomes import FailureKind
from zrproxy.pool import Pool, PoolTimeout

# How long an idle pooled connection is kept (aiohttp's connector used the same).
KEEPALIVE_S = 30.0
_FORBIDDEN_IN_HEAD = ("\r", "\n", "\0")
_ANTHROPIC_VERSION = b"anthropic-version: %b\r\n" % ANTHROPIC_VERSION.encode()


@dataclass(slots=True)
class _Upstream:
    config: UpstreamConfig
    pool: Pool
    injected_headers: tuple[tuple[bytes, bytes], ...]
    # Per endpoint: the request line and Host header, precomputed.
    request_lines: dict[str, bytes]


log = logging.getLogger("zrproxy.upstreams")


def _host_port(proxy_url: str | None) -> tuple[str, int] | None:
    """HOST and PORT of an "http://HOST:PORT" egress proxy (config checked the form)."""
    if proxy_url is None:
        return None
    host, _, port = proxy_url.removeprefix("http://").rpartition(":")
    return host, int(port)


def tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The one SSLContext of an https upstream, or None for http. Verification is always
    on: `ca_file` replaces the system's CAs (a private model server's), and a client
    certificate is presented when `client_cert_file`/`client_key_file` are set (mTLS)."""
    if not config.base_url.startswith("https://"):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.ca_file)
    if config.client_cert_file is not None:
        context.load_cert_chain(config.client_cert_file, config.client_key_file)
    return context


class Upstreams:
    """The connection pools of every configured upstream. Create inside the running loop."""

    def __init__(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        server = config.server
        self._first_byte_timeout = server.first_byte_timeout_s
        self._idle_timeout = server.idle_timeout_s
        self._by_name: dict[str, _Upstream] = {}
        self._tls_reasons: set[tuple[str, str]] = set()
        for upstream in config.upstreams:
            url = urlsplit(upstream.base_url)
            https = url.scheme == "https"
            host = url.hostname or ""
            port = url.port or (443 if https else 80)
            default_port = (https and port == 443) or (not https and port == 80)
            host_header = url.netloc if not default_port else host
            if ":" in host and not host_header.startswith("["):  # IPv6 literal
                host_header = f"[{host}]" if default_port else f"[{host}]:{port}"
            pool = Pool(
                host,
                port,
                tls_context(upstream),
                max_connections=upstream.max_connections,
                pool_timeout_s=upstream.pool_timeout_s,
                connect_timeout_s=server.connect_timeout_s,
                keepalive_s=KEEPALIVE_S,
                egress_proxy=_host_port(upstream.egress_proxy or server.egress_proxy),
            )
            # Uncompressed from the upstream, so usage can be read as the bytes pass.
            injected = {
                # The operator's header_overrides win over the client's headers (they are
                # set after filtering); config refuses overrides of the ones below.
                **upstream.header_overrides,
                **auth_headers(upstream.kind, upstream.api_key),
                "Accept-Encoding": "identity",
            }
            for name, value in injected.items():
                if any(c in name or c in value for c in _FORBIDDEN_IN_HEAD):
                    raise ValueError("upstream header with a line break")  # config checks keys
            lines = {
                path: f"POST {url.path}{path[3:]} HTTP/1.1\r\nHost: {host_header}\r\n".encode()
                for path in ENDPOINTS
            }
            fields = tuple(
                (n.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                for n, v in injected.items()
            )
            self._by_name[upstream.name] = _Upstream(upstream, pool, fields, lines)

    def pool(self, name: str) -> Pool:
        return self._by_name[name].pool

    async def close(self) -> None:
        for upstream in self._by_name.values():
            upstream.pool.close()
        await asyncio.sleep(0)  # let the transports report their close

    async def open(
        self,
        upstreams: tuple[UpstreamConfig, ...],
        path: str,
        incoming_headers: RequestHeaders,
        request_id: str,
        bodies: UpstreamBodies,
        on_failure: Callable[[str, FailureKind], None],
    ) -> tuple[UpstreamConfig, Exchange]:
        """The first upstream response worth relaying, trying `upstreams` in order; its
        head has arrived, its body is still to be relayed.

        Connect errors, a full pool (after pool_timeout_s), timeouts and broken responses
        before the head, 401/403 (our key refused), 429 and 5xx move on to the next
        upstream (`on_failure(name, kind)` for every failed attempt). A pooled connection
        the upstream had closed while idle (reset or EOF before any response byte) gets
        one retry on a fresh connection, not counted as a failure. When all fail, the last
        upstream's own 429/5xx response is returned for relaying; without one, raises
        UpstreamTimeout, UpstreamAuthFailed (the last refused our key) or
        UpstreamUnavailable.
        """
        last_kind: FailureKind = "connect"
        for index, config in enumerate(upstreams):
            upstream = self._by_name[config.name]
            is_last = index == len(upstreams) - 1
            body = bodies.for_upstream(config.kind, config.overrides_for(path))
            head = self._head(upstream, path, incoming_headers, request_id, len(body))
            exchange, kind = await self._attempt(upstream, head, body)
            if exchange is None or kind is not None:
                last_kind = kind or "connect"
                on_failure(config.name, last_kind)
                continue
            status = exchange.status
            if status in (401, 403):
                # Our provider key was refused (expired, revoked, wrong): fail over like a
                # 5xx; never relay the provider's body, which names the operator's key.
                last_kind = "auth"
                on_failure(config.name, last_kind)
                exchange.abandon()
                continue
            if status == 429 or status >= 500:
                last_kind = "status_429" if status == 429 else "status_5xx"
                on_failure(config.name, last_kind)
                if is_last:
                    return config, exchange
                exchange.abandon()
                continue
            return config, exchange
        if last_kind == "timeout":
            raise UpstreamTimeout()
        if last_kind == "auth":
            raise UpstreamAuthFailed()
        raise UpstreamUnavailable()

    async def _attempt(
        self, upstream: _Upstream, head: bytes, body: bytes
    ) -> tuple[Exchange | None, FailureKind | None]:
        fresh = False
        while True:
            try:
                conn = await upstream.pool.acquire(fresh)
            except PoolTimeout:
                return None, "connect"  # like a refused connection: fail over
            except TimeoutError as exc:
                forget(exc)
                return None, "timeout"
            except ssl.SSLError as exc:
                # A certificate the upstream's name or our CAs don't vouch for, or a
                # handshake it refused: logged once per reason (the library's fixed text).
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
                forget(exc)
                self._tls_failed(upstream.config.name, str(reason or "handshake failed"))
                return None, "tls"
            except OSError as exc:  # refused, unreachable
                forget(exc)
                return None, "connect"
            exchange = Exchange()
            conn.start(exchange, head, body, False, self._loop.time())
            exchange.arm(self._loop, self._first_byte_timeout, self._idle_timeout)
            try:
                while not exchange.has_head and exchange.failure is None:
                    await exchange.wait()
            except BaseException:
                exchange.abandon()  # client gone or deadline: the connection can't be reused
                raise
            if exchange.failure is None:
                return exchange, None
            if exchange.stale and not fresh:
                fresh = True
                continue
            return None, exchange.failure

    def _tls_failed(self, upstream: str, reason: str) -> None:
        if (upstream, reason) not in self._tls_reasons:
            self._tls_reasons.add((upstream, reason))
            log.warning("upstream %s: TLS failed (%s)", upstream, reason)

    def _head(
        self,
        upstream: _Upstream,
        path: str,
        incoming: RequestHeaders,
        rid: str,
        body_size: int,
    ) -> bytes:
        fields = upstream_request_fields(incoming, upstream.injected_headers)
        lines = [b"%b: %b\r\n" % field for field in fields]
        lines.append(b"X-Request-Id: %b\r\n" % rid.encode("ascii"))
        if upstream.config.kind == "anthropic" and not any(
            name.lower() == b"anthropic-version" for name, _ in fields
        ):
            lines.append(_ANTHROPIC_VERSION)
        block = b"".join(lines)
        # Our server's parser (llhttp) refuses line breaks in header fields; a field that
        # still had one would let a client write its own request line upstream.
        if block.count(b"\n") != len(lines) or block.count(b"\r") != len(lines) or b"\0" in block:
            raise InvalidRequest()
        return b"%b%bContent-Length: %d\r\n\r\n" % (
            upstream.request_lines[path],
            block,
            body_size,
        )
