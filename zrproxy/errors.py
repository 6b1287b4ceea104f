"""The error hierarchy: every error a client or operator can see, with fixed messages.

Never put request or response content into one of these: messages are class constants,
and the only variable parts are names taken from the config (key paths, upstream names).

    ZrproxyError
    ├── ConfigError(key_path, problem)      operator mistake, exit 2
    │   └── ConfigErrors(errors)            several of them, all found in one pass
    ├── StartupError(message)               the process cannot start as configured
    └── ProxyError                          rendered to the client by `dialects`
        ├── MalformedJSON            400
        ├── MissingModel             400
        ├── InvalidRequest           400
        ├── MalformedHttp            400 HTTP our server's parser refused (before any handler)
        ├── ZeroRetentionConflict    400 names a fixed field from retention_rules
        ├── UnsupportedEndpoint      400
        ├── InvalidAuth              401
        ├── ModelNotAllowed          403
        ├── NoUpstreamInRegion       403
        ├── ZeroRetentionUnavailable 403
        ├── UpstreamNotYetActive     403
        ├── NotFound                 404
        │   ├── UnknownPath          404
        │   └── ModelNotFound        404
        ├── StoringEndpoint          404
        ├── MethodNotAllowed         405
        ├── BodyTimeout              408
        │   └── BodyTooSlow          408 a gap between body reads past idle_timeout_s
        ├── HeadTimeout              408 the request head did not arrive in time
        ├── BodyTooLarge             413
        ├── UriTooLong               414
        ├── HeadTooLarge             431 over a header size or count limit
        ├── TransferCodingNotImplemented 501 a transfer coding other than plain chunked
        ├── RateLimited              429 a project's limit; carries Retry-After
        ├── UpstreamUnavailable      502
        ├── UpstreamAuthFailed       502 every upstream refused our provider key (401/403)
        ├── UpstreamNotFound         502 every upstream said the endpoint is not at base_url
        ├── UpstreamRedirected       502
        ├── UpstreamFailedMidStream  502 after the first byte: an SSE error event or a cut
        ├── InternalError            500 a bug: the handler raised
        ├── ServiceDraining          503
        ├── Overloaded               503 a global cap or the body budget; carries Retry-After
        └── UpstreamTimeout          504
"""

from __future__ import annotations

import traceback
from typing import ClassVar, Literal

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "api_error",
    "overloaded_error",
    "timeout_error",
    "rate_limit_error",
]
RejectReason = Literal[
    "auth",
    "model",
    "size",
    "malformed",
    "not_found",
    "method",
    "draining",
    "region",
    "endpoint",
    "zero_retention",
    "not_active",
    "overloaded",
    "rate_limit",
]
# Failures blamed on the client (zrproxy_client_errors_total{kind}).
ClientErrorKind = Literal["slow_body", "body_timeout", "slow_read"]


class ZrproxyError(Exception):
    """Base of everything zrproxy raises on purpose."""


class ConfigError(ZrproxyError):
    """A config mistake: names the key path and what is wrong with it (never its value)."""

    def __init__(self, key_path: str, problem: str) -> None:
        super().__init__(f"{key_path}: {problem}")
        self.key_path = key_path
        self.problem = problem


class ConfigErrors(ConfigError):
    """Several config mistakes, all reported at once; `key_path`/`problem` are the first's."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__(errors[0].key_path, errors[0].problem)
        self.errors = tuple(errors)
        self.args = ("\n".join(str(e) for e in errors),)


class StartupError(ZrproxyError):
    """The process cannot start as configured (bind failure, mlock refused, ...)."""


class ProxyError(ZrproxyError):
    """An error answered to the client. Subclasses fix status, type, code and message."""

    status: ClassVar[int] = 500
    error_type: ClassVar[ErrorType] = "api_error"
    code: ClassVar[str] = "internal_error"
    message: ClassVar[str] = "Internal proxy error."
    # The zrproxy_rejections_total reason this counts under; None: not a rejection by the
    # proxy but an upstream-side failure (counted in zrproxy_upstream_errors_total).
    reject_reason: ClassVar[RejectReason | None] = None
    # The zrproxy_client_errors_total kind this counts under; None: not the client's fault.
    client_error: ClassVar[ClientErrorKind | None] = None
    # The request field at fault, in OpenAI's `param`; always a fixed string of ours.
    param: str | None = None

    def __init__(self, retry_after_s: int | None = None) -> None:
        super().__init__(self.message)
        # Sent as Retry-After: a whole number of seconds, never anything from the request.
        self.retry_after_s = retry_after_s

    def response_headers(self) -> dict[str, str]:
        """Headers HTTP asks for with this status (fixed values or config names only)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}


class MalformedJSON(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_json"
    message = "The request body is not a valid JSON object."
    reject_reason = "malformed"


class MissingModel(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    code = "missing_model"
    message = "The request body must name a model as a string in the 'model' field."
    reject_reason = "malformed"


class InvalidRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"
    message = "The request could not be read."
    reject_reason = "malformed"


class MalformedHttp(ProxyError):
    status = 400
    error_type = "invalid_request_error"
    code = "bad_http_request"
    message = "Malformed HTTP request."
    reject_reason = "malformed"


class HeadTimeout(ProxyError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    message = "The request headers did not arrive in time."


class UriTooLong(ProxyError):
    status = 414
    error_type = "invalid_request_error"
    code = "uri_too_long"
    message = "The request line exceeds the configured limit."
    reject_reason = "malformed"


class TransferCodingNotImplemented(ProxyError):
    # RFC 9112 6.1: a server that receives a transfer coding it does not understand
    # should answer 501 (nginx does). We decode only plain `chunked`.
    status = 501
    error_type = "invalid_request_error"
    code = "unsupported_transfer_coding"
    message = (
        "Only the chunked transfer coding is supported;"
        " send the body with Content-Length or plain chunked."
    )
    reject_reason = "malformed"


class HeadTooLarge(ProxyError):
    status = 431
    error_type = "invalid_request_error"
    code = "request_header_fields_too_large"
    message = "The request headers exceed the configured limits."
    reject_reason = "malformed"


class InternalError(ProxyError):
    """What the client sees when a handler raised something that is not a ProxyError."""


class InvalidAuth(ProxyError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"
    message = "Missing or invalid API key."
    reject_reason = "auth"


class ModelNotAllowed(ProxyError):
    status = 403
    error_type = "permission_error"
    code = "model_not_allowed"
    message = "This project may not use the requested model."
    reject_reason = "model"


class NotFound(ProxyError):
    status = 404
    error_type = "not_found_error"
    code = "not_found"
    message = "Unknown path or model route."
    reject_reason = "not_found"


class UnknownPath(NotFound):
    code = "unknown_path"
    message = "This path is not proxied."


class ModelNotFound(NotFound):
    code = "model_not_found"
    message = "No route serves the requested model."


class UnsupportedEndpoint(ProxyError):
    """The model's upstreams speak another API (e.g. /v1/messages to an OpenAI upstream)."""

    status = 400
    error_type = "invalid_request_error"
    code = "unsupported_endpoint_for_model"
    message = "The requested model is not served on this endpoint."
    reject_reason = "endpoint"


class MethodNotAllowed(ProxyError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"
    message = "This method is not allowed on this path."
    reject_reason = "method"

    def __init__(self, allow: str) -> None:
        super().__init__()
        self.allow = allow  # our own method list, e.g. "POST"

    def response_headers(self) -> dict[str, str]:
        return {**super().response_headers(), "Allow": self.allow}


class BodyTimeout(ProxyError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    message = "The request body did not arrive in time."
    reject_reason = "malformed"
    client_error: ClassVar[ClientErrorKind | None] = "body_timeout"


class BodyTooSlow(BodyTimeout):
    message = "The request body stalled."
    client_error = "slow_body"


class BodyTooLarge(ProxyError):
    status = 413
    error_type = "request_too_large"
    code = "request_too_large"
    message = "The request body exceeds the configured size limit."
    reject_reason = "size"


class RateLimited(ProxyError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    message = "The project's rate limit was reached; retry after the time in Retry-After."
    reject_reason = "rate_limit"


class UpstreamUnavailable(ProxyError):
    status = 502
    error_type = "api_error"
    code = "upstream_unavailable"
    message = "No upstream could serve the request."


class UpstreamAuthFailed(ProxyError):
    """Every upstream refused our provider key (401/403): the operator's fault, never the
    client's, and never the provider's body (it names the operator's masked key)."""

    status = 502
    error_type = "api_error"
    code = "upstream_auth_failed"
    message = "The upstream refused the proxy's credentials."


class UpstreamNotFound(ProxyError):
    """Every upstream answered its "unknown URL" 404: the endpoint is not where base_url
    says (the operator's config), never the client's fault, and the provider's body (it
    quotes our upstream request line) is not relayed."""

    status = 502
    error_type = "api_error"
    code = "upstream_not_found"
    message = "The upstream does not serve this endpoint at its configured address."


class UpstreamFailedMidStream(ProxyError):
    status = 502
    error_type = "api_error"
    code = "upstream_stream_error"
    message = "The upstream failed while streaming the response."


class ServiceDraining(ProxyError):
    status = 503
    error_type = "overloaded_error"
    code = "draining"
    message = "The proxy is shutting down; retry on another instance."
    reject_reason = "draining"


class Overloaded(ProxyError):
    status = 503
    error_type = "overloaded_error"
    code = "overloaded"
    message = "The proxy is at capacity; retry after the time in Retry-After."
    reject_reason = "overloaded"


class NoUpstreamInRegion(ProxyError):
    # Permanent for this project, so 4xx: a 503 would make the SDKs retry it.
    status = 403
    error_type = "permission_error"
    code = "no_upstream_in_region"
    message = "No upstream for this model is allowed in the project's regions."
    reject_reason = "region"


class ZeroRetentionConflict(ProxyError):
    """The request needs state kept at the provider, which a zero-retention project
    may not have. `param` is a field name from `retention_rules.RULES`, never input."""

    status = 400
    error_type = "invalid_request_error"
    code = "zero_retention_conflict"
    message = (
        "This project has zero retention, and the request asks the provider to keep "
        "state (see field)."
    )
    reject_reason = "zero_retention"

    def __init__(self, param: str) -> None:
        super().__init__()
        self.param = param


class ZeroRetentionUnavailable(ProxyError):
    status = 403
    error_type = "permission_error"
    code = "zero_retention_unavailable"
    message = (
        "This project has zero retention, and no upstream of this model with "
        "zero_data_retention = true serves its regions."
    )
    reject_reason = "zero_retention"


class StoringEndpoint(ProxyError):
    status = 404
    error_type = "not_found_error"
    code = "storing_endpoint_not_proxied"
    message = "This endpoint keeps data at the provider; zrproxy does not proxy it."
    reject_reason = "not_found"


class UpstreamNotYetActive(ProxyError):
    # A policy refusal until the announced day: 4xx, since SDKs retry a 503 at once.
    status = 403
    error_type = "permission_error"
    code = "upstream_not_yet_active"
    message = "This model's upstreams are announced subprocessors, not in use yet."
    reject_reason = "not_active"


class UpstreamRedirected(ProxyError):
    status = 502
    error_type = "api_error"
    code = "upstream_redirect"
    message = "The upstream answered with a redirect, which zrproxy never follows."


class UpstreamTimeout(ProxyError):
    status = 504
    error_type = "timeout_error"
    code = "upstream_timeout"
    message = "The upstream did not answer in time."


def forget(exc: BaseException) -> None:
    """Release what a caught foreign exception keeps alive, now rather than at the next
    garbage collection.

    A traceback holds every frame it passed through, and those frames hold their locals:
    for an upstream connect or parse error, the request and its body. aiohttp and asyncio build
    reference cycles through those frames (a frame's list of errors, each error's
    traceback back to the frame), which refcounting alone never frees. Clearing the
    frames' locals and the tracebacks along the whole chain breaks them.
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # frames still running are skipped
        error.__traceback__ = None
        for linked in (error.__context__, error.__cause__, getattr(error, "os_error", None)):
            if isinstance(linked, BaseException):
                pending.append(linked)
