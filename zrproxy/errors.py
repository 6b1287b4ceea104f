"""The error hierarchy: every error a client or operator can see, with fixed messages.

Never put request or response content into one of these: messages are class constants,
and the only variable parts are names taken from the config (key paths, upstream names).

    ZrproxyError
    ├── ConfigError(key_path, problem)      operator mistake, exit 2
    ├── StartupError(message)               the process cannot start as configured
    └── ProxyError                          rendered to the client by `dialects`
        ├── MalformedJSON        400
        ├── MissingModel         400
        ├── InvalidRequest       400
        ├── InvalidAuth          401
        ├── ModelNotAllowed      403
        ├── NotFound             404
        ├── MethodNotAllowed     405
        ├── BodyTimeout          408
        ├── BodyTooLarge         413
        ├── UpstreamUnavailable  502
        ├── ServiceDraining      503
        ├── NoUpstreamInRegion   503
        └── UpstreamTimeout      504
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
]
RejectReason = Literal[
    "auth", "model", "size", "malformed", "not_found", "method", "draining", "region", "none"
]


class ZrproxyError(Exception):
    """Base of everything zrproxy raises on purpose."""


class ConfigError(ZrproxyError):
    """A config mistake: names the key path and what is wrong with it (never its value)."""

    def __init__(self, key_path: str, problem: str) -> None:
        super().__init__(f"{key_path}: {problem}")
        self.key_path = key_path
        self.problem = problem


class StartupError(ZrproxyError):
    """The process cannot start as configured (bind failure, mlock refused, ...)."""


class ProxyError(ZrproxyError):
    """An error answered to the client. Subclasses fix status, type, code and message."""

    status: ClassVar[int] = 500
    error_type: ClassVar[ErrorType] = "api_error"
    code: ClassVar[str] = "internal_error"
    message: ClassVar[str] = "Internal proxy error."
    # Which rejection counter this bumps; "none" for upstream-side failures.
    reject_reason: ClassVar[RejectReason] = "none"

    def __init__(self) -> None:
        super().__init__(self.message)


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


class MethodNotAllowed(ProxyError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"
    message = "This method is not allowed on this path."
    reject_reason = "method"


class BodyTimeout(ProxyError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"
    message = "The request body did not arrive in time."
    reject_reason = "malformed"


class BodyTooLarge(ProxyError):
    status = 413
    error_type = "request_too_large"
    code = "request_too_large"
    message = "The request body exceeds the configured size limit."
    reject_reason = "size"


class UpstreamUnavailable(ProxyError):
    status = 502
    error_type = "api_error"
    code = "upstream_unavailable"
    message = "No upstream could serve the request."


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


class NoUpstreamInRegion(ProxyError):
    status = 503
    error_type = "api_error"
    code = "no_upstream_in_region"
    message = "No upstream for this model is allowed in the project's regions."
    reject_reason = "region"


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
