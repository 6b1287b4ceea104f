"""Requests to upstreams: one connection pool each, and failover before the first byte.

Owns the request side of HTTP/1.1 to upstreams (`http1` owns the response side, `exchange`
what the handler sees of it). Foreign errors (connect failures, TLS errors) are dropped
where they are caught: their text names only our own configured hosts, but their
tracebacks hold the frames that held the request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from zrproxy.config import Config, UpstreamConfig
from zrproxy.deadlines import Deadlines
from zrproxy.dialects import ANTHROPIC_VERSION, UpstreamBodies, auth_headers, names_a_model
from zrproxy.errors import (
    InvalidRequest,
    UpstreamAuthFailed,
    UpstreamNotFound,
    UpstreamTimeout,
    UpstreamUnavailable,
    forget,
)
from zrproxy.exchange import Exchange
from zrproxy.headers import RequestHeaders, upstream_request_fields
from zrproxy.listener import fd_connection_cap
from zrproxy.outcomes import FailureKind
from zrproxy.pool import Budget, EgressRefused, Pool, PoolTimeout

# How long an idle pooled connection is kept (aiohttp's connector used the same).
KEEPALIVE_S = 30.0
# A provider's error document is small; a 404 body larger than this is no API's answer.
_MAX_404_BODY = 64 * 1024
# What the operator is told once per upstream (zrproxy.upstream_health), fixed texts.
NOT_FOUND_REASON = (
    "answered 404 for the endpoint path (the provider's unknown-URL answer): check its base_url"
)
# (upstream, kind, reason) for every failed attempt; reason is a fixed text or None.
OnFailure = Callable[[str, FailureKind, str | None], None]
_FORBIDDEN_IN_HEAD = ("\r", "\n", "\0")
_ANTHROPIC_VERSION = b"anthropic-version: %b\r\n" % ANTHROPIC_VERSION.encode()


@dataclass(slots=True)
class _Upstream:
    config: UpstreamConfig
    pool: Pool
    injected_headers: tuple[tuple[bytes, bytes], ...]
    # Per endpoint: the request line and Host header, precomputed (Azure: per endpoint
    # and listed deployment; `azure_line` builds the others).
    request_lines: dict[str, bytes]
    host_header: str = ""


def azure_target(base_path: str, path: str, deployment: str, api_version: str) -> str:
    """The request target on Azure OpenAI for the client endpoint `path`:
    /openai/deployments/{deployment}/chat/completions?api-version=... (the one query
    string the proxy ever sends; a client's is never forwarded). The deployment is one
    percent-encoded path segment whatever the model id it came from."""
    segment = quote(deployment, safe="")
    if segment in (".", ".."):  # a dot-segment would climb out of /deployments/
        segment = segment.replace(".", "%2E")
    return f"{base_path}/openai/deployments/{segment}{path[3:]}?api-version={api_version}"


def _line(target: str, host_header: str) -> bytes:
    return f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\n".encode()


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

    def __init__(self, config: Config, connection_budget: int | None = None) -> None:
        """`connection_budget`: upstream connections of all pools together (default: as
        many as the API listener's fd-fitted connection cap, one per client connection)."""
        self._loop = asyncio.get_running_loop()
        # The exchanges' deadlines, and (Proxy) the requests': one loop timer for all.
        self.deadlines = Deadlines(self._loop)
        budget = Budget(connection_budget or fd_connection_cap())
        server = config.server
        self._first_byte_timeout = server.first_byte_timeout_s
        self._idle_timeout = server.idle_timeout_s
        self._max_event = server.max_event_bytes
        self._by_name: dict[str, _Upstream] = {}
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
                # Credentials go with the proxy they were configured for.
                egress_auth=(
                    upstream.egress_proxy_auth
                    if upstream.egress_proxy is not None
                    else server.egress_proxy_auth
                ),
                budget=budget,
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
            if upstream.kind == "azure_openai":
                assert upstream.api_version is not None  # config requires it
                lines = {
                    f"{path} {deployment}": _line(
                        azure_target(url.path, path, deployment, upstream.api_version),
                        host_header,
                    )
                    for path in upstream.endpoints
                    for deployment in upstream.deployments.values()
                }
            else:
                lines = {
                    path: _line(f"{url.path}{path[3:]}", host_header) for path in upstream.endpoints
                }
            fields = tuple(
                (n.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                for n, v in injected.items()
            )
            self._by_name[upstream.name] = _Upstream(upstream, pool, fields, lines, host_header)

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
        on_failure: OnFailure,
    ) -> tuple[UpstreamConfig, Exchange]:
        """The first upstream response worth relaying, trying `upstreams` in order; its
        head has arrived, its body is still to be relayed.

        Connect errors, a full pool (after pool_timeout_s), timeouts and broken responses
        before the head, 401/403 (our key refused), the provider's unknown-URL 404 (a wrong
        base_url; a 404 about a model is relayed), 429 and 5xx move on to the next
        upstream (`on_failure(name, kind, reason)` for every failed attempt). A request is sent to
        one upstream at most once: a pooled connection found closed before a byte of the
        request was written is replaced by a fresh one (once, not counted as a failure);
        once written, a connection that dies without a response byte is that upstream's
        failure ("reset"), and the request moves on, never resent where it may have run
        (a second LLM call costs twice, and may run its tools twice). When all fail, the last
        upstream's own 429/5xx response is returned for relaying; without one, raises
        UpstreamTimeout, UpstreamAuthFailed (the last refused our key), UpstreamNotFound
        (the last had no such path) or UpstreamUnavailable.
        """
        last_kind: FailureKind = "connect"
        for index, config in enumerate(upstreams):
            upstream = self._by_name[config.name]
            is_last = index == len(upstreams) - 1
            body = bodies.for_upstream(config.kind, config.overrides_for(path))
            line = self._request_line(upstream, path, bodies)
            head = self._head(upstream, line, incoming_headers, request_id, len(body))
            exchange, kind, reason = await self._attempt(upstream, head, body)
            if exchange is None or kind is not None:
                last_kind = kind or "connect"
                on_failure(config.name, last_kind, reason)
                continue
            status = exchange.status
            if status in (401, 403):
                # Our provider key was refused (expired, revoked, wrong): fail over like a
                # 5xx; never relay the provider's body, which names the operator's key.
                last_kind = "auth"
                on_failure(config.name, last_kind, None)
                exchange.abandon()
                continue
            if status == 404 and await self._unknown_url(config, exchange):
                # The path is not on that server: our base_url, not the client's request.
                # Never relayed: OpenAI's answer quotes our upstream request line.
                last_kind = "not_found"
                on_failure(config.name, last_kind, NOT_FOUND_REASON)
                exchange.abandon()
                continue
            if status == 429 or status >= 500:
                last_kind = "status_429" if status == 429 else "status_5xx"
                on_failure(config.name, last_kind, None)
                if is_last:
                    return config, exchange
                exchange.abandon()
                continue
            return config, exchange
        if last_kind == "timeout":
            raise UpstreamTimeout()
        if last_kind == "auth":
            raise UpstreamAuthFailed()
        if last_kind == "not_found":
            raise UpstreamNotFound()
        raise UpstreamUnavailable()

    async def _unknown_url(self, config: UpstreamConfig, exchange: Exchange) -> bool:
        """Whether a 404 means the endpoint is not at base_url (the provider's unknown-URL
        answer, or anything but its model-not-found one): its (small) body is read whole
        first, within idle_timeout_s, and stays in the exchange for relaying when the 404
        is about the model."""
        try:
            async with asyncio.timeout(self._idle_timeout):
                while not exchange.finished and exchange.early_size <= _MAX_404_BODY:
                    await exchange.wait()
        except TimeoutError:
            return True  # a body that does not end is no API's error document
        except BaseException:
            exchange.abandon()
            raise
        if exchange.failure is not None or exchange.early_size > _MAX_404_BODY:
            return True  # cut short, or too large for an API's error document
        return not names_a_model(config.kind, exchange.peek_early())

    async def _attempt(
        self, upstream: _Upstream, head: bytes, body: bytes
    ) -> tuple[Exchange | None, FailureKind | None, str | None]:
        fresh = False
        while True:
            try:
                conn = await upstream.pool.acquire(fresh)
            except PoolTimeout:
                return None, "connect", None  # like a refused connection: fail over
            except TimeoutError as exc:
                forget(exc)
                return None, "timeout", None
            except ssl.SSLError as exc:
                # A certificate the upstream's name or our CAs don't vouch for, or a
                # handshake it refused: logged once per reason (the library's fixed text).
                why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
                forget(exc)
                return None, "tls", f"TLS failed ({why or 'handshake failed'})"
            except EgressRefused as exc:
                reason = exc.reason  # our fixed text with the proxy's status code
                forget(exc)
                return None, "connect", reason
            except OSError as exc:  # refused, unreachable
                forget(exc)
                return None, "connect", None
            exchange = Exchange(self._max_event)
            conn.start(exchange, head, body, False, self._loop.time())
            exchange.arm(self.deadlines, self._first_byte_timeout, self._idle_timeout)
            try:
                while not exchange.has_head and exchange.failure is None:
                    await exchange.wait()
            except BaseException:
                exchange.abandon()  # client gone or deadline: the connection can't be reused
                raise
            if exchange.failure is None:
                return exchange, None, None
            if exchange.stale and not fresh:
                fresh = True
                continue
            return None, exchange.failure, None

    @staticmethod
    def _request_line(upstream: _Upstream, path: str, bodies: UpstreamBodies) -> bytes:
        config = upstream.config
        if config.kind != "azure_openai":
            return upstream.request_lines[path]
        # The model's listed deployment, else the deployment named like the model.
        model = bodies.model
        deployment = config.deployments.get(model, model)
        line = upstream.request_lines.get(f"{path} {deployment}")
        if line is not None:
            return line
        assert config.api_version is not None
        base_path = urlsplit(config.base_url).path
        target = azure_target(base_path, path, deployment, config.api_version)
        return _line(target, upstream.host_header)

    def _head(
        self,
        upstream: _Upstream,
        request_line: bytes,
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
            request_line,
            block,
            body_size,
        )
